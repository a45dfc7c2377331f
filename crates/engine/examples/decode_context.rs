//! Decode time per token against the context length: for each context C, every layer's KV cache
//! is filled with C rows (synthetic values: attention costs the same whatever they hold), then
//! `steps` greedy decode steps run (embed, every layer, LM head, sampling), each timed.
//!
//!     cargo run --release -p aerokv-engine --example decode_context -- [variant] [contexts] [steps] [threads]
//!     (defaults: q4 64,512,2048,4096 32 1)
//!
//! Prints one JSON object per context: wall and on-CPU time per token (median and mean, ms), and
//! per layer. On-CPU time is this thread's (`/proc/thread-self/schedstat`): with one ONNX Runtime
//! thread all compute runs here, and it leaves out the time the thread waited for a core, which
//! makes A/B comparisons on a busy machine meaningful.
use std::time::Instant;

use aerokv_engine::{models_root, KvRows, LayerRows, Model, Runtime, RuntimeConfig, Sampler, Sampling, SplitMix64};

fn on_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v.iter().sum::<f64>() / v.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map(String::as_str).unwrap_or("q4");
    let contexts: Vec<usize> = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("64,512,2048,4096")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let threads: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt = Runtime::init(RuntimeConfig::with_threads(threads))?;
    let mut model = Model::load(&rt, models_root().join(variant))?;
    let arch = model.manifest.architecture.clone();
    let layers = arch.layers;
    let mut rng = SplitMix64::new(7);
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n).map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5).collect()
    };
    for &context in &contexts {
        model.shard.reset();
        let n = arch.kv_heads * context * arch.head_dim;
        let rows = KvRows {
            token_start: 0,
            tokens: context,
            kv_heads: arch.kv_heads,
            head_dim: arch.head_dim,
            layers: (0..layers).map(|layer| LayerRows { layer, key: noise(n), value: noise(n) }).collect(),
        };
        model.shard.import_kv(&rows)?;
        drop(rows);
        let mut sampler = Sampler::new(Sampling::Greedy);
        let mut next = 28; // any token
        let (mut wall, mut cpu, mut layer_wall) = (Vec::new(), Vec::new(), Vec::new());
        for step in 0..steps + 2 {
            let (t, c) = (Instant::now(), on_cpu_ns());
            let h = model.gateway.embed(&[next])?;
            let h = model.shard.forward(&h, context + step)?;
            next = sampler.sample(&model.gateway.logits(&h)?)?;
            // the first two steps warm the caches up
            if step >= 2 {
                wall.push(t.elapsed().as_secs_f64() * 1e3);
                cpu.push((on_cpu_ns() - c) as f64 / 1e6);
                layer_wall.push(model.shard.last_compute().as_secs_f64() * 1e3 / layers as f64);
            }
        }
        let ((wall_p50, wall_mean), (cpu_p50, cpu_mean), (layer_p50, _)) =
            (stats(wall), stats(cpu), stats(layer_wall));
        println!(
            "{{\"variant\": \"{variant}\", \"context\": {context}, \"steps\": {steps}, \"ms_per_token_p50\": {wall_p50:.3}, \
             \"ms_per_token_mean\": {wall_mean:.3}, \"cpu_ms_per_token_p50\": {cpu_p50:.3}, \"cpu_ms_per_token_mean\": {cpu_mean:.3}, \
             \"ms_per_layer_p50\": {layer_p50:.4}}}"
        );
    }
    Ok(())
}
