//! Process-wide ONNX Runtime: loaded once from `ORT_DYLIB_PATH`, one global intra-op thread pool,
//! one set of session options for every session, without a memory arena.
//!
//! Why global: with one pool per session, 32 per-layer sessions ran at 1.7 tok/s instead of 33
//! (docs/design.md §7). Why one set of options: a replica or a replay must compute bit-identical KV
//! to the drone it stands in for, so every executor must run the same kernels (docs/design.md §3).
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::ep;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use crate::error::{EngineError, Result};

/// Settings that must be identical on every executor of a swarm for exactness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Threads of the global intra-op pool (1 = run on the calling thread).
    pub threads: usize,
    /// ONNX Runtime shared library; `None` = `$ORT_DYLIB_PATH`.
    pub dylib_path: Option<PathBuf>,
    /// ONNX Runtime graph optimisation level (0 = none, 1 = basic, 2 = extended, 3 = layout, 99 = all).
    pub optimization_level: u8,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { threads: 1, dylib_path: None, optimization_level: 99 }
    }
}

impl RuntimeConfig {
    /// A default config with `threads` intra-op threads.
    pub fn with_threads(threads: usize) -> Self {
        RuntimeConfig { threads, ..Default::default() }
    }

    fn describe(&self) -> String {
        format!("threads={} optimization_level={}", self.threads, self.optimization_level)
    }

    fn graph_level(&self) -> Result<GraphOptimizationLevel> {
        Ok(match self.optimization_level {
            0 => GraphOptimizationLevel::Disable,
            1 => GraphOptimizationLevel::Level1,
            2 => GraphOptimizationLevel::Level2,
            3 => GraphOptimizationLevel::Level3,
            99 => GraphOptimizationLevel::All,
            other => {
                return Err(EngineError::InvalidInput(format!(
                    "optimization level {other} (expected 0, 1, 2, 3 or 99)"
                )))
            }
        })
    }
}

/// Handle on the process-wide ONNX Runtime. Cheap to clone; every clone shares the same
/// environment and thread pool.
#[derive(Clone)]
pub struct Runtime {
    env: ort::environment::Environment,
    config: RuntimeConfig,
    dylib_path: PathBuf,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("config", &self.config).field("dylib_path", &self.dylib_path).finish()
    }
}

static GLOBAL: Mutex<Option<Runtime>> = Mutex::new(None);

impl Runtime {
    /// Initialises ONNX Runtime once per process. A second call with the same settings returns the
    /// same runtime; with other settings it fails with [`EngineError::RuntimeConfigMismatch`].
    pub fn init(config: RuntimeConfig) -> Result<Runtime> {
        if config.threads == 0 {
            return Err(EngineError::InvalidInput("runtime threads must be at least 1".into()));
        }
        // Reject a bad level before touching the process-wide state.
        config.graph_level()?;
        let mut global = GLOBAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = global.as_ref() {
            let same_path = config.dylib_path.as_ref().is_none_or(|p| *p == existing.dylib_path);
            if existing.config.threads == config.threads
                && existing.config.optimization_level == config.optimization_level
                && same_path
            {
                return Ok(existing.clone());
            }
            return Err(EngineError::RuntimeConfigMismatch {
                existing: existing.config.describe(),
                requested: config.describe(),
            });
        }
        let dylib_path = match &config.dylib_path {
            Some(p) => p.clone(),
            None => match std::env::var_os("ORT_DYLIB_PATH") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => {
                    return Err(EngineError::RuntimeLoad {
                        path: PathBuf::from("$ORT_DYLIB_PATH"),
                        reason: "ORT_DYLIB_PATH is not set".into(),
                    })
                }
            },
        };
        if !dylib_path.is_file() {
            return Err(EngineError::RuntimeLoad { path: dylib_path, reason: "no such file".into() });
        }
        let builder = ort::init_from(&dylib_path)
            .map_err(|e| EngineError::RuntimeLoad { path: dylib_path.clone(), reason: e.to_string() })?;
        let pool = ort::environment::GlobalThreadPoolOptions::default()
            .with_intra_threads(config.threads)
            .and_then(|p| p.with_inter_threads(1))
            // Spinning burns the core that a concurrent shard (or the other executors on this
            // machine) would use; per-token work is short and bursty.
            .and_then(|p| p.with_spin_control(false))
            .map_err(|e| EngineError::ort("configuring the global thread pool", e))?;
        let env = builder
            .with_name("aerokv")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| EngineError::ort("creating the environment", e))?;
        tracing::info!(path = %dylib_path.display(), threads = config.threads, "ONNX Runtime initialised");
        let runtime = Runtime { env, config, dylib_path };
        *global = Some(runtime.clone());
        Ok(runtime)
    }

    /// The runtime if [`Runtime::init`] has run in this process.
    pub fn get() -> Option<Runtime> {
        GLOBAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The settings every session of this process uses.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Opens an ONNX file with the process-wide session options. A file ONNX Runtime cannot load
    /// is reported as corrupt (its size was already checked against the manifest).
    // ort's builder errors carry the builder back (large); they are mapped at once.
    #[allow(clippy::result_large_err)]
    pub(crate) fn open_session(&self, path: &Path) -> Result<Session> {
        if !path.is_file() {
            return Err(EngineError::MissingFile { path: path.to_path_buf() });
        }
        let level = self.config.graph_level()?;
        let builder = Session::builder(&self.env).map_err(|e| EngineError::ort("creating session options", e))?;
        let builder = builder
            .with_optimization_level(level)
            .and_then(|b| b.with_memory_pattern(true))
            // One intra-op thread per session would be ignored anyway (global pool); set it so the
            // options read the same everywhere.
            .and_then(|b| b.with_inter_threads(1))
            // No CPU arena: an arena keeps its session's peak, and a model is one session per
            // layer, so a long prompt's attention scores stayed allocated in every layer (10 GB
            // of RSS and 3.5x the prefill time at 1,611 tokens; decode speed is the same).
            .and_then(|b| b.with_execution_providers([ep::CPU::default().with_arena_allocator(false).build()]))
            .map_err(|e| EngineError::ort("setting session options", e))?;
        let mut builder = builder;
        builder.commit_from_file(path).map_err(|e| EngineError::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("ONNX Runtime cannot load it: {e}"),
        })
    }
}
