//! `aerokv generate`: the whole model in one process (owned by the engine work, issue 3).
//!
//! Streams the answer to stdout as it is generated; `--json` prints one JSON object instead.
//! Logs go to stderr.
use std::io::Write;
use std::path::PathBuf;

use aerokv_engine::{models_root, GenerateOptions, Model, Runtime, RuntimeConfig, Sampling, DEFAULT_VARIANT};
use anyhow::Context;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The user's question (one chat turn).
    #[arg(long)]
    pub user: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Model variant: q4 (exact 4-bit), q4-fast (8-bit activations), fp32, tiny.
    #[arg(long, default_value = DEFAULT_VARIANT)]
    pub variant: String,
    /// Print one JSON object (prompt_ids, tokens, text, tokens_per_s, ...) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Directory holding the variants (default: $AEROKV_MODELS, else models/generated).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Threads of ONNX Runtime's global intra-op pool.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Sampling temperature; 0 (default) = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// PRNG seed (with --temperature); the same seed gives the same tokens.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Re-hash every model file before loading, ignoring the integrity cache (every load checks
    /// the files against the manifest anyway, re-hashing only files whose identity changed).
    #[arg(long)]
    pub verify: bool,
    /// Write the first generated token's logits (float32, .npy) to FILE: used by
    /// test/test_engine_reference.py to compare against the float64 numpy reference.
    #[arg(long, hide = true, value_name = "FILE")]
    pub dump_first_logits: Option<PathBuf>,
    /// Keep generating past EOS (benchmarks: always exactly --max-tokens tokens).
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = Sampling::from_options(args.temperature, args.top_p, args.seed)?;
    let root = args.models.clone().unwrap_or_else(models_root);
    let variant_dir = root.join(&args.variant);
    let runtime = Runtime::init(RuntimeConfig::with_threads(args.threads))?;
    if args.verify {
        aerokv_engine::Manifest::load(&variant_dir)?.verify_files()?;
    }
    let mut model = Model::load(&runtime, &variant_dir)
        .with_context(|| format!("loading variant `{}` from {}", args.variant, variant_dir.display()))?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        keep_first_logits: args.dump_first_logits.is_some(),
        ignore_stop: args.ignore_eos,
    };
    let stream = !args.json;
    let preempted_before = crate::os::thread_preemptions();
    let stdout = std::io::stdout();
    let generation = model.generate(&args.user, &options, |event| {
        if stream && !event.text.is_empty() {
            let mut out = stdout.lock();
            // A closed pipe must not abort the generation; the result is still logged.
            let _ = out.write_all(event.text.as_bytes());
            let _ = out.flush();
        }
    })?;
    let preempted = crate::os::thread_preemptions().saturating_sub(preempted_before);
    if let (Some(path), Some(logits)) = (&args.dump_first_logits, &generation.first_logits) {
        write_npy_f32(path, logits).with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(
        variant = %args.variant,
        prompt_tokens = generation.prompt_ids.len(),
        tokens = generation.tokens.len(),
        finish = generation.finish.as_str(),
        tokens_per_s = format!("{:.1}", generation.tokens_per_s),
        ms_per_token_per_layer = format!("{:.3}", generation.ms_per_token_per_layer),
        load_s = format!("{:.2}", model.load_time().as_secs_f64()),
        "generated"
    );
    if args.json {
        let memory = model.shard.memory_bytes();
        let json = serde_json::json!({
            "variant": args.variant,
            "threads": args.threads,
            "prompt_ids": generation.prompt_ids,
            "tokens": generation.tokens,
            "text": generation.text,
            "finish": generation.finish.as_str(),
            "tokens_per_s": generation.tokens_per_s,
            "ms_per_token_per_layer": generation.ms_per_token_per_layer,
            "prefill_s": generation.prefill.as_secs_f64(),
            "decode_s": generation.decode.as_secs_f64(),
            "load_s": model.load_time().as_secs_f64(),
            "weight_bytes": memory.weight_bytes + model.gateway.weight_bytes(),
            "kv_bytes_per_token": memory.kv_bytes_per_token,
            "kv_capacity_tokens": model.shard.kv_capacity(),
            "kv_reserved_bytes": memory.kv_reserved_bytes,
            "peak_rss_bytes": crate::os::peak_rss_bytes(),
            "preempted_per_token": preempted as f64 / generation.tokens.len().max(1) as f64,
        });
        println!("{json}");
    } else {
        println!();
    }
    Ok(())
}

/// A 1-D float32 .npy file (format 1.0), readable with `numpy.load`.
fn write_npy_f32(path: &std::path::Path, data: &[f32]) -> std::io::Result<()> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", data.len());
    // Magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes)
}
