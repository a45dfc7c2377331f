//! Wire codecs of AeroKV's data plane: how hidden states and KV rows become message payloads.
//! Pure Rust: no ROS, no ONNX Runtime.
//!
//! Activations (hidden states, one row of `width` floats per token), [`ActivationCodec`]:
//! - `raw`: little-endian f32, exact; 4 bytes per element.
//! - `f16`: IEEE binary16 little-endian, rounded to nearest (ties to even); 2 bytes per element.
//!   Relative error at most 2^-11 for |x| >= 2^-14, absolute at most 2^-25 below; a value
//!   beyond the f16 range (|x| > 65504) is refused, not turned into infinity.
//! - `int8`: per row, a scale `s = max|x| / 127` (f32 little-endian) then `round(x / s)` as
//!   i8 in -127..=127, rounded half away from zero; decoded as `q * s`. |x - x'| <= s / 2 up to
//!   one f32 rounding. 4 + width bytes per row.
//!
//! Every activation layout is row by row, so the payload of consecutive chunks is the
//! concatenation of their payloads ([`Encoded::concat`], [`Encoded::split`]).
//!
//! KV rows (and anything else that must arrive bit for bit), [`KvCodec`], lossless:
//! - `raw`: little-endian f32.
//! - `zstd`: the floats' four byte planes one after the other (byte 0 of every float, then
//!   byte 1, ...: the sign/exponent bytes of similar values repeat, the mantissa bytes do not),
//!   compressed with zstd. Decoding never produces more than the size the message declares.
//!
//! Decoding validates everything (declared codec and dtype, lengths, scales, finiteness) and
//! answers a typed [`CodecError`]; it never panics and never allocates more than the caller's
//! declared, bounded element count.
use std::fmt;
use std::str::FromStr;

/// The element type every payload decodes to (`dtype` in the messages).
pub const DTYPE: &str = "f32";

/// zstd level of [`KvCodec::Zstd`]: on SmolLM2's KV rows level 3 compressed no better than 1
/// (0.848 against 0.845) at three to four times the CPU time (docs/codecs.md).
pub const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown {kind} codec {name:?} (known: {known})")]
    Unknown { kind: &'static str, name: String, known: String },
    #[error("dtype {0:?} is not supported (payloads decode to f32)")]
    Dtype(String),
    #[error("{codec} payload of {bytes} bytes for {rows} rows of {width} floats: expected {expected} bytes")]
    Length { codec: &'static str, bytes: usize, rows: usize, width: usize, expected: usize },
    #[error("invalid shape: {0}")]
    Shape(String),
    #[error("int8 row {row}: scale {scale} is not a finite number >= 0")]
    Scale { row: usize, scale: f32 },
    #[error("int8 row {row}: value -128, outside the encoder's -127..=127")]
    Int8Range { row: usize },
    #[error("element {index} is not finite ({value})")]
    NotFinite { index: usize, value: f32 },
    #[error("element {index} = {value} is beyond the f16 range (|x| <= 65504)")]
    F16Range { index: usize, value: f32 },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("zstd payload decompresses to {got} bytes, the message declares {expected}")]
    Decompressed { got: usize, expected: usize },
}

pub type Result<T> = std::result::Result<T, CodecError>;

/// Checks the `dtype` field of a message.
pub fn check_dtype(dtype: &str) -> Result<()> {
    if dtype == DTYPE {
        Ok(())
    } else {
        Err(CodecError::Dtype(dtype.into()))
    }
}

/// How hidden states travel between pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationCodec {
    /// Exact little-endian f32.
    #[default]
    Raw,
    /// IEEE binary16.
    F16,
    /// Symmetric int8 with one f32 scale per row (token).
    Int8,
}

impl ActivationCodec {
    pub const ALL: [ActivationCodec; 3] = [ActivationCodec::Raw, ActivationCodec::F16, ActivationCodec::Int8];

    pub fn name(self) -> &'static str {
        match self {
            ActivationCodec::Raw => "raw",
            ActivationCodec::F16 => "f16",
            ActivationCodec::Int8 => "int8",
        }
    }

    /// True when decoding gives back exactly the encoded floats.
    pub fn is_exact(self) -> bool {
        self == ActivationCodec::Raw
    }

    /// Payload bytes of one row (token) of `width` floats (saturating: no such payload exists).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            ActivationCodec::Raw => width.saturating_mul(4),
            ActivationCodec::F16 => width.saturating_mul(2),
            ActivationCodec::Int8 => width.saturating_add(4),
        }
    }

    /// Payload bytes per hidden-state element for rows of `width` (the cost model's figure:
    /// bytes per token per hop = this x width). Exact: no codec here depends on the data.
    pub fn bytes_per_element(self, width: usize) -> f64 {
        self.row_bytes(width.max(1)) as f64 / width.max(1) as f64
    }

    fn payload_len(self, rows: usize, width: usize) -> Result<usize> {
        if width == 0 || width > isize::MAX as usize / 4 {
            return Err(CodecError::Shape(format!("width {width}")));
        }
        rows.checked_mul(self.row_bytes(width))
            .ok_or_else(|| CodecError::Shape(format!("{rows} rows of {width} floats overflow")))
    }

    /// Encodes `data` (rows of `width` floats). Fails on a non-finite value, a length that is not
    /// a multiple of `width`, and (f16) a value beyond the f16 range.
    pub fn encode(self, data: &[f32], width: usize) -> Result<Vec<u8>> {
        if width == 0 || !data.len().is_multiple_of(width) {
            return Err(CodecError::Shape(format!("{} floats are not rows of {width}", data.len())));
        }
        if let Some((index, &value)) = data.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(CodecError::NotFinite { index, value });
        }
        let rows = data.len() / width;
        let mut out = Vec::with_capacity(self.payload_len(rows, width)?);
        match self {
            ActivationCodec::Raw => {
                for x in data {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            ActivationCodec::F16 => {
                for (index, &value) in data.iter().enumerate() {
                    let h = half::f16::from_f32(value);
                    if h.is_infinite() {
                        return Err(CodecError::F16Range { index, value });
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            ActivationCodec::Int8 => {
                for row in data.chunks_exact(width) {
                    let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let scale = max / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    for &x in row {
                        // f32::round: half away from zero; the clamp only guards f32 rounding.
                        let q = if scale > 0.0 { (x / scale).round().clamp(-127.0, 127.0) as i8 } else { 0 };
                        out.push(q as u8);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Decodes `rows` rows of `width` floats. The payload length must match exactly, so the
    /// output is never larger than the message that carried it allows.
    pub fn decode(self, bytes: &[u8], rows: usize, width: usize) -> Result<Vec<f32>> {
        let expected = self.payload_len(rows, width)?;
        if bytes.len() != expected {
            return Err(CodecError::Length { codec: self.name(), bytes: bytes.len(), rows, width, expected });
        }
        let mut out = Vec::with_capacity(rows * width);
        match self {
            ActivationCodec::Raw => {
                out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
            ActivationCodec::F16 => {
                out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()));
            }
            ActivationCodec::Int8 => {
                for (row, r) in bytes.chunks_exact(4 + width).enumerate() {
                    let scale = f32::from_le_bytes([r[0], r[1], r[2], r[3]]);
                    if !scale.is_finite() || scale < 0.0 {
                        return Err(CodecError::Scale { row, scale });
                    }
                    for &b in &r[4..] {
                        let q = b as i8;
                        if q == i8::MIN {
                            return Err(CodecError::Int8Range { row });
                        }
                        out.push(q as f32 * scale);
                    }
                }
            }
        }
        check_finite(&out)?;
        Ok(out)
    }

    /// What a receiver decodes from what this sender encodes.
    pub fn round_trip(self, data: &[f32], width: usize) -> Result<Vec<f32>> {
        let rows = data.len() / width.max(1);
        self.decode(&self.encode(data, width)?, rows, width)
    }
}

/// `Display` and `FromStr` by the codec's wire name; an unknown name lists the known ones.
macro_rules! named {
    ($t:ty, $kind:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $t {
            type Err = CodecError;
            fn from_str(s: &str) -> Result<Self> {
                Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| CodecError::Unknown {
                    kind: $kind,
                    name: s.into(),
                    known: Self::ALL.map(Self::name).join(", "),
                })
            }
        }
    };
}

named!(ActivationCodec, "activation");
named!(KvCodec, "KV");

fn check_finite(v: &[f32]) -> Result<()> {
    match v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        Some((index, &value)) => Err(CodecError::NotFinite { index, value }),
        None => Ok(()),
    }
}

/// Hidden states as they travel: rows of `width` floats encoded with `codec`. Built by
/// [`Encoded::encode`] at a sender or [`Encoded::from_wire`] (length checked) at a receiver;
/// every receiver of the same bytes decodes the same floats.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    codec: ActivationCodec,
    rows: usize,
    width: usize,
    bytes: Vec<u8>,
}

impl Encoded {
    pub fn encode(codec: ActivationCodec, data: &[f32], width: usize) -> Result<Encoded> {
        let bytes = codec.encode(data, width)?;
        Ok(Encoded { codec, rows: data.len() / width, width, bytes })
    }

    /// A payload as received: its length must be that of `rows` rows of `width` floats.
    pub fn from_wire(codec: ActivationCodec, rows: usize, width: usize, bytes: Vec<u8>) -> Result<Encoded> {
        let expected = codec.payload_len(rows, width)?;
        if rows == 0 || bytes.len() != expected {
            return Err(CodecError::Length { codec: codec.name(), bytes: bytes.len(), rows, width, expected });
        }
        Ok(Encoded { codec, rows, width, bytes })
    }

    pub fn decode(&self) -> Result<Vec<f32>> {
        self.codec.decode(&self.bytes, self.rows, self.width)
    }

    pub fn codec(&self) -> ActivationCodec {
        self.codec
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Consecutive chunks as one payload (all of one codec and width).
    pub fn concat<'a>(parts: impl IntoIterator<Item = &'a Encoded>) -> Result<Encoded> {
        let mut parts = parts.into_iter().peekable();
        let first = parts.peek().ok_or_else(|| CodecError::Shape("no chunks to pack".into()))?;
        let (codec, width) = (first.codec, first.width);
        let mut out = Encoded { codec, rows: 0, width, bytes: Vec::new() };
        for p in parts {
            if p.codec != codec || p.width != width {
                return Err(CodecError::Shape(format!(
                    "chunks of {} x {} and {} x {} in one payload",
                    codec, width, p.codec, p.width
                )));
            }
            out.rows += p.rows;
            out.bytes.extend_from_slice(&p.bytes);
        }
        Ok(out)
    }

    /// The inverse of [`Encoded::concat`]: chunks of `rows[i]` rows each, which must add up.
    pub fn split(&self, rows: &[usize]) -> Result<Vec<Encoded>> {
        if rows.iter().try_fold(0usize, |a, &r| a.checked_add(r)) != Some(self.rows) || rows.contains(&0) {
            return Err(CodecError::Shape(format!("chunks of {rows:?} rows in a payload of {}", self.rows)));
        }
        let per = self.codec.row_bytes(self.width);
        let mut at = 0;
        Ok(rows
            .iter()
            .map(|&r| {
                let part = Encoded {
                    codec: self.codec,
                    rows: r,
                    width: self.width,
                    bytes: self.bytes[at..at + r * per].to_vec(),
                };
                at += r * per;
                part
            })
            .collect())
    }
}

/// How KV rows travel (snapshots, seeds). Lossless: a failover must rebuild exactly the KV the
/// failed UAV had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCodec {
    /// Little-endian f32.
    #[default]
    Raw,
    /// Byte planes of the f32s, then zstd ([`ZSTD_LEVEL`]).
    Zstd,
}

impl KvCodec {
    pub const ALL: [KvCodec; 2] = [KvCodec::Raw, KvCodec::Zstd];

    pub fn name(self) -> &'static str {
        match self {
            KvCodec::Raw => "raw",
            KvCodec::Zstd => "zstd",
        }
    }

    /// Payload bytes per KV element for the cost model: exact for `raw`; for `zstd` the mean
    /// measured on SmolLM2's KV rows (docs/codecs.md), an estimate since it depends on the data.
    pub fn bytes_per_element(self) -> f64 {
        match self {
            KvCodec::Raw => 4.0,
            KvCodec::Zstd => 4.0 * ZSTD_KV_RATIO,
        }
    }

    pub fn encode(self, data: &[f32]) -> Result<Vec<u8>> {
        check_finite(data)?;
        match self {
            KvCodec::Raw => Ok(ActivationCodec::Raw.encode(data, 1)?),
            KvCodec::Zstd => {
                zstd::bulk::compress(&shuffle(data), ZSTD_LEVEL).map_err(|e| CodecError::Zstd(e.to_string()))
            }
        }
    }

    /// Decodes exactly `elements` floats. The caller bounds `elements` (from the message's
    /// validated shape); decompression stops at that size.
    pub fn decode(self, bytes: &[u8], elements: usize) -> Result<Vec<f32>> {
        let expected =
            elements.checked_mul(4).ok_or_else(|| CodecError::Shape(format!("{elements} elements overflow")))?;
        let out = match self {
            KvCodec::Raw => return ActivationCodec::Raw.decode(bytes, elements, 1),
            KvCodec::Zstd => {
                let planes = zstd::bulk::decompress(bytes, expected).map_err(|e| CodecError::Zstd(e.to_string()))?;
                if planes.len() != expected {
                    return Err(CodecError::Decompressed { got: planes.len(), expected });
                }
                unshuffle(&planes)
            }
        };
        check_finite(&out)?;
        Ok(out)
    }
}

/// Compressed size / raw size of SmolLM2-135M KV rows under [`KvCodec::Zstd`], measured with
/// `aerokv codecs` (docs/codecs.md).
pub const ZSTD_KV_RATIO: f64 = 0.85;

/// The four byte planes of little-endian f32s: byte 0 of every float, then byte 1, ...
pub fn shuffle(data: &[f32]) -> Vec<u8> {
    let n = data.len();
    let mut out = vec![0u8; 4 * n];
    for (i, x) in data.iter().enumerate() {
        for (plane, b) in x.to_le_bytes().into_iter().enumerate() {
            out[plane * n + i] = b;
        }
    }
    out
}

/// The inverse of [`shuffle`] (`planes.len()` a multiple of 4).
pub fn unshuffle(planes: &[u8]) -> Vec<f32> {
    let n = planes.len() / 4;
    (0..n).map(|i| f32::from_le_bytes([planes[i], planes[n + i], planes[2 * n + i], planes[3 * n + i]])).collect()
}

#[cfg(test)]
mod tests;
