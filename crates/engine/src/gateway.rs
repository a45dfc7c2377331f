//! The gateway: where the pipeline starts and ends. Tokenizer, chat template, embedding, LM head,
//! stop tokens, streaming detokenisation.
use std::path::PathBuf;
use std::time::Instant;

use ort::session::Session;
use ort::value::TensorRef;
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};
use crate::manifest::{Architecture, FileKind, Manifest};
use crate::runtime::Runtime;
use crate::shard::Hidden;

/// A variant's tokenizer and chat template: prompts to token ids.
#[derive(Clone)]
pub struct PromptEncoder {
    tokenizer: std::sync::Arc<Tokenizer>,
    chat_template: String,
}

impl PromptEncoder {
    /// The manifest's chat template applied to one user turn.
    pub fn chat_prompt(&self, user: &str) -> String {
        self.chat_template.replace("{user}", user)
    }

    /// Token ids of `text`; control tokens written in the text (`<|im_start|>`) become their ids.
    /// No BOS is added (SmolLM2's chat format starts with `<|im_start|>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of the chat prompt for one user turn.
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>> {
        self.encode(&self.chat_prompt(user))
    }
}

/// Tokenizer + `embed.onnx` + `head.onnx` of one variant.
pub struct Gateway {
    encoder: PromptEncoder,
    embed: Session,
    head: Session,
    embed_file: PathBuf,
    head_file: PathBuf,
    arch: Architecture,
    stop_ids: Vec<u32>,
    weight_bytes: u64,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("embed", &self.embed_file).field("head", &self.head_file).finish()
    }
}

impl Gateway {
    /// Loads the tokenizer, the embedding and the LM head of the manifest's variant.
    pub fn load(runtime: &Runtime, manifest: &Manifest) -> Result<Gateway> {
        let tok_entry = manifest.file_of_kind(FileKind::Tokenizer)?;
        let tok_path = manifest.path_of(&tok_entry.name);
        let embed_entry = manifest.file_of_kind(FileKind::Embed)?;
        let head_entry = manifest.file_of_kind(FileKind::Head)?;
        manifest.check_files([&tok_entry.name, &embed_entry.name, &head_entry.name].map(String::as_str))?;
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| EngineError::CorruptFile {
            path: tok_path.clone(),
            reason: format!("tokenizer cannot load it: {e}"),
        })?;
        let embed_file = manifest.path_of(&embed_entry.name);
        let head_file = manifest.path_of(&head_entry.name);
        let embed = runtime.open_session(&embed_file)?;
        let head = runtime.open_session(&head_file)?;
        Ok(Gateway {
            encoder: PromptEncoder {
                tokenizer: std::sync::Arc::new(tokenizer),
                chat_template: manifest.chat_template.clone(),
            },
            embed,
            head,
            embed_file,
            head_file,
            arch: manifest.architecture.clone(),
            stop_ids: manifest.tokens.stop_ids(),
            weight_bytes: embed_entry.bytes + head_entry.bytes,
        })
    }

    /// Bytes of the embedding and head files.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The manifest's chat template applied to one user turn.
    pub fn chat_prompt(&self, user: &str) -> String {
        self.encoder.chat_prompt(user)
    }

    /// Token ids of `text` (see [`PromptEncoder::encode`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encoder.encode(text)
    }

    /// Token ids of the chat prompt for one user turn.
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>> {
        self.encoder.encode_chat(user)
    }

    /// The tokenizer and chat template alone, cheap to clone and `Send`: for checking requests
    /// on another task than the one that runs the model.
    pub fn encoder(&self) -> PromptEncoder {
        self.encoder.clone()
    }

    /// Text of `ids`, control tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.encoder.tokenizer.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// True for EOS and `<|im_end|>`.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Hidden states `[S, hidden]` of the token ids (embed.onnx).
    pub fn embed(&mut self, ids: &[u32]) -> Result<Hidden> {
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("embedding of zero tokens".into()));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.arch.vocab) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {}",
                self.arch.vocab
            )));
        }
        let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let input = TensorRef::from_array_view(([1usize, ids.len()], ids64.as_slice()))
            .map_err(|e| EngineError::ort("wrapping input_ids", e))?;
        let outputs = self
            .embed
            .run(ort::inputs!["input_ids" => input])
            .map_err(|e| EngineError::ort(format!("running {}", self.embed_file.display()), e))?;
        let value = outputs.get("hidden").ok_or_else(|| EngineError::CorruptFile {
            path: self.embed_file.clone(),
            reason: "run returned no `hidden`".into(),
        })?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| EngineError::ort("reading hidden", e))?;
        if data.len() != ids.len() * self.arch.hidden {
            return Err(EngineError::CorruptFile {
                path: self.embed_file.clone(),
                reason: format!("hidden has {} floats, expected {}", data.len(), ids.len() * self.arch.hidden),
            });
        }
        Hidden::new(data.to_vec(), self.arch.hidden)
    }

    /// Logits `[vocab]` of the LAST token of `hidden` (head.onnx on that row only: the other rows'
    /// logits are never needed, and the head is the single largest matmul).
    pub fn logits(&mut self, hidden: &Hidden) -> Result<Vec<f32>> {
        if hidden.width() != self.arch.hidden {
            return Err(EngineError::InvalidInput(format!(
                "hidden width {} but the model's is {}",
                hidden.width(),
                self.arch.hidden
            )));
        }
        let width = self.arch.hidden;
        let last = &hidden.as_slice()[(hidden.tokens() - 1) * width..];
        let input = TensorRef::from_array_view(([1usize, 1, width], last))
            .map_err(|e| EngineError::ort("wrapping the head input", e))?;
        let started = Instant::now();
        let outputs = self
            .head
            .run(ort::inputs!["hidden" => input])
            .map_err(|e| EngineError::ort(format!("running {}", self.head_file.display()), e))?;
        let value = outputs.get("logits").ok_or_else(|| EngineError::CorruptFile {
            path: self.head_file.clone(),
            reason: "run returned no `logits`".into(),
        })?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(|e| EngineError::ort("reading logits", e))?;
        if data.len() != self.arch.vocab {
            return Err(EngineError::CorruptFile {
                path: self.head_file.clone(),
                reason: format!("logits have {} floats, expected {}", data.len(), self.arch.vocab),
            });
        }
        tracing::trace!(head_ms = started.elapsed().as_secs_f64() * 1e3, "head");
        Ok(data.to_vec())
    }
}

/// Turns a stream of token ids into text deltas, holding back bytes that do not yet form a whole
/// UTF-8 character (byte-level BPE splits multi-byte characters across tokens). It holds no
/// reference to the gateway so the gateway stays usable (`&mut`) between pushes.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    pub fn new() -> Detokenizer {
        Detokenizer::default()
    }

    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, gateway: &Gateway, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        // Decode with a little left context: byte-level decoding of a lone token can differ.
        let before = gateway.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = gateway.decode(&self.ids[self.prefix_offset..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            let delta = after[before.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (incomplete characters at the end of a generation).
    pub fn finish(&mut self, gateway: &Gateway) -> Result<Option<String>> {
        let before = gateway.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = gateway.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if after.len() > before.len() && after.is_char_boundary(before.len()) {
            Ok(Some(after[before.len()..].to_string()))
        } else {
            Ok(None)
        }
    }
}
