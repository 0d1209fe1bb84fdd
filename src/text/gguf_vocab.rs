//! The `tokenizer.*` GGUF keys the quantizer writes for a Hugging Face checkpoint, in llama.cpp's layout.
//!
//! A HF `tokenizer.json` for Mixtral is a BPE with an ordered merge list; llama.cpp's "llama" (SPM)
//! tokenizer has no merge list and instead merges the adjacent pair whose result has the highest score.
//! Scoring every token by the rank of the first merge that produces it (score = −(rank + 1)) makes the
//! SPM merge order the BPE merge order, so the rebuilt tokenizer reproduces the HF ids.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::spm::{parse_byte_piece, token_type};
use crate::format::gguf::{MetaValue, Metadata};

#[derive(Deserialize)]
struct TokenizerJson {
    model: BpeModel,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(Deserialize)]
struct BpeModel {
    #[serde(rename = "type")]
    kind: String,
    vocab: HashMap<String, u32>,
    merges: Vec<Merge>,
    unk_token: Option<String>,
}

/// tokenizers writes merges as "a b" (older files) or ["a", "b"] (newer).
#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Joined(String),
    Pair([String; 2]),
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    special: bool,
}

/// Special tokens in tokenizer_config.json are either a string or an AddedToken object.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Object { content: String },
}

impl SpecialToken {
    fn text(&self) -> &str {
        match self {
            SpecialToken::Text(s) | SpecialToken::Object { content: s } => s,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ChatTemplateField {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    chat_template: Option<ChatTemplateField>,
}

/// The tokenizer.* GGUF keys for a HF checkpoint dir: tokenizer.ggml.model = "llama", .tokens (id order),
/// .scores (f32), .token_type (i32: 1 normal, 2 unknown, 3 control, 6 byte; as llama.cpp), .bos_token_id,
/// .eos_token_id, .unknown_token_id, .add_bos_token (bool), .add_eos_token; tokenizer.huggingface.json (the
/// tokenizer.json text); tokenizer.chat_template from tokenizer_config.json when present.
pub fn tokenizer_metadata(hf_dir: &Path, meta: &mut Metadata) -> Result<()> {
    let json_path = hf_dir.join("tokenizer.json");
    let json_text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("cannot read the tokenizer {}", json_path.display()))?;
    let parsed: TokenizerJson = serde_json::from_str(&json_text)
        .with_context(|| format!("{} is not a BPE tokenizer.json", json_path.display()))?;
    let config_path = hf_dir.join("tokenizer_config.json");
    let config: TokenizerConfig = if config_path.exists() {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("cannot parse {}", config_path.display()))?
    } else {
        TokenizerConfig::default()
    };
    let vocab =
        GgufVocab::from_tokenizer_json(parsed).with_context(|| format!("in {}", json_path.display()))?;

    let id_of = |name: &str, text: &str| -> Result<u32> {
        vocab
            .id(text)
            .with_context(|| format!("{name} {text:?} is not in the vocabulary of {}", json_path.display()))
    };
    let bos = id_of("bos_token", config.bos_token.as_ref().map_or("<s>", SpecialToken::text))?;
    let eos = id_of("eos_token", config.eos_token.as_ref().map_or("</s>", SpecialToken::text))?;
    let unk = id_of("unk_token", vocab.unk_token.as_deref().unwrap_or("<unk>"))?;

    meta.set("tokenizer.ggml.model", MetaValue::String("llama".into()));
    meta.set("tokenizer.ggml.tokens", MetaValue::string_array(vocab.pieces.iter().cloned()));
    meta.set("tokenizer.ggml.scores", MetaValue::f32_array(vocab.scores.iter().copied()));
    meta.set("tokenizer.ggml.token_type", MetaValue::i32_array(vocab.types.iter().copied()));
    meta.set("tokenizer.ggml.bos_token_id", MetaValue::U32(bos));
    meta.set("tokenizer.ggml.eos_token_id", MetaValue::U32(eos));
    meta.set("tokenizer.ggml.unknown_token_id", MetaValue::U32(unk));
    meta.set("tokenizer.ggml.add_bos_token", MetaValue::Bool(config.add_bos_token.unwrap_or(true)));
    meta.set("tokenizer.ggml.add_eos_token", MetaValue::Bool(config.add_eos_token.unwrap_or(false)));
    let template = match config.chat_template {
        Some(ChatTemplateField::Single(t)) => Some(t),
        Some(ChatTemplateField::Named(list)) => {
            list.into_iter().find(|t| t.name == "default").map(|t| t.template)
        }
        None => None,
    };
    if let Some(template) = template {
        meta.set("tokenizer.chat_template", MetaValue::String(template));
    }
    meta.set("tokenizer.huggingface.json", MetaValue::String(json_text));
    Ok(())
}

/// Tokens in id order with llama.cpp scores and types.
struct GgufVocab {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    unk_token: Option<String>,
}

impl GgufVocab {
    fn from_tokenizer_json(parsed: TokenizerJson) -> Result<GgufVocab> {
        let model = parsed.model;
        if model.kind != "BPE" {
            bail!(
                "tokenizer model is {:?}; only BPE (SentencePiece-style) converts to a llama vocabulary",
                model.kind
            );
        }
        let mut by_id: HashMap<u32, String> =
            model.vocab.into_iter().map(|(piece, id)| (id, piece)).collect();
        for added in &parsed.added_tokens {
            by_id.insert(added.id, added.content.clone());
        }
        let n = by_id.len();
        let pieces: Vec<String> = (0..n as u32)
            .map(|id| {
                by_id.remove(&id).with_context(|| format!("token ids are not contiguous: id {id} is missing"))
            })
            .collect::<Result<_>>()?;
        let ids: HashMap<&str, u32> =
            pieces.iter().enumerate().map(|(id, p)| (p.as_str(), id as u32)).collect();

        let mut scores = vec![0.0f32; n];
        let mut scored = vec![false; n];
        for (rank, merge) in model.merges.iter().enumerate() {
            let merged = match merge {
                Merge::Pair([a, b]) => format!("{a}{b}"),
                Merge::Joined(s) => {
                    let (a, b) =
                        s.split_once(' ').with_context(|| format!("merge {rank} {s:?} is not \"a b\""))?;
                    format!("{a}{b}")
                }
            };
            let id = *ids
                .get(merged.as_str())
                .with_context(|| format!("merge {rank} yields {merged:?}, not a token"))?;
            if !scored[id as usize] {
                scores[id as usize] = -((rank + 1) as f32);
                scored[id as usize] = true;
            }
        }

        let special: HashMap<u32, bool> = parsed.added_tokens.iter().map(|t| (t.id, t.special)).collect();
        let types = pieces
            .iter()
            .enumerate()
            .map(|(id, piece)| {
                if model.unk_token.as_deref() == Some(piece.as_str()) {
                    token_type::UNKNOWN
                } else if let Some(&is_special) = special.get(&(id as u32)) {
                    if is_special {
                        token_type::CONTROL
                    } else {
                        token_type::USER_DEFINED
                    }
                } else if parse_byte_piece(piece).is_some() {
                    token_type::BYTE
                } else {
                    token_type::NORMAL
                }
            })
            .collect();
        Ok(GgufVocab { pieces, scores, types, unk_token: model.unk_token })
    }

    fn id(&self, piece: &str) -> Option<u32> {
        self.pieces.iter().position(|p| p == piece).map(|i| i as u32)
    }
}
