//! A contiguous interval of decoder layers with its per-layer KV caches.
use std::borrow::Cow;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef};

use crate::error::{EngineError, Result};
use crate::manifest::{check_size, Architecture, Manifest};
use crate::runtime::Runtime;

/// Hidden states of `tokens` consecutive tokens, row-major `[tokens, width]` (the `[1, S, 576]`
/// tensor that crosses between shards, without the batch dimension).
#[derive(Debug, Clone, PartialEq)]
pub struct Hidden {
    tokens: usize,
    width: usize,
    data: Vec<f32>,
}

impl Hidden {
    /// Wraps `data` (`tokens * width` floats). Fails if the length is not a positive multiple of `width`.
    pub fn new(data: Vec<f32>, width: usize) -> Result<Hidden> {
        if width == 0 || data.is_empty() || !data.len().is_multiple_of(width) {
            return Err(EngineError::InvalidInput(format!(
                "hidden states of {} floats are not a positive multiple of width {width}",
                data.len()
            )));
        }
        Ok(Hidden { tokens: data.len() / width, width, data })
    }

    /// Number of tokens (S).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Hidden size (576 for SmolLM2-135M).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Row-major `[tokens, width]` floats.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The floats, consuming the value.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Rows `range` as a new chunk (e.g. to replay a buffered chunk token by token, or to keep
    /// only the last token for the LM head).
    pub fn rows(&self, range: Range<usize>) -> Result<Hidden> {
        if range.start >= range.end || range.end > self.tokens {
            return Err(EngineError::InvalidInput(format!("rows {range:?} of a chunk of {} tokens", self.tokens)));
        }
        Ok(Hidden {
            tokens: range.len(),
            width: self.width,
            data: self.data[range.start * self.width..range.end * self.width].to_vec(),
        })
    }

    /// True when both chunks hold exactly the same bits (NaN-safe, unlike `==`).
    pub fn bit_identical(&self, other: &Hidden) -> bool {
        self.tokens == other.tokens
            && self.width == other.width
            && self.data.iter().zip(&other.data).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// KV cache of one decoder layer: keys (after RoPE) and values of every token seen so far,
/// `[1, kv_heads, len, head_dim]` each. Kept as ONNX Runtime values so that one step's
/// `present_*` output feeds the next step's `past_*` input without a copy.
pub struct LayerKv {
    layer: usize,
    len: usize,
    key: Option<DynValue>,
    value: Option<DynValue>,
}

impl std::fmt::Debug for LayerKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerKv").field("layer", &self.layer).field("len", &self.len).finish()
    }
}

impl LayerKv {
    fn empty(layer: usize) -> LayerKv {
        LayerKv { layer, len: 0, key: None, value: None }
    }

    /// Absolute layer index.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The KV rows of one layer for a token range, `[kv_heads, tokens, head_dim]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRows {
    /// Absolute layer index.
    pub layer: usize,
    pub key: Vec<f32>,
    pub value: Vec<f32>,
}

/// A KV snapshot: rows `[token_start, token_start + tokens)` of some layers. Produced by
/// [`Shard::export_kv`], consumed by [`Shard::import_kv`]; this is what a boundary snapshot
/// carries to the successor drone.
#[derive(Debug, Clone, PartialEq)]
pub struct KvRows {
    /// Absolute position of the first row.
    pub token_start: usize,
    /// Number of rows per layer.
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// One entry per layer, in increasing layer order.
    pub layers: Vec<LayerRows>,
}

impl KvRows {
    /// Payload size in bytes (what a snapshot costs on the radio).
    pub fn byte_len(&self) -> usize {
        self.layers.iter().map(|l| (l.key.len() + l.value.len()) * std::mem::size_of::<f32>()).sum()
    }

    /// Appends `later` (the next rows of the same layers) to this snapshot, e.g. to accumulate
    /// periodic boundary snapshots on the successor.
    pub fn append(&mut self, later: &KvRows) -> Result<()> {
        let same_layers = self.layers.len() == later.layers.len()
            && self.layers.iter().zip(&later.layers).all(|(a, b)| a.layer == b.layer);
        if !same_layers || later.kv_heads != self.kv_heads || later.head_dim != self.head_dim {
            return Err(EngineError::KvMismatch("appended rows cover other layers or shapes".into()));
        }
        if later.token_start != self.token_start + self.tokens {
            return Err(EngineError::KvMismatch(format!(
                "appended rows start at {} but this snapshot ends at {}",
                later.token_start,
                self.token_start + self.tokens
            )));
        }
        let (h, d, n0, n1) = (self.kv_heads, self.head_dim, self.tokens, later.tokens);
        let sizes_ok = self.layers.iter().all(|l| l.key.len() == h * n0 * d && l.value.len() == h * n0 * d)
            && later.layers.iter().all(|l| l.key.len() == h * n1 * d && l.value.len() == h * n1 * d);
        if !sizes_ok {
            return Err(EngineError::KvMismatch("a layer's row data does not match tokens x heads x dims".into()));
        }
        for (mine, theirs) in self.layers.iter_mut().zip(&later.layers) {
            mine.key = concat_rows(&mine.key, n0, &theirs.key, n1, h, d);
            mine.value = concat_rows(&mine.value, n0, &theirs.value, n1, h, d);
        }
        self.tokens += later.tokens;
        Ok(())
    }
}

/// Memory of a shard, for the planner (docs/design.md §4): weights plus KV per token, from the files
/// actually loaded and the process's resident set measured around the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMemory {
    /// Bytes of weights of the interval (sum over its layer files).
    pub weight_bytes: u64,
    /// KV bytes one token adds to the whole interval (layers x 2 x kv_heads x head_dim x 4).
    pub kv_bytes_per_token: u64,
    /// KV bytes held now.
    pub kv_bytes: u64,
    /// Growth of the process's resident set while the sessions were created (0 if unknown).
    pub loaded_rss_bytes: u64,
}

struct LayerPart {
    file: PathBuf,
    start: usize,
    end: usize,
    session: Session,
    /// Per layer of the file: (past_key, past_value, present_key, present_value) names.
    names: Vec<[String; 4]>,
}

/// A contiguous interval `[start, end)` of decoder layers loaded into ONNX Runtime, with one
/// [`LayerKv`] per layer.
pub struct Shard {
    variant: String,
    arch: Architecture,
    start: usize,
    end: usize,
    parts: Vec<LayerPart>,
    kv: Vec<LayerKv>,
    weight_bytes: u64,
    loaded_rss_bytes: u64,
    load_time: Duration,
    last_compute: Duration,
    empty_kv: DynValue,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("variant", &self.variant)
            .field("layers", &(self.start..self.end))
            .field("files", &self.parts.iter().map(|p| p.file.display().to_string()).collect::<Vec<_>>())
            .field("kv_len", &self.kv_len())
            .finish()
    }
}

impl Shard {
    /// Loads the layer files covering exactly `layers` (their ends must be file boundaries).
    pub fn load(runtime: &Runtime, manifest: &Manifest, layers: Range<usize>) -> Result<Shard> {
        let files = manifest.layer_files_for(layers.start, layers.end)?;
        let arch = manifest.architecture.clone();
        let started = Instant::now();
        let rss_before = resident_bytes();
        let mut parts = Vec::with_capacity(files.len());
        for f in files {
            let path = manifest.path_of(&f.name);
            check_size(&path, f.bytes)?;
            let session = runtime.open_session(&path)?;
            let names: Vec<[String; 4]> = (f.start..f.end)
                .map(|i| {
                    [
                        format!("past_key_{i}"),
                        format!("past_value_{i}"),
                        format!("present_key_{i}"),
                        format!("present_value_{i}"),
                    ]
                })
                .collect();
            check_io(&session, &path, &names)?;
            parts.push(LayerPart { file: path, start: f.start, end: f.end, session, names });
        }
        let loaded_rss_bytes = resident_bytes().saturating_sub(rss_before);
        let load_time = started.elapsed();
        let empty_kv = Tensor::from_array(([1usize, arch.kv_heads, 0, arch.head_dim], Vec::<f32>::new()))
            .map_err(|e| EngineError::ort("creating an empty KV tensor", e))?
            .into_dyn();
        tracing::debug!(variant = %manifest.variant, start = layers.start, end = layers.end, files = parts.len(),
            load_ms = load_time.as_secs_f64() * 1e3, "shard loaded");
        Ok(Shard {
            variant: manifest.variant.clone(),
            arch,
            start: layers.start,
            end: layers.end,
            kv: (layers.start..layers.end).map(LayerKv::empty).collect(),
            parts,
            weight_bytes: files.iter().map(|f| f.weight_bytes).sum(),
            loaded_rss_bytes,
            load_time,
            last_compute: Duration::ZERO,
            empty_kv,
        })
    }

    /// The layer interval `[start, end)`.
    pub fn layers(&self) -> Range<usize> {
        self.start..self.end
    }

    /// Variant name (`q4`, `fp32`, ...).
    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// Model architecture of the variant.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// Wall time spent creating the sessions.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Measured compute time of the last [`Shard::forward`] call.
    pub fn last_compute(&self) -> Duration {
        self.last_compute
    }

    /// The KV cache of one layer (absolute index), if the shard holds it.
    pub fn layer_kv(&self, layer: usize) -> Option<&LayerKv> {
        layer.checked_sub(self.start).and_then(|i| self.kv.get(i))
    }

    /// Tokens held in the KV caches (the smallest over layers; they are equal unless a partial
    /// import is in progress).
    pub fn kv_len(&self) -> usize {
        self.kv.iter().map(|k| k.len).min().unwrap_or(0)
    }

    /// Weights and KV bytes of this shard.
    pub fn memory_bytes(&self) -> ShardMemory {
        let per_token = self.arch.kv_bytes_per_token_per_layer() * (self.end - self.start) as u64;
        let held: u64 = self.kv.iter().map(|k| k.len as u64).sum::<u64>() * self.arch.kv_bytes_per_token_per_layer();
        ShardMemory {
            weight_bytes: self.weight_bytes,
            kv_bytes_per_token: per_token,
            kv_bytes: held,
            loaded_rss_bytes: self.loaded_rss_bytes,
        }
    }

    /// Runs a chunk of `hidden.tokens()` tokens at absolute positions `position..position + S`
    /// through every layer, appending S rows to every layer's KV cache. `position` must equal
    /// [`Shard::kv_len`]. Replays must use the same chunks as the original run: a chunk of 5
    /// tokens and 5 chunks of 1 token give slightly different floats.
    pub fn forward(&mut self, hidden: &Hidden, position: usize) -> Result<Hidden> {
        let s = hidden.tokens();
        let width = self.arch.hidden;
        if hidden.width() != width {
            return Err(EngineError::InvalidInput(format!(
                "hidden width {} but the model's is {width}",
                hidden.width()
            )));
        }
        if let Some(k) = self.kv.iter().find(|k| k.len != position) {
            return Err(EngineError::InvalidInput(format!(
                "forward at position {position} but layer {} holds {} KV rows",
                k.layer, k.len
            )));
        }
        let limit = self.arch.max_context;
        if position + s > limit {
            return Err(EngineError::ContextOverflow {
                what: format!("position {position} + {s} new tokens"),
                tokens: position + s,
                limit,
            });
        }
        let started = Instant::now();
        let positions: Vec<i64> = (position..position + s).map(|p| p as i64).collect();
        let input_view = TensorRef::from_array_view(([1usize, s, width], hidden.as_slice()))
            .map_err(|e| EngineError::ort("wrapping the hidden input", e))?;
        let position_view = TensorRef::from_array_view(([1usize, s], positions.as_slice()))
            .map_err(|e| EngineError::ort("wrapping the position ids", e))?;
        let (parts, kv, empty_kv) = (&mut self.parts, &mut self.kv, &self.empty_kv);
        let shard_start = self.start;
        let mut carried: Option<DynValue> = None;
        for part in parts.iter_mut() {
            let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(2 + 2 * part.names.len());
            let hidden_in: SessionInputValue<'_> = match &carried {
                Some(v) => v.into(),
                None => (&*input_view).into(),
            };
            inputs.push((Cow::Borrowed("hidden"), hidden_in));
            inputs.push((Cow::Borrowed("position_ids"), (&*position_view).into()));
            for (layer, names) in (part.start..part.end).zip(&part.names) {
                let cache = &kv[layer - shard_start];
                let key = cache.key.as_ref().unwrap_or(empty_kv);
                let value = cache.value.as_ref().unwrap_or(empty_kv);
                inputs.push((Cow::Borrowed(names[0].as_str()), key.into()));
                inputs.push((Cow::Borrowed(names[1].as_str()), value.into()));
            }
            let mut outputs = part
                .session
                .run(inputs)
                .map_err(|e| EngineError::ort(format!("running {}", part.file.display()), e))?;
            let out = outputs.remove("hidden_out").ok_or_else(|| missing_output(&part.file, "hidden_out"))?;
            let mut presents = Vec::with_capacity(part.names.len());
            for names in &part.names {
                let key = outputs.remove(&names[2]).ok_or_else(|| missing_output(&part.file, &names[2]))?;
                let value = outputs.remove(&names[3]).ok_or_else(|| missing_output(&part.file, &names[3]))?;
                presents.push((key, value));
            }
            drop(outputs);
            for ((layer, names), (key, value)) in (part.start..part.end).zip(&part.names).zip(presents) {
                let expected = [1, self.arch.kv_heads as i64, (position + s) as i64, self.arch.head_dim as i64];
                check_shape(&key, &expected, &part.file, &names[2])?;
                check_shape(&value, &expected, &part.file, &names[3])?;
                let cache = &mut kv[layer - shard_start];
                cache.key = Some(key);
                cache.value = Some(value);
                cache.len = position + s;
            }
            carried = Some(out);
        }
        let out = carried.ok_or_else(|| EngineError::InvalidInput("shard has no layers".into()))?;
        let (shape, data) = out.try_extract_tensor::<f32>().map_err(|e| EngineError::ort("reading hidden_out", e))?;
        if shape.len() != 3 || shape[0] != 1 || shape[1] != s as i64 || shape[2] != width as i64 {
            return Err(EngineError::CorruptFile {
                path: self.parts.last().map(|p| p.file.clone()).unwrap_or_default(),
                reason: format!("hidden_out has shape {shape:?}, expected [1, {s}, {width}]"),
            });
        }
        let result = Hidden::new(data.to_vec(), width)?;
        self.last_compute = started.elapsed();
        Ok(result)
    }

    /// Copies the KV rows of `tokens` (absolute positions) for the absolute `layers` out of the
    /// shard.
    pub fn export_kv(&self, layers: Range<usize>, tokens: Range<usize>) -> Result<KvRows> {
        if layers.start >= layers.end || layers.start < self.start || layers.end > self.end {
            return Err(EngineError::InvalidInput(format!(
                "export of layers {layers:?} from a shard holding [{}, {})",
                self.start, self.end
            )));
        }
        if tokens.start > tokens.end {
            return Err(EngineError::InvalidInput(format!("export of token range {tokens:?}")));
        }
        let (h, d) = (self.arch.kv_heads, self.arch.head_dim);
        let mut out = Vec::with_capacity(layers.len());
        for layer in layers {
            let cache = &self.kv[layer - self.start];
            if tokens.end > cache.len {
                return Err(EngineError::InvalidInput(format!(
                    "export of tokens {tokens:?} but layer {layer} holds {} rows",
                    cache.len
                )));
            }
            let key = slice_rows(cache.key.as_ref(), cache.len, tokens.clone(), h, d)?;
            let value = slice_rows(cache.value.as_ref(), cache.len, tokens.clone(), h, d)?;
            out.push(LayerRows { layer, key, value });
        }
        Ok(KvRows { token_start: tokens.start, tokens: tokens.len(), kv_heads: h, head_dim: d, layers: out })
    }

    /// Appends snapshot rows to the layers they name. For each layer, `rows.token_start` must
    /// equal that layer's current length (restore into a fresh shard: `token_start == 0`).
    /// All-or-nothing: on error no layer is changed.
    pub fn import_kv(&mut self, rows: &KvRows) -> Result<()> {
        let (h, d) = (self.arch.kv_heads, self.arch.head_dim);
        if rows.kv_heads != h || rows.head_dim != d {
            return Err(EngineError::KvMismatch(format!(
                "rows have {} heads x {} dims, the model {h} x {d}",
                rows.kv_heads, rows.head_dim
            )));
        }
        let want = h * rows.tokens * d;
        let mut prev_layer = None;
        for l in &rows.layers {
            if l.layer < self.start || l.layer >= self.end {
                return Err(EngineError::KvMismatch(format!(
                    "layer {} is outside this shard [{}, {})",
                    l.layer, self.start, self.end
                )));
            }
            if prev_layer.is_some_and(|p| p >= l.layer) {
                return Err(EngineError::KvMismatch("layers are not in increasing order".into()));
            }
            prev_layer = Some(l.layer);
            if l.key.len() != want || l.value.len() != want {
                return Err(EngineError::KvMismatch(format!(
                    "layer {} has {}/{} floats, expected {want}",
                    l.layer,
                    l.key.len(),
                    l.value.len()
                )));
            }
            let held = self.kv[l.layer - self.start].len;
            if rows.token_start != held {
                return Err(EngineError::KvMismatch(format!(
                    "rows start at token {} but layer {} holds {held} rows",
                    rows.token_start, l.layer
                )));
            }
            if rows.token_start + rows.tokens > self.arch.max_context {
                return Err(EngineError::ContextOverflow {
                    what: "imported KV".into(),
                    tokens: rows.token_start + rows.tokens,
                    limit: self.arch.max_context,
                });
            }
        }
        // Build every new tensor first so a failure leaves the shard untouched.
        let mut updates = Vec::with_capacity(rows.layers.len());
        for l in &rows.layers {
            let cache = &self.kv[l.layer - self.start];
            let old_key = slice_rows(cache.key.as_ref(), cache.len, 0..cache.len, h, d)?;
            let old_value = slice_rows(cache.value.as_ref(), cache.len, 0..cache.len, h, d)?;
            let len = cache.len + rows.tokens;
            let key = kv_tensor(concat_rows(&old_key, cache.len, &l.key, rows.tokens, h, d), len, h, d)?;
            let value = kv_tensor(concat_rows(&old_value, cache.len, &l.value, rows.tokens, h, d), len, h, d)?;
            updates.push((l.layer, key, value, len));
        }
        for (layer, key, value, len) in updates {
            let cache = &mut self.kv[layer - self.start];
            cache.key = Some(key);
            cache.value = Some(value);
            cache.len = len;
        }
        Ok(())
    }

    /// Drops KV rows from position `len` on, in every layer (no-op for layers holding fewer).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let (h, d) = (self.arch.kv_heads, self.arch.head_dim);
        for cache in &mut self.kv {
            if cache.len <= len {
                continue;
            }
            if len == 0 {
                *cache = LayerKv::empty(cache.layer);
                continue;
            }
            let key = kv_tensor(slice_rows(cache.key.as_ref(), cache.len, 0..len, h, d)?, len, h, d)?;
            let value = kv_tensor(slice_rows(cache.value.as_ref(), cache.len, 0..len, h, d)?, len, h, d)?;
            cache.key = Some(key);
            cache.value = Some(value);
            cache.len = len;
        }
        Ok(())
    }

    /// Clears every KV cache (a new request).
    pub fn reset(&mut self) {
        for cache in &mut self.kv {
            *cache = LayerKv::empty(cache.layer);
        }
    }

    /// Joins `next` (which must start where this shard ends, same variant and KV length) onto
    /// this shard, e.g. when a replica of a successor's head becomes native layers.
    pub fn join(mut self, next: Shard) -> Result<Shard> {
        if next.start != self.end || next.variant != self.variant {
            return Err(EngineError::InvalidInput(format!(
                "cannot join [{}, {}) of `{}` after [{}, {}) of `{}`",
                next.start, next.end, next.variant, self.start, self.end, self.variant
            )));
        }
        if next.kv_len() != self.kv_len() {
            return Err(EngineError::KvMismatch(format!(
                "joined shards hold {} and {} KV rows",
                self.kv_len(),
                next.kv_len()
            )));
        }
        self.end = next.end;
        self.parts.extend(next.parts);
        self.kv.extend(next.kv);
        self.weight_bytes += next.weight_bytes;
        self.loaded_rss_bytes += next.loaded_rss_bytes;
        self.load_time += next.load_time;
        Ok(self)
    }
}

fn check_io(session: &Session, path: &std::path::Path, names: &[[String; 4]]) -> Result<()> {
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let mut want_in = vec!["hidden", "position_ids"];
    let mut want_out = vec!["hidden_out"];
    for n in names {
        want_in.extend([n[0].as_str(), n[1].as_str()]);
        want_out.extend([n[2].as_str(), n[3].as_str()]);
    }
    for w in &want_in {
        if !inputs.contains(w) {
            return Err(EngineError::CorruptFile {
                path: path.to_path_buf(),
                reason: format!("graph has no input `{w}`"),
            });
        }
    }
    for w in &want_out {
        if !outputs.contains(w) {
            return Err(EngineError::CorruptFile {
                path: path.to_path_buf(),
                reason: format!("graph has no output `{w}`"),
            });
        }
    }
    Ok(())
}

fn missing_output(file: &std::path::Path, name: &str) -> EngineError {
    EngineError::CorruptFile { path: file.to_path_buf(), reason: format!("run returned no `{name}`") }
}

fn check_shape(value: &DynValue, expected: &[i64; 4], file: &std::path::Path, name: &str) -> Result<()> {
    let shape = value.try_extract_tensor::<f32>().map_err(|e| EngineError::ort(format!("reading {name}"), e))?.0;
    if shape.len() != 4 || shape.iter().zip(expected).any(|(a, b)| a != b) {
        return Err(EngineError::CorruptFile {
            path: file.to_path_buf(),
            reason: format!("{name} has shape {shape:?}, expected {expected:?}"),
        });
    }
    Ok(())
}

/// Rows `tokens` of a `[1, h, len, d]` cache as `[h, tokens, d]`.
fn slice_rows(value: Option<&DynValue>, len: usize, tokens: Range<usize>, h: usize, d: usize) -> Result<Vec<f32>> {
    let n = tokens.len();
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| EngineError::ort("reading a KV cache", e))?;
    if data.len() != h * len * d || tokens.end > len {
        return Err(EngineError::KvMismatch(format!("cache holds {} floats, expected {}", data.len(), h * len * d)));
    }
    let mut out = Vec::with_capacity(h * n * d);
    for head in 0..h {
        let base = head * len * d;
        out.extend_from_slice(&data[base + tokens.start * d..base + tokens.end * d]);
    }
    Ok(out)
}

/// `[h, n0, d]` then `[h, n1, d]` -> `[h, n0 + n1, d]`.
fn concat_rows(first: &[f32], n0: usize, second: &[f32], n1: usize, h: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * (n0 + n1) * d);
    for head in 0..h {
        out.extend_from_slice(&first[head * n0 * d..(head + 1) * n0 * d]);
        out.extend_from_slice(&second[head * n1 * d..(head + 1) * n1 * d]);
    }
    out
}

fn kv_tensor(data: Vec<f32>, len: usize, h: usize, d: usize) -> Result<DynValue> {
    Ok(Tensor::from_array(([1usize, h, len, d], data))
        .map_err(|e| EngineError::ort("creating a KV tensor", e))?
        .into_dyn())
}

/// Resident set size of this process (Linux `/proc/self/statm`), 0 where unavailable.
pub(crate) fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
