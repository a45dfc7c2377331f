//! The one error type of the engine. Every variant carries enough context to act on it:
//! which file, which interval, which limit.
use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine. Nothing in the engine panics on bad files or bad
/// user input; it returns one of these.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model part named by the manifest (or the manifest itself) does not exist.
    #[error("model part {path} is missing: run `make setup` to generate the model parts")]
    MissingFile { path: PathBuf },

    /// A model part exists but is not what the manifest says (size, sha256, or ONNX Runtime cannot load it).
    #[error("model part {path} is corrupt ({reason}): run `make setup` to repair it")]
    CorruptFile { path: PathBuf, reason: String },

    /// `manifest.json` cannot be parsed or is inconsistent.
    #[error("manifest {path} is invalid ({reason}): run `make setup` to regenerate it")]
    InvalidManifest { path: PathBuf, reason: String },

    /// Reading a file failed for another reason than absence (permissions, I/O).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The requested layer interval does not start and end on file boundaries of this variant.
    #[error("layer interval [{start}, {end}) of variant `{variant}` does not fall on file boundaries: {detail}")]
    MisalignedInterval { start: usize, end: usize, variant: String, detail: String },

    /// The requested layer interval is empty or outside `[0, layers)`.
    #[error("layer interval [{start}, {end}) is empty or outside the model's {layers} layers")]
    IntervalOutOfRange { start: usize, end: usize, layers: usize },

    /// A prompt (or a forward call) would exceed the model's context limit.
    #[error("{what} needs {tokens} tokens but the context limit is {limit} tokens")]
    ContextOverflow { what: String, tokens: usize, limit: usize },

    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("cannot load ONNX Runtime from {path}: {reason} (set ORT_DYLIB_PATH, e.g. `source scripts/env.sh`)")]
    RuntimeLoad { path: PathBuf, reason: String },

    /// The process-wide runtime was already initialised with other settings (exactness depends on
    /// every session using the same ones).
    #[error("ONNX Runtime was already initialised with {existing}; cannot re-initialise with {requested}")]
    RuntimeConfigMismatch { existing: String, requested: String },

    /// An ONNX Runtime call failed.
    #[error("ONNX Runtime failed while {context}: {message}")]
    Ort { context: String, message: String },

    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A call's arguments do not fit the shard or the model (shape, position, layer range).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Imported KV rows do not fit this shard (layers, positions, shapes).
    #[error("KV rows do not fit this shard: {0}")]
    KvMismatch(String),

    /// Sampling parameters are out of range.
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
}

impl EngineError {
    pub(crate) fn ort(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        EngineError::Ort { context: context.into(), message: err.to_string() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            EngineError::MissingFile { path }
        } else {
            EngineError::Io { path, source }
        }
    }
}
