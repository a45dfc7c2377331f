//! `aerokv codecs`: the wire codecs on the real model, in one process. For every activation codec
//! it generates the answer as the swarm computes it under that codec (every layer fed its
//! predecessor's output through the codec, whatever the layout: docs/codecs.md) and reports where
//! it first differs from the exact (raw) answer, the bytes per token per hop, and the CPU time of
//! encoding and decoding one token. On the raw run's KV rows and activations it measures the
//! lossless KV codecs (ratio, CPU time per MB). Figures are printed, never asserted.
use aerokv_codec::{shuffle, ActivationCodec, KvCodec, ZSTD_LEVEL};
use aerokv_engine::{argmax, models_root, prompt_chunks, Gateway, Hidden, Manifest, Runtime, RuntimeConfig, Shard};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct CodecsArgs {
    /// A question (repeatable).
    #[arg(long, required = true)]
    pub user: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value = aerokv_engine::DEFAULT_VARIANT)]
    pub variant: String,
    /// Directory holding the variants (default: $AEROKV_MODELS, else models/generated).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Only these activation codecs (default: all).
    #[arg(long)]
    pub codec: Vec<ActivationCodec>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Apply the codec only where these layers' inputs enter (e.g. 10,20: the hops of a fixed
    /// 3-stage layout), not before every layer as the swarm does: shows what the layout-independent
    /// rule costs in agreement with raw. Layer 0 (the gateway's hop) and the LM head's input
    /// are always coded.
    #[arg(long, hide = true, value_delimiter = ',')]
    pub only_at: Vec<usize>,
}

/// One process computing as the swarm does under `codec`: a shard per layer.
struct Chain {
    gateway: Gateway,
    layers: Vec<Shard>,
    codec: ActivationCodec,
    /// Layers whose input goes through the codec (empty: every layer).
    only_at: Vec<usize>,
    /// What crossed a layer boundary (decode steps), for the compression figures.
    seen: Vec<f32>,
    round_trips: usize,
    round_trip_s: f64,
}

impl Chain {
    fn through(&mut self, h: Hidden, layer: usize) -> anyhow::Result<Hidden> {
        let coded =
            layer == 0 || layer == self.layers.len() || self.only_at.is_empty() || self.only_at.contains(&layer);
        if self.codec.is_exact() || !coded {
            return Ok(h);
        }
        let started = Instant::now();
        let out = Hidden::new(self.codec.round_trip(h.as_slice(), h.width())?, h.width())?;
        if h.tokens() == 1 {
            self.round_trips += 1;
            self.round_trip_s += started.elapsed().as_secs_f64();
        }
        Ok(out)
    }

    fn step(&mut self, ids: &[u32], position: usize) -> anyhow::Result<u32> {
        let mut x = self.gateway.embed(ids)?;
        for i in 0..self.layers.len() {
            x = self.through(x, i)?;
            if ids.len() == 1 && self.seen.len() < 1 << 22 {
                self.seen.extend_from_slice(x.as_slice());
            }
            x = self.layers[i].forward(&x, position)?;
        }
        let x = self.through(x, self.layers.len())?;
        Ok(argmax(&self.gateway.logits(&x)?)?)
    }

    fn generate(&mut self, prompt: &[u32], max_tokens: usize) -> anyhow::Result<Vec<u32>> {
        let mut next = 0;
        for (position, ids) in prompt_chunks(prompt) {
            next = self.step(ids, position)?;
        }
        let mut out = vec![next];
        while out.len() < max_tokens && !self.gateway.is_stop(next) {
            next = self.step(&[next], prompt.len() + out.len() - 1)?;
            out.push(next);
        }
        Ok(out)
    }
}

/// Microseconds per call of `f`, the best of a few rounds (a shared machine).
fn best_us(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..rounds {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / rounds as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Lossless compression of `data`: ratio and CPU seconds per MB (of raw f32) both ways.
fn lossless(data: &[f32], shuffled: bool, level: i32) -> anyhow::Result<serde_json::Value> {
    let raw_bytes = data.len() * 4;
    let input = if shuffled { shuffle(data) } else { ActivationCodec::Raw.encode(data, 1)? };
    let t = Instant::now();
    let packed = zstd::bulk::compress(&input, level)?;
    let compress_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = zstd::bulk::decompress(&packed, input.len())?;
    let decompress_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(back == input, "zstd did not round-trip");
    let mb = raw_bytes as f64 / 1e6;
    Ok(serde_json::json!({
        "shuffled": shuffled, "level": level, "raw_bytes": raw_bytes, "bytes": packed.len(),
        "ratio": packed.len() as f64 / raw_bytes as f64,
        "compress_ms_per_mb": compress_s * 1e3 / mb, "decompress_ms_per_mb": decompress_s * 1e3 / mb,
    }))
}

pub fn run(a: CodecsArgs) -> anyhow::Result<()> {
    let root = a.models.clone().unwrap_or_else(models_root);
    let runtime = Runtime::init(RuntimeConfig::with_threads(1))?;
    let manifest = Manifest::load_variant(&root, &a.variant)?;
    let arch = manifest.architecture.clone();
    let codecs = if a.codec.is_empty() { ActivationCodec::ALL.to_vec() } else { a.codec.clone() };
    let mut prompts = Vec::new();
    let mut kv = Vec::new();
    let mut activations = Vec::new();
    let mut codec_figures = serde_json::Map::new();
    for &codec in &codecs {
        let mut per_prompt = Vec::new();
        let (mut tokens_total, mut decode_s) = (0usize, 0f64);
        let (mut round_trips, mut round_trip_s) = (0usize, 0f64);
        for (i, user) in a.user.iter().enumerate() {
            let mut chain = Chain {
                gateway: Gateway::load(&runtime, &manifest)?,
                layers: (0..arch.layers)
                    .map(|l| Shard::load(&runtime, &manifest, l..l + 1))
                    .collect::<Result<_, _>>()?,
                codec,
                only_at: a.only_at.clone(),
                seen: Vec::new(),
                round_trips: 0,
                round_trip_s: 0.0,
            };
            let prompt = chain.gateway.encode_chat(user)?;
            let started = Instant::now();
            let tokens = chain.generate(&prompt, a.max_tokens)?;
            decode_s += started.elapsed().as_secs_f64();
            tokens_total += tokens.len();
            round_trips += chain.round_trips;
            round_trip_s += chain.round_trip_s;
            if codec.is_exact() {
                let end = prompt.len() + tokens.len() - 1;
                let rows =
                    chain.layers.iter().map(|s| s.export_kv(s.layers(), 0..end)).collect::<Result<Vec<_>, _>>()?;
                kv.extend(
                    rows.iter().flat_map(|r| r.layers.iter()).flat_map(|l| l.key.iter().chain(&l.value)).copied(),
                );
                activations.extend(std::mem::take(&mut chain.seen));
            } else if activations.is_empty() {
                // No raw run: time the codecs on what this one fed its layers.
                activations = std::mem::take(&mut chain.seen);
            }
            if prompts.len() < a.user.len() {
                prompts.push(serde_json::json!({"user": user, "prompt_tokens": prompt.len()}));
            }
            let raw_tokens = codec_figures
                .get("raw")
                .and_then(|r| r["prompts"][i]["tokens"].as_array().cloned())
                .map(|t| t.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect::<Vec<_>>());
            let agree = raw_tokens.as_ref().map(|r| r.iter().zip(&tokens).take_while(|(a, b)| a == b).count());
            let text = chain.gateway.decode(&tokens).unwrap_or_default();
            per_prompt.push(serde_json::json!({"tokens": tokens, "text": text, "equal_to_raw_for": agree}));
        }
        let width = arch.hidden;
        let sample: Vec<f32> = activations
            .iter()
            .copied()
            .take(width * 256)
            .collect::<Vec<_>>()
            .chunks_exact(width)
            .flatten()
            .copied()
            .collect();
        let rows = (sample.len() / width).max(1);
        let encoded = codec.encode(&sample, width)?;
        let encode_us = best_us(3, || drop(codec.encode(&sample, width))) / rows as f64;
        let decode_us = best_us(3, || drop(codec.decode(&encoded, rows, width))) / rows as f64;
        eprintln!("[codecs] {codec}: {tokens_total} tokens in {decode_s:.1} s");
        codec_figures.insert(
            codec.name().into(),
            serde_json::json!({
                "bytes_per_token_per_hop": codec.row_bytes(width),
                "bytes_per_element": codec.bytes_per_element(width),
                "encode_us_per_token": encode_us,
                "decode_us_per_token": decode_us,
                // Mean over the generation, preemptions included (the figures above: best of 5).
                "round_trip_us_per_layer_token": if round_trips > 0 { round_trip_s * 1e6 / round_trips as f64 } else { 0.0 },
                "tokens_per_s_one_process": tokens_total as f64 / decode_s,
                "prompts": per_prompt,
            }),
        );
    }
    let kv_bytes_per_token_layer = arch.kv_bytes_per_token_per_layer();
    let mut lossless_figures = Vec::new();
    for (what, data) in [("kv", &kv), ("activations", &activations)] {
        if data.is_empty() {
            continue;
        }
        for (shuffled, level) in [(false, ZSTD_LEVEL), (true, ZSTD_LEVEL), (true, 3)] {
            let mut f = lossless(data, shuffled, level)?;
            f["data"] = what.into();
            lossless_figures.push(f);
        }
    }
    let out = serde_json::json!({
        "variant": a.variant, "max_tokens": a.max_tokens, "prompts": prompts, "only_at": a.only_at,
        "activation_codecs": codec_figures,
        "kv_codecs": KvCodec::ALL.iter().map(|c| serde_json::json!({"codec": c.name(), "bytes_per_element": c.bytes_per_element()})).collect::<Vec<_>>(),
        "kv_bytes_per_token_per_layer_raw": kv_bytes_per_token_layer,
        "lossless": lossless_figures,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("codec  bytes/token/hop  encode us/token  decode us/token  tok/s (1 process)  tokens equal to raw");
    for (name, f) in &codec_figures {
        let agree: Vec<String> =
            f["prompts"].as_array().into_iter().flatten().map(|p| p["equal_to_raw_for"].to_string()).collect();
        println!(
            "{name:6} {:>15} {:>16.2} {:>16.2} {:>18.1}  {}",
            f["bytes_per_token_per_hop"],
            f["encode_us_per_token"].as_f64().unwrap_or(0.0),
            f["decode_us_per_token"].as_f64().unwrap_or(0.0),
            f["tokens_per_s_one_process"].as_f64().unwrap_or(0.0),
            agree.join(" ")
        );
    }
    println!("\nlossless (zstd)  data         shuffled level  ratio  compress ms/MB  decompress ms/MB");
    for f in &lossless_figures {
        println!(
            "                 {:12} {:8} {:5}  {:.3}  {:>14.2}  {:>16.2}",
            f["data"].as_str().unwrap_or(""),
            f["shuffled"],
            f["level"],
            f["ratio"].as_f64().unwrap_or(0.0),
            f["compress_ms_per_mb"].as_f64().unwrap_or(0.0),
            f["decompress_ms_per_mb"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
