//! Decode time per token against the context length, for one or more variants: for each context
//! C, every layer's KV cache is filled with C rows (synthetic values: attention costs the same
//! whatever they hold), then `steps` greedy decode steps run (embed, every layer, LM head,
//! sampling), each timed.
//!
//!     cargo run --release -p aerokv-engine --example decode_context -- [variants] [contexts] [steps] [threads]
//!         [--png FILE] [--series NAME=FILE ...]
//!     (defaults: q4 64,512,2048,4096 32 1)
//!
//! Prints one JSON object per variant and context: wall and on-CPU time per token (median and
//! mean, ms), per layer, and `kv_stream_ms`: the time to read once through as many bytes as the
//! KV caches hold at that context (a plain sum over a buffer of that size, measured right after):
//! what attention must read per token at least, whatever the kernel. On-CPU time is this
//! thread's (`/proc/thread-self/schedstat`): with one ONNX Runtime thread all compute runs here,
//! and it leaves out the time the thread waited for a core (A/B comparisons on a busy machine).
//! `kv_reserved_mb` is what the caches allocated (capacity = the model's max context here) and
//! `rss_mb` the process's resident set after the steps: pages become resident as rows are written.
//! `--png` draws ms per token (median wall) against the context for every variant, plus each
//! `--series` file (JSON lines with `context` and `ms_per_token_p50`, e.g. llama.cpp's).
use std::path::PathBuf;
use std::time::Instant;

use aerokv_engine::{models_root, KvRows, LayerRows, Model, Runtime, RuntimeConfig, Sampler, Sampling, SplitMix64};

fn on_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Resident set of this process (MB), to show that it follows the rows written, not the capacity.
fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()).unwrap_or(0.0) * 4096.0 / 1e6
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v.iter().sum::<f64>() / v.len() as f64)
}

/// Best of 5 passes of summing `buffer` (ms): streaming it from memory once.
fn stream_ms(buffer: &[f32]) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let sum: f32 = buffer.chunks(16).map(|c| c.iter().sum::<f32>()).sum();
            std::hint::black_box(sum);
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let (mut png, mut extra) = (None, Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--png" => png = Some(PathBuf::from(args.next().ok_or("--png needs a file")?)),
            "--series" => {
                let spec = args.next().ok_or("--series needs NAME=FILE")?;
                let (name, file) = spec.split_once('=').ok_or("--series needs NAME=FILE")?;
                extra.push((name.to_string(), PathBuf::from(file)));
            }
            _ => positional.push(a),
        }
    }
    let variants: Vec<String> =
        positional.first().map(String::as_str).unwrap_or("q4").split(',').map(str::to_string).collect();
    let contexts: Vec<usize> = positional
        .get(1)
        .map(String::as_str)
        .unwrap_or("64,512,2048,4096")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let steps: usize = positional.get(2).and_then(|s| s.parse().ok()).unwrap_or(32).max(1);
    let threads: usize = positional.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt = Runtime::init(RuntimeConfig::with_threads(threads))?;
    let mut rng = SplitMix64::new(7);
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n).map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5).collect()
    };
    let mut series = Vec::new();
    for variant in &variants {
        let mut model = Model::load(&rt, models_root().join(variant))?;
        let arch = model.manifest.architecture.clone();
        let layers = arch.layers;
        let mut points = Vec::new();
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
            let rss = rss_mb();
            let reserved = model.shard.memory_bytes().kv_reserved_bytes as f64 / 1e6;
            let kv_floats = 2 * layers * n;
            let kv_stream = stream_ms(&vec![1.0f32; kv_floats]);
            let ((wall_p50, wall_mean), (cpu_p50, cpu_mean), (layer_p50, _)) =
                (stats(wall), stats(cpu), stats(layer_wall));
            println!(
                "{{\"variant\": \"{variant}\", \"context\": {context}, \"steps\": {steps}, \"ms_per_token_p50\": {wall_p50:.3}, \
                 \"ms_per_token_mean\": {wall_mean:.3}, \"cpu_ms_per_token_p50\": {cpu_p50:.3}, \"cpu_ms_per_token_mean\": {cpu_mean:.3}, \
                 \"ms_per_layer_p50\": {layer_p50:.4}, \"kv_bytes\": {}, \"kv_stream_ms\": {kv_stream:.3}, \
                 \"kv_reserved_mb\": {reserved:.1}, \"rss_mb\": {rss:.1}}}",
                kv_floats * 4
            );
            points.push((context as f64, wall_p50));
        }
        series.push((format!("AeroKV {variant}"), points));
    }
    if let Some(png) = png {
        for (name, file) in extra {
            let text = std::fs::read_to_string(&file)?;
            let mut points = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)?;
                let (Some(c), Some(ms)) = (v["context"].as_f64(), v["ms_per_token_p50"].as_f64()) else {
                    return Err(format!("{}: a line without context / ms_per_token_p50", file.display()).into());
                };
                points.push((c, ms));
            }
            series.push((name, points));
        }
        aerokv_sim::plot::line_chart(
            &png,
            &format!("decode time per token against context ({threads} thread)"),
            "tokens of context",
            "ms per token (median)",
            &series,
        )?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}
