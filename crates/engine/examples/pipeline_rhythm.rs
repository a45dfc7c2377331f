//! One process run with a pipeline's rhythm: the model split into S stages (default 4) plus the
//! gateway, each unit idle while the others compute, as in a swarm of S drones serving one
//! request, but with no messages between them. Idle time is not counted, so the ratio to the same
//! process run back to back is what the rhythm alone costs on this machine. `make bench-swarm`
//! prints it beside the swarm's ratio; the difference is what the data plane (hops) costs.
//!
//!     cargo run --release -p aerokv-engine --example pipeline_rhythm -- [variant] [tokens] [stages] [rounds]
//!
//! Prints one JSON object on stdout.
use std::time::{Duration, Instant};

use aerokv_engine::{models_root, Gateway, Manifest, Runtime, RuntimeConfig, Sampler, Sampling, Shard};

const PROMPT: &str = "Write a detailed story about a swarm of drones that explores a mountain valley.";

struct Run {
    tokens: Vec<u32>,
    /// Busy time per unit (stages, then the gateway) over all decode steps.
    busy: Vec<Duration>,
}

impl Run {
    fn total(&self) -> Duration {
        self.busy.iter().sum()
    }
}

/// Greedy decoding of `steps` tokens; before each unit's work, sleeps `idle[unit]` if given.
fn decode(
    gateway: &mut Gateway,
    stages: &mut [Shard],
    prompt: &[u32],
    steps: usize,
    idle: Option<&[Duration]>,
) -> Result<Run, Box<dyn std::error::Error>> {
    let mut sampler = Sampler::new(Sampling::Greedy);
    stages.iter_mut().for_each(Shard::reset);
    let mut h = gateway.embed(prompt)?;
    for s in stages.iter_mut() {
        h = s.forward(&h, 0)?;
    }
    let mut next = sampler.sample(&gateway.logits(&h)?)?;
    h = gateway.embed(&[next])?;
    let mut run = Run { tokens: vec![next], busy: vec![Duration::ZERO; stages.len() + 1] };
    let pause = |unit: usize| {
        if let Some(idle) = idle {
            std::thread::sleep(idle[unit]);
        }
    };
    for step in 0..steps {
        for (i, s) in stages.iter_mut().enumerate() {
            pause(i);
            let t = Instant::now();
            h = s.forward(&h, prompt.len() + step)?;
            run.busy[i] += t.elapsed();
        }
        // The gateway's burst: LM head, sampling, embedding of the next token.
        pause(stages.len());
        let t = Instant::now();
        next = sampler.sample(&gateway.logits(&h)?)?;
        h = gateway.embed(&[next])?;
        run.busy[stages.len()] += t.elapsed();
        run.tokens.push(next);
    }
    Ok(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map(String::as_str).unwrap_or("q4");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let n_stages: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4).max(1);
    let rounds: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let runtime = Runtime::init(RuntimeConfig::with_threads(1))?;
    let manifest = Manifest::load_variant(models_root(), variant)?;
    let mut gateway = Gateway::load(&runtime, &manifest)?;
    let layers = manifest.architecture.layers;
    let mut stages = Vec::new();
    let mut start = 0;
    for i in 0..n_stages {
        let len = layers / n_stages + usize::from(i < layers % n_stages);
        stages.push(Shard::load(&runtime, &manifest, start..start + len)?);
        start += len;
    }
    let prompt = gateway.encode_chat(PROMPT)?;

    // Each unit of a pipeline waits while the others work: the token time minus its own.
    let first = decode(&mut gateway, &mut stages, &prompt, steps, None)?;
    let token = first.total() / steps as u32;
    let idle: Vec<Duration> = first.busy.iter().map(|b| token.saturating_sub(*b / steps as u32)).collect();
    let (mut back_to_back, mut paced, mut identical) = (Vec::new(), Vec::new(), true);
    for _ in 0..rounds {
        let a = decode(&mut gateway, &mut stages, &prompt, steps, None)?;
        let b = decode(&mut gateway, &mut stages, &prompt, steps, Some(&idle))?;
        identical &= a.tokens == first.tokens && b.tokens == first.tokens;
        back_to_back.push(steps as f64 / a.total().as_secs_f64());
        paced.push(steps as f64 / b.total().as_secs_f64());
    }
    let (b2b, rhythm) = (median(back_to_back.clone()), median(paced.clone()));
    let ratio = rhythm / b2b;
    eprintln!(
        "{variant}, {n_stages} stages + gateway, {steps} tokens, median of {rounds}: back to back {b2b:.1} tokens/s, \
         with the pipeline's rhythm (idle {:.1}-{:.1} ms before each unit, not counted) {rhythm:.1} tokens/s = {:.3}x",
        idle.iter().min().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        idle.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        ratio
    );
    let report = serde_json::json!({
        "variant": variant, "stages": n_stages, "tokens": steps, "identical": identical,
        "idle_ms": idle.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        "back_to_back_tokens_per_s": back_to_back, "rhythm_tokens_per_s": paced, "ratio": ratio,
    });
    println!("{report}");
    Ok(())
}
