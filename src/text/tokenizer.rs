//! The tokenizer: Hugging Face's `tokenizer.json` when the GGUF or its folder has one, else the
//! SentencePiece vocabulary rebuilt from `tokenizer.ggml.*` (what third-party GGUFs carry).

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, Context, Result};

use super::budget::catching_panics;
use super::spm::{parse_byte_piece, token_type, SpmTokenizer, SPACE_MARK};
use super::stream::StreamDecoder;
use crate::format::gguf::Metadata;

enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<SpmTokenizer>),
}

pub struct Tokenizer {
    backend: Backend,
    bos_id: u32,
    eos_id: u32,
    add_bos: bool,
    /// Control tokens (BOS, EOS, UNK, other special added tokens): left out of decoded text.
    skipped: HashSet<u32>,
    source: &'static str,
}

impl Tokenizer {
    /// From a GGUF's metadata: `tokenizer.huggingface.json` (whole tokenizer.json as a string) if present;
    /// else `tokenizer.json` in the same folder as `gguf_path`; else rebuilt from `tokenizer.ggml.*`
    /// (model "llama": tokens, scores, token_type, bos/eos/unk ids, add_bos_token).
    pub fn from_gguf(meta: &Metadata, gguf_path: &Path) -> Result<Tokenizer> {
        let mut tok = if let Some(json) = meta.get_str("tokenizer.huggingface.json") {
            let hf = catching_panics(|| tokenizers::Tokenizer::from_str(json))
                .unwrap_or_else(|| Err("malformed (the tokenizers library panicked on it)".into()))
                .map_err(|e| anyhow!("tokenizer.huggingface.json in {}: {e}", gguf_path.display()))?;
            Self::from_hf(hf, None, "tokenizer.huggingface.json")?
        } else {
            let sibling = gguf_path.parent().unwrap_or(Path::new(".")).join("tokenizer.json");
            if sibling.is_file() {
                Self::from_hf_file(&sibling)?
            } else {
                let spm = SpmTokenizer::from_metadata(meta)
                    .with_context(|| format!("tokenizer of {}", gguf_path.display()))?;
                return Ok(Self::from_spm(spm));
            }
        };
        // The GGUF's own ids and BOS policy take precedence over defaults guessed from the json.
        let id_key = |key: &str| meta.get_u64(key).and_then(|id| u32::try_from(id).ok());
        if let Some(id) = id_key("tokenizer.ggml.bos_token_id") {
            tok.bos_id = id;
        }
        if let Some(id) = id_key("tokenizer.ggml.eos_token_id") {
            tok.eos_id = id;
        }
        if let Some(add) = meta.get_bool("tokenizer.ggml.add_bos_token") {
            tok.add_bos = add;
        }
        Ok(tok)
    }

    /// tokenizer.json via the `tokenizers` crate; BOS/EOS and add_bos from tokenizer_config.json beside
    /// it when present, else `<s>` / `</s>`.
    pub fn from_hf_file(path: &Path) -> Result<Tokenizer> {
        let hf = catching_panics(|| tokenizers::Tokenizer::from_file(path))
            .unwrap_or_else(|| Err("malformed (the tokenizers library panicked on it)".into()))
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("cannot parse {}", config_path.display()))?,
            )
        } else {
            None
        };
        Self::from_hf(hf, config.as_ref(), "tokenizer.json").with_context(|| format!("in {}", path.display()))
    }

    fn from_hf(
        hf: tokenizers::Tokenizer,
        config: Option<&serde_json::Value>,
        source: &'static str,
    ) -> Result<Self> {
        let special_text = |key: &str, default: &'static str| -> String {
            let field = config.and_then(|c| c.get(key));
            let text = field.and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())));
            text.unwrap_or(default).to_owned()
        };
        let id_of = |key: &str, default: &'static str| -> Result<u32> {
            let text = special_text(key, default);
            hf.token_to_id(&text).with_context(|| format!("{key} {text:?} is not in the vocabulary"))
        };
        let bos_id = id_of("bos_token", "<s>")?;
        let eos_id = id_of("eos_token", "</s>")?;
        let add_bos = config.and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(true);
        let skipped =
            hf.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        Ok(Tokenizer { backend: Backend::Hf(Box::new(hf)), bos_id, eos_id, add_bos, skipped, source })
    }

    fn from_spm(spm: SpmTokenizer) -> Tokenizer {
        let skipped = (0..spm.vocab_size() as u32)
            .filter(|&id| matches!(spm.token_type(id), Some(token_type::CONTROL | token_type::UNKNOWN)))
            .collect();
        Tokenizer {
            bos_id: spm.bos_id,
            eos_id: spm.eos_id,
            add_bos: spm.add_bos,
            skipped,
            backend: Backend::Spm(Box::new(spm)),
            source: "gguf vocab",
        }
    }

    /// Token ids of `text`. Special-token text such as `<s>` in `text` becomes that token. With `add_bos`,
    /// BOS is prepended unless the text already starts with it (never two BOS).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.backend {
            Backend::Hf(hf) => {
                hf.encode(text, false).map_err(|e| anyhow!("cannot tokenize text: {e}"))?.get_ids().to_vec()
            }
            Backend::Spm(spm) => spm.encode(text),
        };
        if add_bos && ids.first() != Some(&self.bos_id) {
            ids.insert(0, self.bos_id);
        }
        Ok(ids)
    }

    /// Text of `ids`, without control tokens (BOS, EOS, UNK).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::Hf(hf) => hf.decode(ids, true).map_err(|e| anyhow!("cannot decode tokens: {e}")),
            Backend::Spm(_) => {
                let mut stream = StreamDecoder::new(self);
                let mut text = String::new();
                for &id in ids {
                    text.push_str(&stream.push(id)?);
                }
                text.push_str(&stream.flush());
                Ok(text)
            }
        }
    }

    /// The raw token text, e.g. "▁the", "<0x0A>" (empty for an id outside the vocabulary).
    pub fn piece(&self, id: u32) -> String {
        match &self.backend {
            Backend::Hf(hf) => hf.id_to_token(id).unwrap_or_default(),
            Backend::Spm(spm) => spm.piece(id).unwrap_or_default().to_owned(),
        }
    }

    /// The bytes `id` contributes to decoded text: nothing for control tokens, the byte of a `<0xXX>`
    /// token, else the piece with "▁" as a space (SentencePiece's decoding, as Mixtral's tokenizer.json).
    pub(crate) fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        if id as usize >= self.vocab_size() {
            anyhow::bail!("token id {id} is outside the vocabulary of {} tokens", self.vocab_size());
        }
        if self.skipped.contains(&id) {
            return Ok(Vec::new());
        }
        let piece = self.piece(id);
        Ok(match parse_byte_piece(&piece) {
            Some(byte) => vec![byte],
            None => piece.replace(SPACE_MARK, " ").into_bytes(),
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Whether the model's tokenizer config asks for BOS at the start of a prompt
    /// (`add_bos_token`; true when unspecified).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(hf) => hf.get_vocab_size(true),
            Backend::Spm(spm) => spm.vocab_size(),
        }
    }

    /// Where the tokenizer came from: "tokenizer.huggingface.json" | "tokenizer.json" | "gguf vocab".
    pub fn source(&self) -> &'static str {
        self.source
    }
}
