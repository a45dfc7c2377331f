//! Reads a rosbag2 bag with MCAP storage: `metadata.yaml`, then each MCAP file record by record
//! (chunked or not, as rosbag2, `rosbags` and AeroKV write them). Every record's byte offset is
//! known, so a truncated or corrupt file is reported with the file and the offset.
use super::metadata::{BagInfo, Qos};
use super::{BagError, METADATA_FILE, PARTIAL_SUFFIX};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"\x89MCAP0\r\n";

/// A bag directory whose `metadata.yaml` was read.
#[derive(Clone, Debug)]
pub struct Bag {
    pub dir: PathBuf,
    pub info: BagInfo,
    /// The storage files, in order.
    pub files: Vec<PathBuf>,
}

/// A topic of a bag as its MCAP channel declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct Channel {
    pub topic: String,
    /// `pkg/msg/Name` (the schema's name).
    pub type_name: String,
    /// `ros2msg` text (may be empty when the bag carries no definition).
    pub schema: String,
    pub schema_encoding: String,
    pub offered_qos: Vec<Qos>,
}

/// One message: its channel, receive time (ns since the epoch) and CDR bytes.
#[derive(Clone, Debug)]
pub struct BagMessage {
    pub channel: Arc<Channel>,
    pub log_time: u64,
    pub data: Vec<u8>,
    /// The MCAP file, and the byte offset of the message's record (in a compressed chunk: of the
    /// chunk).
    pub file: Arc<PathBuf>,
    pub offset: u64,
}

/// What a full pass over a bag found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contents {
    /// Messages per topic.
    pub counts: HashMap<String, u64>,
    pub first: Option<u64>,
    pub last: Option<u64>,
}

impl Bag {
    /// Reads `dir/metadata.yaml`. A directory without it is an unfinished recording.
    pub fn open(dir: &Path) -> Result<Self, BagError> {
        let meta_path = dir.join(METADATA_FILE);
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !dir.is_dir() {
                    return Err(BagError::Io { path: dir.to_path_buf(), err: e });
                }
                let partial = std::fs::read_dir(dir)
                    .ok()
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.to_string_lossy().ends_with(PARTIAL_SUFFIX));
                return Err(BagError::Incomplete { dir: dir.to_path_buf(), partial });
            }
            Err(err) => return Err(BagError::Io { path: meta_path, err }),
        };
        let bad = |why: String| BagError::BadMetadata { path: meta_path.clone(), why };
        let info = BagInfo::from_yaml(&text).map_err(|e| bad(e.to_string()))?;
        if info.storage_identifier != "mcap" {
            return Err(bad(format!("storage `{}` is not supported (only mcap)", info.storage_identifier)));
        }
        if !info.compression_mode.is_empty() && !info.compression_mode.eq_ignore_ascii_case("none") {
            return Err(bad(format!("file compression `{}` is not supported", info.compression_mode)));
        }
        for t in &info.topics_with_message_count {
            if t.topic_metadata.serialization_format != "cdr" {
                return Err(bad(format!(
                    "topic {} is serialized as `{}`, not cdr",
                    t.topic_metadata.name, t.topic_metadata.serialization_format
                )));
            }
        }
        let mut files = Vec::new();
        for rel in &info.relative_file_paths {
            // Only a file inside the bag: the path's last component, as rosbag2 resolves it.
            let name = Path::new(rel).file_name().ok_or_else(|| bad(format!("bad file path `{rel}`")))?;
            let path = dir.join(name);
            if !path.is_file() {
                return Err(bad(format!("its file {} is missing", path.display())));
            }
            files.push(path);
        }
        Ok(Bag { dir: dir.to_path_buf(), info, files })
    }

    /// Every message of every file, in file order.
    pub fn messages(&self) -> impl Iterator<Item = Result<BagMessage, BagError>> + '_ {
        self.files.iter().flat_map(|path| match McapStream::open(path) {
            Ok(stream) => Box::new(stream) as Box<dyn Iterator<Item = Result<BagMessage, BagError>>>,
            Err(e) => Box::new(std::iter::once(Err(e))),
        })
    }

    /// Reads the whole bag (every record, chunk CRCs) and checks it against `metadata.yaml`.
    pub fn check(&self) -> Result<Contents, BagError> {
        let mut c = Contents::default();
        for m in self.messages() {
            let m = m?;
            *c.counts.entry(m.channel.topic.clone()).or_default() += 1;
            c.first = Some(c.first.map_or(m.log_time, |f| f.min(m.log_time)));
            c.last = Some(c.last.map_or(m.log_time, |l| l.max(m.log_time)));
        }
        for t in &self.info.topics_with_message_count {
            let found = c.counts.get(&t.topic_metadata.name).copied().unwrap_or(0);
            if found != t.message_count {
                return Err(BagError::BadMetadata {
                    path: self.dir.join(METADATA_FILE),
                    why: format!(
                        "it lists {} messages on {}, the bag holds {found}",
                        t.message_count, t.topic_metadata.name
                    ),
                });
            }
        }
        Ok(c)
    }
}

/// The messages of one MCAP file, read record by record.
pub struct McapStream {
    path: PathBuf,
    /// The same path, shared by the messages read.
    file: Arc<PathBuf>,
    input: BufReader<File>,
    size: u64,
    offset: u64,
    schemas: HashMap<u16, (String, String, String)>,
    channels: HashMap<u16, Arc<Channel>>,
    /// Messages of the chunk read last.
    pending: VecDeque<BagMessage>,
    done: bool,
}

impl McapStream {
    pub fn open(path: &Path) -> Result<Self, BagError> {
        let io = |err| BagError::Io { path: path.to_path_buf(), err };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut s = McapStream {
            path: path.to_path_buf(),
            file: Arc::new(path.to_path_buf()),
            input: BufReader::with_capacity(1 << 20, file),
            size,
            offset: 0,
            schemas: HashMap::new(),
            channels: HashMap::new(),
            pending: VecDeque::new(),
            done: false,
        };
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic, "the MCAP magic")?;
        if &magic != MAGIC {
            return Err(s.corrupt(0, "not an MCAP file (bad magic)".into()));
        }
        Ok(s)
    }

    fn corrupt(&self, offset: u64, what: String) -> BagError {
        BagError::Corrupt { path: self.path.clone(), offset, what }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), BagError> {
        let left = self.size.saturating_sub(self.offset);
        if (buf.len() as u64) > left {
            return Err(BagError::Truncated {
                path: self.path.clone(),
                offset: self.offset,
                what: format!("{what} needs {} bytes, the file has {left} left", buf.len()),
            });
        }
        self.input.read_exact(buf).map_err(|err| BagError::Io { path: self.path.clone(), err })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads records until one yields messages or the file ends.
    fn advance(&mut self) -> Result<(), BagError> {
        while self.pending.is_empty() && !self.done {
            let start = self.offset;
            if start == self.size {
                return Err(BagError::Truncated {
                    path: self.path.clone(),
                    offset: start,
                    what: "the file ends without an MCAP footer (the recording did not finish)".into(),
                });
            }
            let mut head = [0u8; 9];
            self.read_exact(&mut head, "a record header")?;
            let opcode = head[0];
            let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default());
            let left = self.size - self.offset;
            if len > left {
                return Err(BagError::Truncated {
                    path: self.path.clone(),
                    offset: start,
                    what: format!("record 0x{opcode:02x} declares {len} bytes, the file has {left} left"),
                });
            }
            let mut body = vec![0u8; len as usize];
            self.read_exact(&mut body, "a record")?;
            let record = mcap::parse_record(opcode, &body)
                .map_err(|e| self.corrupt(start, format!("record 0x{opcode:02x}: {e}")))?;
            self.take(start, record)?;
            if self.done {
                let mut magic = [0u8; 8];
                self.read_exact(&mut magic, "the closing MCAP magic")?;
                if &magic != MAGIC {
                    return Err(self.corrupt(self.offset - 8, "bad closing magic after the footer".into()));
                }
            }
        }
        Ok(())
    }

    fn take(&mut self, at: u64, record: mcap::records::Record<'_>) -> Result<(), BagError> {
        use mcap::records::Record;
        match record {
            Record::Header(h) if h.profile != "ros2" => {
                return Err(self.corrupt(at, format!("MCAP profile `{}` is not ros2", h.profile)));
            }
            Record::Schema { header, data } => {
                let text = String::from_utf8_lossy(&data).into_owned();
                self.schemas.insert(header.id, (header.name, header.encoding, text));
            }
            Record::Channel(c) => {
                let (type_name, schema_encoding, schema) =
                    match c.schema_id {
                        0 => Default::default(),
                        id => self.schemas.get(&id).cloned().ok_or_else(|| {
                            self.corrupt(at, format!("channel {} names unknown schema {id}", c.topic))
                        })?,
                    };
                if c.message_encoding != "cdr" {
                    return Err(self.corrupt(at, format!("channel {} is `{}`, not cdr", c.topic, c.message_encoding)));
                }
                let offered_qos = match c.metadata.get("offered_qos_profiles") {
                    Some(text) => {
                        super::metadata::QosProfiles::from_yaml(text)
                            .map_err(|e| {
                                self.corrupt(at, format!("channel {}: bad offered_qos_profiles: {e}", c.topic))
                            })?
                            .0
                    }
                    None => Vec::new(),
                };
                let channel = Channel { topic: c.topic, type_name, schema, schema_encoding, offered_qos };
                self.channels.insert(c.id, Arc::new(channel));
            }
            Record::Message { header, data } => {
                let m = self.message(at, header, data.into_owned())?;
                self.pending.push_back(m);
            }
            Record::Chunk { header, data } => {
                // Uncompressed, its records are in the file as they are: each is named by its own
                // offset (opcode, length, then the chunk's times, sizes, CRC and compression name).
                let records_at = at + 1 + 8 + 8 + 8 + 8 + 4 + 4 + header.compression.len() as u64 + 8;
                let inner_at = if header.compression.is_empty() { record_offsets(&data) } else { Vec::new() };
                let reader =
                    mcap::read::ChunkReader::new(header, &data).map_err(|e| self.corrupt(at, format!("chunk: {e}")))?;
                for (i, inner) in reader.enumerate() {
                    let inner = inner.map_err(|e| self.corrupt(at, format!("in the chunk: {e}")))?;
                    if matches!(inner, Record::Chunk { .. }) {
                        return Err(self.corrupt(at, "a chunk inside a chunk".into()));
                    }
                    self.take(inner_at.get(i).map_or(at, |o| records_at + o), inner)?;
                }
            }
            Record::Footer(_) => self.done = true,
            _ => {}
        }
        Ok(())
    }

    fn message(&self, at: u64, header: mcap::records::MessageHeader, data: Vec<u8>) -> Result<BagMessage, BagError> {
        let channel = self
            .channels
            .get(&header.channel_id)
            .cloned()
            .ok_or_else(|| self.corrupt(at, format!("message on unknown channel {}", header.channel_id)))?;
        Ok(BagMessage { channel, log_time: header.log_time, data, file: self.file.clone(), offset: at })
    }
}

/// Where each record starts in a run of MCAP records (opcode, u64 length, body).
fn record_offsets(records: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some(len) = records.get(pos + 1..pos + 9).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
        out.push(pos as u64);
        pos = match usize::try_from(len).ok().and_then(|l| pos.checked_add(9)?.checked_add(l)) {
            Some(next) => next,
            None => break,
        };
    }
    out
}

impl Iterator for McapStream {
    type Item = Result<BagMessage, BagError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.advance() {
            self.done = true;
            self.pending.clear();
            return Some(Err(e));
        }
        self.pending.pop_front().map(Ok)
    }
}
