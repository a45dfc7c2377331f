//! The whole model in one process: gateway + one shard of all layers, and the generation loop.
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::gateway::{Detokenizer, Gateway};
use crate::manifest::Manifest;
use crate::runtime::Runtime;
use crate::sampling::{Sampler, Sampling};
use crate::shard::{resident_bytes, Shard};

/// Longest step a prompt is cut into. The attention scores of a step are its tokens x the
/// context, so a bounded step bounds its memory and time (and the swarm's per-step timeout
/// applies to a piece of the prompt, not all of it). Every runner of the model cuts the same way
/// (`aerokv generate`, the scheduler, restarts, replays): a different cut changes the floats.
pub const PREFILL_CHUNK_TOKENS: usize = 128;

/// The steps a prompt is fed in: `(position, ids)`, at most [`PREFILL_CHUNK_TOKENS`] each.
pub fn prompt_chunks(prompt: &[u32]) -> impl Iterator<Item = (usize, &[u32])> {
    prompt.chunks(PREFILL_CHUNK_TOKENS).enumerate().map(|(i, ids)| (i * PREFILL_CHUNK_TOKENS, ids))
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum new tokens (generation also stops at a stop token or the context limit).
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Keep the logits of the first generated token (for comparisons with a reference).
    pub keep_first_logits: bool,
    /// Do not stop at EOS / `<|im_end|>` (benchmarks: always generate `max_tokens`).
    pub ignore_stop: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 64, sampling: Sampling::Greedy, keep_first_logits: false, ignore_stop: false }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced EOS / `<|im_end|>` (not included in `tokens`).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context limit reached.
    Context,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
    }
}

/// One generated token, as handed to the per-token callback.
#[derive(Debug, Clone)]
pub struct TokenEvent<'a> {
    /// 0-based index among generated tokens.
    pub index: usize,
    pub id: u32,
    /// Text this token completes (may be empty while a multi-byte character is incomplete).
    pub text: &'a str,
}

/// Result of [`Model::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, stop token excluded.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    /// Prompt processing (every chunk) up to the first token's logits.
    pub prefill: Duration,
    /// The decode steps after the first token.
    pub decode: Duration,
    /// Decode speed: (generated tokens - 1) / decode time; tokens after the first, each one
    /// full pass (embed, 30 layers, head, sampling). Prefill excluded, as llama.cpp's "eval".
    pub tokens_per_s: f64,
    /// Mean compute time of one decoder layer in one decode step (ms).
    pub ms_per_token_per_layer: f64,
    /// Logits of the first generated token, if asked for.
    pub first_logits: Option<Vec<f32>>,
}

/// Gateway + all layers: what `aerokv generate` runs.
pub struct Model {
    pub manifest: Manifest,
    pub gateway: Gateway,
    pub shard: Shard,
    load_time: Duration,
    loaded_rss_bytes: u64,
}

impl Model {
    /// Loads every part of the variant in `variant_dir`.
    pub fn load(runtime: &Runtime, variant_dir: impl AsRef<Path>) -> Result<Model> {
        let started = Instant::now();
        let rss_before = resident_bytes();
        let manifest = Manifest::load(variant_dir)?;
        let gateway = Gateway::load(runtime, &manifest)?;
        let shard = Shard::load(runtime, &manifest, 0..manifest.architecture.layers)?;
        let load_time = started.elapsed();
        tracing::info!(variant = %manifest.variant, load_s = load_time.as_secs_f64(), "model loaded");
        Ok(Model { manifest, gateway, shard, load_time, loaded_rss_bytes: resident_bytes().saturating_sub(rss_before) })
    }

    /// Wall time of [`Model::load`].
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Growth of the resident set during [`Model::load`].
    pub fn loaded_rss_bytes(&self) -> u64 {
        self.loaded_rss_bytes
    }

    /// Chat-formats `user`, then [`Model::generate_ids`].
    pub fn generate(
        &mut self,
        user: &str,
        options: &GenerateOptions,
        on_token: impl FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let prompt_ids = self.gateway.encode_chat(user)?;
        self.generate_ids(prompt_ids, options, on_token)
    }

    /// Prefills `prompt_ids` in [`prompt_chunks`], then decodes one token per step, calling `on_token`
    /// for every generated token. Starts from an empty KV cache.
    pub fn generate_ids(
        &mut self,
        prompt_ids: Vec<u32>,
        options: &GenerateOptions,
        mut on_token: impl FnMut(&TokenEvent<'_>),
    ) -> Result<Generation> {
        let limit = self.manifest.architecture.max_context;
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidInput("empty prompt".into()));
        }
        if prompt_ids.len() >= limit {
            return Err(EngineError::ContextOverflow {
                what: format!("a prompt of {} tokens plus one new token", prompt_ids.len()),
                tokens: prompt_ids.len() + 1,
                limit,
            });
        }
        self.shard.reset();
        // One cache per layer for this request's longest context, allocated once.
        self.shard.set_kv_capacity((prompt_ids.len() + options.max_tokens).min(limit))?;
        let mut sampler = Sampler::new(options.sampling);
        let layers = self.shard.layers().len().max(1);
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut first_logits = None;
        let mut finish = FinishReason::Length;
        let mut layer_compute = Duration::ZERO;

        let started = Instant::now();
        let mut last = None;
        for (position, ids) in prompt_chunks(&prompt_ids) {
            let hidden = self.gateway.embed(ids)?;
            last = Some(self.shard.forward(&hidden, position)?);
        }
        let hidden = last.ok_or_else(|| EngineError::InvalidInput("empty prompt".into()))?;
        let logits = self.gateway.logits(&hidden)?;
        if options.keep_first_logits {
            first_logits = Some(logits.clone());
        }
        let mut next = sampler.sample(&logits)?;
        let prefill = started.elapsed();
        let decode_started = Instant::now();
        let mut detok = Detokenizer::new();
        let mut position = prompt_ids.len();
        while tokens.len() < options.max_tokens {
            if !options.ignore_stop && self.gateway.is_stop(next) {
                finish = FinishReason::Stop;
                break;
            }
            tokens.push(next);
            let delta = detok.push(&self.gateway, next)?.unwrap_or_default();
            text.push_str(&delta);
            on_token(&TokenEvent { index: tokens.len() - 1, id: next, text: &delta });
            if tokens.len() == options.max_tokens {
                break;
            }
            if position + 1 > limit {
                finish = FinishReason::Context;
                break;
            }
            let hidden = embed_one(&mut self.gateway, next)?;
            let hidden = self.shard.forward(&hidden, position)?;
            layer_compute += self.shard.last_compute();
            position += 1;
            let logits = self.gateway.logits(&hidden)?;
            next = sampler.sample(&logits)?;
        }
        if let Some(rest) = detok.finish(&self.gateway)? {
            text.push_str(&rest);
            on_token(&TokenEvent {
                index: tokens.len().saturating_sub(1),
                id: *tokens.last().unwrap_or(&next),
                text: &rest,
            });
        }
        let decode = decode_started.elapsed();
        let steps = tokens.len().saturating_sub(1);
        let tokens_per_s = if steps > 0 && decode > Duration::ZERO { steps as f64 / decode.as_secs_f64() } else { 0.0 };
        let ms_per_token_per_layer =
            if steps > 0 { layer_compute.as_secs_f64() * 1e3 / steps as f64 / layers as f64 } else { 0.0 };
        Ok(Generation {
            prompt_ids,
            tokens,
            text,
            finish,
            prefill,
            decode,
            tokens_per_s,
            ms_per_token_per_layer,
            first_logits,
        })
    }
}

fn embed_one(gateway: &mut Gateway, id: u32) -> Result<crate::shard::Hidden> {
    gateway.embed(&[id])
}
