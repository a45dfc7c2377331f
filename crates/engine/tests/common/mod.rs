//! Shared test helpers: locate the generated models and ONNX Runtime, or fail loudly.
#![allow(dead_code)]
use std::path::PathBuf;

use aerokv_engine::{Gateway, Hidden, Manifest, Runtime, RuntimeConfig, Sampler, Sampling, Shard};

/// `$AEROKV_MODELS`, else the workspace's models/generated.
pub fn models_root() -> PathBuf {
    match std::env::var_os("AEROKV_MODELS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/generated"),
    }
}

/// The variant's manifest; panics (fails the test) if the parts were never generated.
pub fn manifest(variant: &str) -> Manifest {
    let dir = models_root().join(variant);
    match Manifest::load(&dir) {
        Ok(m) => m,
        Err(e) => panic!(
            "model variant `{variant}` not usable in {}: {e}\n=> run `make setup` to generate the model parts",
            dir.display()
        ),
    }
}

/// The process-wide runtime (1 thread), from `$ORT_DYLIB_PATH` or the workspace venv.
pub fn runtime() -> Runtime {
    let path = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1")
    });
    if !path.is_file() {
        panic!(
            "ONNX Runtime not found at {}: set ORT_DYLIB_PATH (`source scripts/env.sh`) or run `make setup`",
            path.display()
        );
    }
    Runtime::init(RuntimeConfig { dylib_path: Some(path), ..RuntimeConfig::with_threads(1) })
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Loads consecutive shards with the given layer counts (e.g. [7, 8, 7, 8]).
pub fn shards(rt: &Runtime, m: &Manifest, sizes: &[usize]) -> Vec<Shard> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let s = Shard::load(rt, m, start..start + n).unwrap_or_else(|e| panic!("{e}"));
            start += n;
            s
        })
        .collect()
}

/// What a pipeline run produced: greedy tokens, and per chunk the input and output of every stage.
pub struct Trace {
    pub tokens: Vec<u32>,
    /// `stage_io[chunk][stage]` = (input, output) hidden states.
    pub stage_io: Vec<Vec<(Hidden, Hidden)>>,
    /// Absolute position of each chunk.
    pub positions: Vec<usize>,
}

/// Prefill `prompt` as one chunk, then `steps` greedy steps of one token, through `shards` in order.
pub fn run_pipeline(gw: &mut Gateway, shards: &mut [Shard], prompt: &[u32], steps: usize) -> Trace {
    run_pipeline_with(gw, shards, prompt, steps, |_, _| {})
}

/// [`run_pipeline`], calling `after_chunk(chunk_index, shards)` after every chunk (e.g. to snapshot).
pub fn run_pipeline_with(
    gw: &mut Gateway,
    shards: &mut [Shard],
    prompt: &[u32],
    steps: usize,
    mut after_chunk: impl FnMut(usize, &mut [Shard]),
) -> Trace {
    let mut sampler = Sampler::new(Sampling::Greedy);
    let mut trace = Trace { tokens: Vec::new(), stage_io: Vec::new(), positions: Vec::new() };
    let mut chunk = prompt.to_vec();
    let mut position = 0;
    for _ in 0..=steps {
        let mut h = gw.embed(&chunk).unwrap();
        let mut io = Vec::new();
        for s in shards.iter_mut() {
            let out = s.forward(&h, position).unwrap();
            io.push((h, out.clone()));
            h = out;
        }
        let next = sampler.sample(&gw.logits(&h).unwrap()).unwrap();
        trace.stage_io.push(io);
        trace.positions.push(position);
        trace.tokens.push(next);
        after_chunk(trace.positions.len() - 1, shards);
        position += chunk.len();
        chunk = vec![next];
    }
    trace
}

/// The final hidden state of every chunk.
pub fn final_hidden(t: &Trace) -> Vec<&Hidden> {
    t.stage_io.iter().map(|io| &io.last().unwrap().1).collect()
}

pub fn assert_bit_identical(a: &[&Hidden], b: &[&Hidden], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: chunk counts differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.bit_identical(y), "{what}: hidden states of chunk {i} differ");
    }
}
