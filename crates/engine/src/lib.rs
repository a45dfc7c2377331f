//! # aerokv-engine
//!
//! The AeroKV shard engine: SmolLM2-135M-Instruct split into ONNX layer files
//! (docs/model-format.md), run with ONNX Runtime, with explicit per-layer KV caches. Pure Rust,
//! no ROS: the ROS nodes are thin adapters over this API (docs/design.md §2).
//!
//! ## Pieces
//!
//! | type | what |
//! | --- | --- |
//! | [`Runtime`] | process-wide ONNX Runtime (one global intra-op pool, one set of session options) |
//! | [`Manifest`] | a variant directory's `manifest.json`: files, layer intervals, shapes, sha256 |
//! | [`Shard`] | layers `[start, end)`: `forward`, per-layer [`LayerKv`], `export_kv`/`import_kv`, `truncate` |
//! | [`Hidden`] | the `[S, 576]` hidden states that cross between shards |
//! | [`KvRows`] | a KV snapshot (rows of some layers for a token range) |
//! | [`Gateway`] | tokenizer, chat template, `embed`, `logits` (LM head), stop tokens |
//! | [`Detokenizer`] | streaming text deltas from token ids |
//! | [`Sampler`] / [`Sampling`] | greedy, or temperature + top-p with a seed |
//! | [`Model`] | gateway + all layers and the `generate` loop (what `aerokv generate` runs) |
//! | [`prompt_chunks`] | the steps a prompt is fed in (at most [`PREFILL_CHUNK_TOKENS`] tokens each) |
//! | [`EngineError`] | the one error type; every variant names the file, interval or limit |
//!
//! ## A pipeline by hand
//!
//! ```no_run
//! use aerokv_engine::{models_root, prompt_chunks, Gateway, Manifest, Runtime, RuntimeConfig, Sampler, Sampling, Shard};
//!
//! # fn main() -> aerokv_engine::Result<()> {
//! let runtime = Runtime::init(RuntimeConfig::with_threads(1))?; // once per process
//! let manifest = Manifest::load_variant(models_root(), "q4")?;
//! let mut gateway = Gateway::load(&runtime, &manifest)?;
//! // Two stages, as two drones would hold them; any split on file boundaries works.
//! let mut first = Shard::load(&runtime, &manifest, 0..12)?;
//! let mut second = Shard::load(&runtime, &manifest, 12..30)?;
//!
//! let prompt = gateway.encode_chat("What is a drone?")?;
//! let mut sampler = Sampler::new(Sampling::Greedy);
//! // The prompt in steps of at most PREFILL_CHUNK_TOKENS, then one token per step.
//! let mut hidden = None;
//! for (position, ids) in prompt_chunks(&prompt) {
//!     let h = first.forward(&gateway.embed(ids)?, position)?; // appends KV rows to layers 0..12
//!     hidden = Some(second.forward(&h, position)?);           // ... and to layers 12..30
//! }
//! let mut next = sampler.sample(&gateway.logits(&hidden.expect("a prompt"))?)?;
//! let mut position = prompt.len();
//! for _ in 0..16 {
//!     if gateway.is_stop(next) { break; }
//!     let h = first.forward(&gateway.embed(&[next])?, position)?;
//!     let h = second.forward(&h, position)?;
//!     next = sampler.sample(&gateway.logits(&h)?)?;
//!     position += 1;
//! }
//! # Ok(()) }
//! ```
//!
//! ## Recovery (docs/design.md §3)
//!
//! ```no_run
//! # use aerokv_engine::*;
//! # fn f(runtime: &Runtime, manifest: &Manifest, failed_tail: &Shard, buffered: Vec<Hidden>) -> Result<()> {
//! // On the failed drone, every T tokens: a boundary snapshot of its tail layers.
//! let snapshot: KvRows = failed_tail.export_kv(20..30, 0..failed_tail.kv_len())?;
//! // On the successor: load the same layers, restore, replay the buffered inputs one chunk at a
//! // time exactly as the failed drone saw them (batching them would change the floats).
//! let mut tail = Shard::load(runtime, manifest, 20..30)?;
//! tail.import_kv(&snapshot)?;
//! let mut position = tail.kv_len();
//! for chunk in &buffered {
//!     tail.forward(chunk, position)?;
//!     position += chunk.tokens();
//! }
//! # Ok(()) }
//! ```
//!
//! ## Exactness
//!
//! Every session in a process is created by [`Runtime`] with the same options (graph
//! optimisation level, one global intra-op pool of `threads` threads). With the same variant,
//! files, settings and chunking, a layer computes bit-identical outputs wherever it runs: running
//! `[0, 30)` in one shard or as `[0,7)+[7,15)+...` gives the same bits (tested). Run every
//! executor of a swarm with the same [`RuntimeConfig`].
//!
//! ## Finding the model and the runtime
//!
//! [`models_root`]: `$AEROKV_MODELS`, else `models/generated`. The ONNX Runtime library:
//! [`RuntimeConfig::dylib_path`], else `$ORT_DYLIB_PATH` (`source scripts/env.sh`). A missing or
//! corrupt part is an [`EngineError::MissingFile`] / [`EngineError::CorruptFile`] naming the file
//! and saying to run `make setup`.
pub mod error;
pub mod gateway;
pub mod manifest;
pub mod model;
pub mod runtime;
pub mod sampling;
pub mod shard;

pub use error::{EngineError, Result};
pub use gateway::{Detokenizer, Gateway, PromptEncoder};
pub use manifest::{
    models_root, Architecture, FileEntry, FileKind, IntegrityReport, LayerFile, Manifest, SpecialTokens,
    DEFAULT_VARIANT, INTEGRITY_CACHE, MANIFEST_FORMAT,
};
pub use model::{prompt_chunks, FinishReason, GenerateOptions, Generation, Model, TokenEvent, PREFILL_CHUNK_TOKENS};
pub use runtime::{Runtime, RuntimeConfig};
pub use sampling::{argmax, Sampler, Sampling, SplitMix64};
pub use shard::{Hidden, KvRows, LayerKv, LayerRows, Shard, ShardMemory};

// The ROS nodes move shards and the gateway into executor tasks.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Shard>();
    assert_send::<Gateway>();
    assert_send::<Model>();
    assert_send::<KvRows>();
};
