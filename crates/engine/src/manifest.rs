//! `manifest.json` of one model variant (docs/model-format.md): load, validate, verify.
//!
//! Every load checks the sha256 of the files it opens ([`Manifest::check_files`]). A file found
//! good is remembered by its identity (device, inode, size, modification and change times) in
//! the process and in `<variant>/.integrity-cache.json`; while that identity stands, the next
//! check is a `stat`. Any write to the file changes its change time, so a modified file is always
//! hashed again.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// The manifest format this engine understands.
pub const MANIFEST_FORMAT: u32 = 2;

/// Default variant (exact 4-bit weights, float32 activations).
pub const DEFAULT_VARIANT: &str = "q4";

/// Root of the generated model parts: `$AEROKV_MODELS`, else `models/generated` (relative to the
/// working directory).
pub fn models_root() -> PathBuf {
    match std::env::var_os("AEROKV_MODELS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("models/generated"),
    }
}

/// Model shape, as written by the converter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Architecture {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub max_context: usize,
}

impl Architecture {
    /// KV bytes one token occupies in one layer (K and V, float32).
    pub fn kv_bytes_per_token_per_layer(&self) -> u64 {
        (2 * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()) as u64
    }
}

/// Special token ids (from the GGUF metadata).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SpecialTokens {
    #[serde(default)]
    pub bos: Option<u32>,
    pub eos: u32,
    #[serde(default)]
    pub im_start: Option<u32>,
    #[serde(default)]
    pub im_end: Option<u32>,
    #[serde(default)]
    pub pad: Option<u32>,
}

impl SpecialTokens {
    /// Ids that end a generation: EOS and, for chat models, `<|im_end|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos];
        if let Some(im_end) = self.im_end {
            if im_end != self.eos {
                ids.push(im_end);
            }
        }
        ids
    }
}

/// What a file of the variant holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Embed,
    Layers,
    Head,
    Tokenizer,
    /// Anything a newer converter adds; ignored by this engine.
    #[serde(other)]
    Other,
}

/// One file of the variant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    /// First layer (layers files only).
    #[serde(default)]
    pub start: Option<usize>,
    /// One past the last layer (layers files only).
    #[serde(default)]
    pub end: Option<usize>,
    pub bytes: u64,
    pub sha256: String,
    /// Bytes of weights the file holds (layers files; falls back to `bytes`).
    #[serde(default)]
    pub weight_bytes: Option<u64>,
}

/// A layers file with its interval checked.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFile {
    pub name: String,
    pub start: usize,
    pub end: usize,
    pub bytes: u64,
    pub weight_bytes: u64,
    pub sha256: String,
}

/// The parsed and validated `manifest.json` of one variant directory.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The variant directory the manifest was read from.
    pub dir: PathBuf,
    pub format: u32,
    pub model: String,
    pub variant: String,
    pub architecture: Architecture,
    pub tokens: SpecialTokens,
    /// Chat template with a `{user}` placeholder.
    pub chat_template: String,
    pub files: Vec<FileEntry>,
    /// The layers files, sorted by `start`, covering `[0, layers)` without gap or overlap.
    pub layer_files: Vec<LayerFile>,
}

#[derive(Deserialize)]
struct RawManifest {
    format: u32,
    model: String,
    variant: String,
    architecture: Architecture,
    tokens: SpecialTokens,
    chat_template: String,
    files: Vec<FileEntry>,
}

impl Manifest {
    /// Reads `<variant_dir>/manifest.json` and validates it (no file hashing; see [`Manifest::verify_files`]).
    pub fn load(variant_dir: impl AsRef<Path>) -> Result<Manifest> {
        let dir = variant_dir.as_ref().to_path_buf();
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let raw: RawManifest = serde_json::from_str(&text)
            .map_err(|e| EngineError::InvalidManifest { path: path.clone(), reason: e.to_string() })?;
        Self::from_raw(dir, path, raw)
    }

    /// `models_root()/<variant>`.
    pub fn load_variant(root: impl AsRef<Path>, variant: &str) -> Result<Manifest> {
        Self::load(root.as_ref().join(variant))
    }

    fn from_raw(dir: PathBuf, path: PathBuf, raw: RawManifest) -> Result<Manifest> {
        let invalid = |reason: String| EngineError::InvalidManifest { path: path.clone(), reason };
        if raw.format != MANIFEST_FORMAT {
            return Err(invalid(format!("format {} (this engine reads format {MANIFEST_FORMAT})", raw.format)));
        }
        let a = &raw.architecture;
        if a.layers == 0 || a.hidden == 0 || a.heads == 0 || a.kv_heads == 0 || a.head_dim == 0 || a.vocab == 0 {
            return Err(invalid("architecture has a zero dimension".into()));
        }
        if !a.heads.is_multiple_of(a.kv_heads) {
            return Err(invalid(format!("heads {} not a multiple of kv_heads {}", a.heads, a.kv_heads)));
        }
        if a.max_context == 0 {
            return Err(invalid("max_context is 0".into()));
        }
        if (raw.tokens.eos as usize) >= a.vocab {
            return Err(invalid(format!("eos id {} outside vocab {}", raw.tokens.eos, a.vocab)));
        }
        if !raw.chat_template.contains("{user}") {
            return Err(invalid("chat_template has no {user} placeholder".into()));
        }
        for f in &raw.files {
            // File names are joined to the variant dir: refuse anything that could escape it.
            if f.name.is_empty() || f.name.contains('/') || f.name.contains('\\') || f.name.starts_with('.') {
                return Err(invalid(format!("file name {:?} is not a plain file name", f.name)));
            }
        }
        for kind in [FileKind::Embed, FileKind::Head, FileKind::Tokenizer] {
            let count = raw.files.iter().filter(|f| f.kind == kind).count();
            if count != 1 {
                return Err(invalid(format!("expected exactly one {kind:?} file, found {count}")));
            }
        }
        let mut layer_files = Vec::new();
        for f in raw.files.iter().filter(|f| f.kind == FileKind::Layers) {
            let (Some(start), Some(end)) = (f.start, f.end) else {
                return Err(invalid(format!("layers file {} has no start/end", f.name)));
            };
            if start >= end {
                return Err(invalid(format!("layers file {} has empty interval [{start}, {end})", f.name)));
            }
            layer_files.push(LayerFile {
                name: f.name.clone(),
                start,
                end,
                bytes: f.bytes,
                weight_bytes: f.weight_bytes.unwrap_or(f.bytes),
                sha256: f.sha256.clone(),
            });
        }
        layer_files.sort_by_key(|f| f.start);
        let mut next = 0;
        for f in &layer_files {
            if f.start != next {
                return Err(invalid(format!(
                    "layers files do not tile [0, {}): {} starts at {} but layer {next} is expected",
                    a.layers, f.name, f.start
                )));
            }
            next = f.end;
        }
        if next != a.layers {
            return Err(invalid(format!("layers files cover [0, {next}) but the model has {} layers", a.layers)));
        }
        Ok(Manifest {
            dir,
            format: raw.format,
            model: raw.model,
            variant: raw.variant,
            architecture: raw.architecture,
            tokens: raw.tokens,
            chat_template: raw.chat_template,
            files: raw.files,
            layer_files,
        })
    }

    /// Absolute path of a file of this variant.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The single file of a kind (embed, head, tokenizer).
    pub fn file_of_kind(&self, kind: FileKind) -> Result<&FileEntry> {
        self.files.iter().find(|f| f.kind == kind).ok_or_else(|| EngineError::InvalidManifest {
            path: self.dir.join("manifest.json"),
            reason: format!("no {kind:?} file"),
        })
    }

    /// The layers files exactly covering `[start, end)`, or a typed error naming the files that the
    /// interval would cut.
    pub fn layer_files_for(&self, start: usize, end: usize) -> Result<&[LayerFile]> {
        let layers = self.architecture.layers;
        if start >= end || end > layers {
            return Err(EngineError::IntervalOutOfRange { start, end, layers });
        }
        let first = self.layer_files.iter().position(|f| f.start == start);
        let last = self.layer_files.iter().position(|f| f.end == end);
        match (first, last) {
            (Some(i), Some(j)) if i <= j => Ok(&self.layer_files[i..=j]),
            _ => {
                let cut: Vec<String> = self
                    .layer_files
                    .iter()
                    .filter(|f| (f.start < start && start < f.end) || (f.start < end && end < f.end))
                    .map(|f| format!("{} holds [{}, {})", f.name, f.start, f.end))
                    .collect();
                Err(EngineError::MisalignedInterval {
                    start,
                    end,
                    variant: self.variant.clone(),
                    detail: cut.join("; "),
                })
            }
        }
    }

    /// Weights and KV cost of `[start, end)` from the manifest alone (no loading), for planning
    /// before a shard exists. [`crate::Shard::memory_bytes`] adds what the load really took.
    pub fn interval_memory(&self, start: usize, end: usize) -> Result<crate::shard::ShardMemory> {
        let files = self.layer_files_for(start, end)?;
        Ok(crate::shard::ShardMemory {
            weight_bytes: files.iter().map(|f| f.weight_bytes).sum(),
            kv_bytes_per_token: self.architecture.kv_bytes_per_token_per_layer() * (end - start) as u64,
            kv_bytes: 0,
            kv_reserved_bytes: 0,
            loaded_rss_bytes: 0,
        })
    }

    /// Intervals this variant can load: every boundary between files.
    pub fn layer_boundaries(&self) -> Vec<usize> {
        let mut b: Vec<usize> = self.layer_files.iter().map(|f| f.start).collect();
        b.push(self.architecture.layers);
        b
    }

    /// Checks that every file exists with the manifest's size (cheap; done on every load).
    pub fn check_sizes(&self) -> Result<()> {
        for f in &self.files {
            check_size(&self.path_of(&f.name), f.bytes)?;
        }
        Ok(())
    }

    /// Checks size and sha256 of the named files against the manifest, hashing only those whose
    /// identity changed since they were last found good (see the module documentation). The
    /// first bad file is the error, named. Logs and returns what the check cost.
    pub fn check_files<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<IntegrityReport> {
        let started = Instant::now();
        let cache_path = self.dir.join(INTEGRITY_CACHE);
        let mut report = IntegrityReport::default();
        let mut disk: Option<BTreeMap<String, GoodFile>> = None;
        let mut found = Vec::new();
        for name in names {
            let entry = self.files.iter().find(|f| f.name == name).ok_or_else(|| EngineError::InvalidManifest {
                path: self.dir.join("manifest.json"),
                reason: format!("no file {name}"),
            })?;
            let path = self.path_of(name);
            check_size(&path, entry.bytes)?;
            let identity = FileIdentity::of(&path)?;
            let good = GoodFile { identity, sha256: entry.sha256.to_ascii_lowercase() };
            report.files += 1;
            if verified().lock().unwrap_or_else(|e| e.into_inner()).get(&path) == Some(&good) {
                continue;
            }
            let cached = disk.get_or_insert_with(|| read_cache(&cache_path));
            if cached.get(name) != Some(&good) {
                verify_file(&path, entry.bytes, &entry.sha256)?;
                report.hashed_files += 1;
                report.hashed_bytes += entry.bytes;
                found.push((name.to_string(), good.clone()));
            }
            verified().lock().unwrap_or_else(|e| e.into_inner()).insert(path, good);
        }
        if let (Some(mut cache), false) = (disk, found.is_empty()) {
            cache.extend(found);
            // A read-only model directory only costs the next process its hashing.
            if let Err(e) = write_cache(&cache_path, &cache) {
                tracing::warn!(path = %cache_path.display(), "cannot write the integrity cache: {e}");
            }
        }
        report.elapsed = started.elapsed();
        if report.hashed_files > 0 {
            tracing::info!(variant = %self.variant, files = report.files, hashed_files = report.hashed_files,
                hashed_mb = report.hashed_bytes as f64 / 1e6, ms = report.elapsed.as_secs_f64() * 1e3,
                "model files checked against the manifest (sha256)");
        } else {
            tracing::debug!(variant = %self.variant, files = report.files, ms = report.elapsed.as_secs_f64() * 1e3,
                "model files unchanged since found good");
        }
        Ok(report)
    }

    /// Checks size and sha256 of every file (reads all bytes; a few hundred MB for fp32).
    pub fn verify_files(&self) -> Result<()> {
        for f in &self.files {
            verify_file(&self.path_of(&f.name), f.bytes, &f.sha256)?;
        }
        Ok(())
    }
}

/// The integrity cache of a variant directory (not a manifest file: those never start with '.').
pub const INTEGRITY_CACHE: &str = ".integrity-cache.json";

/// What a [`Manifest::check_files`] cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IntegrityReport {
    pub files: usize,
    /// Files whose identity had changed (or was new), read and hashed.
    pub hashed_files: usize,
    pub hashed_bytes: u64,
    pub elapsed: Duration,
}

/// What identifies a file's content without reading it: any write changes the change time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(path: &Path) -> Result<FileIdentity> {
        let m = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A file found to have the manifest's sha256 while it had this identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GoodFile {
    identity: FileIdentity,
    sha256: String,
}

/// Files this process has found good, by path.
fn verified() -> &'static Mutex<BTreeMap<PathBuf, GoodFile>> {
    static VERIFIED: OnceLock<Mutex<BTreeMap<PathBuf, GoodFile>>> = OnceLock::new();
    VERIFIED.get_or_init(Mutex::default)
}

/// The cache file's entries; an unreadable or garbled cache is an empty one (it only saves work).
fn read_cache(path: &Path) -> BTreeMap<String, GoodFile> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Written beside the cache and renamed over it: readers see the old or the new file, whole.
fn write_cache(path: &Path, cache: &BTreeMap<String, GoodFile>) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(cache).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn check_size(path: &Path, expected: u64) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
    if meta.len() != expected {
        return Err(EngineError::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("{} bytes, manifest says {expected}", meta.len()),
        });
    }
    Ok(())
}

pub(crate) fn verify_file(path: &Path, bytes: u64, sha256: &str) -> Result<()> {
    check_size(path, bytes)?;
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if !digest.eq_ignore_ascii_case(sha256) {
        return Err(EngineError::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("sha256 {digest}, manifest says {sha256}"),
        });
    }
    Ok(())
}
