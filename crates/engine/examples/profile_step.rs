//! Where a decode step's time goes: embed, layers, head, sampling, detokenisation.
//!
//!     cargo run --release -p aerokv-engine --example profile_step -- [variant] [steps] [threads]
use std::time::{Duration, Instant};

use aerokv_engine::{models_root, Detokenizer, Model, Runtime, RuntimeConfig, Sampler, Sampling};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map(String::as_str).unwrap_or("q4");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt = Runtime::init(RuntimeConfig::with_threads(threads))?;
    let mut model = Model::load(&rt, models_root().join(variant))?;
    let prompt =
        model.gateway.encode_chat("Write a detailed story about a swarm of drones that explores a mountain valley.")?;
    let mut sampler = Sampler::new(Sampling::Greedy);
    let mut detok = Detokenizer::new();
    let h = model.gateway.embed(&prompt)?;
    let h = model.shard.forward(&h, 0)?;
    let mut next = sampler.sample(&model.gateway.logits(&h)?)?;
    let (mut t_embed, mut t_layers, mut t_head, mut t_sample, mut t_detok) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    for step in 0..steps {
        let t = Instant::now();
        detok.push(&model.gateway, next)?;
        t_detok += t.elapsed();
        let t = Instant::now();
        let h = model.gateway.embed(&[next])?;
        t_embed += t.elapsed();
        let t = Instant::now();
        let h = model.shard.forward(&h, prompt.len() + step)?;
        t_layers += t.elapsed();
        let t = Instant::now();
        let logits = model.gateway.logits(&h)?;
        t_head += t.elapsed();
        let t = Instant::now();
        next = sampler.sample(&logits)?;
        t_sample += t.elapsed();
    }
    let total = started.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
    println!("{variant}: {:.1} tok/s, per step {:.2} ms = embed {:.3} + layers {:.2} ({:.3}/layer) + head {:.2} + sample {:.3} + detok {:.3}",
        steps as f64 / total.as_secs_f64(), ms(total), ms(t_embed), ms(t_layers),
        ms(t_layers) / model.shard.layers().len() as f64, ms(t_head), ms(t_sample), ms(t_detok));
    Ok(())
}
