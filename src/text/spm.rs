//! The SentencePiece-style BPE tokenizer rebuilt from `tokenizer.ggml.*` metadata (llama.cpp's "llama"
//! vocabulary type), for GGUF files that carry no `tokenizer.json`.
//!
//! The algorithm follows llama.cpp's `llm_tokenizer_spm`: spaces become "▁", a "▁" is prepended to every
//! text fragment that starts the input or follows a special token (SentencePiece's add_dummy_prefix), the
//! fragment is split into UTF-8 characters, and the adjacent pair whose concatenation is a token with the
//! highest score is merged until no pair merges; characters without a token become `<0xXX>` byte tokens.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use anyhow::{bail, Context, Result};

use crate::format::gguf::Metadata;

/// llama.cpp's token types (`llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const BYTE: i32 = 6;
}

pub const SPACE_MARK: char = '\u{2581}';

pub struct SpmTokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    /// Tokens matched verbatim in input text before BPE runs, longest first.
    specials: Vec<(String, u32)>,
    pub bos_id: u32,
    pub eos_id: u32,
    unk_id: u32,
    pub add_bos: bool,
    add_space_prefix: bool,
}

impl SpmTokenizer {
    pub fn from_metadata(meta: &Metadata) -> Result<SpmTokenizer> {
        let model = meta.get_str("tokenizer.ggml.model").context("GGUF has no tokenizer.ggml.model")?;
        if model != "llama" {
            bail!("GGUF tokenizer model {model:?} is not supported (only \"llama\", SentencePiece BPE)");
        }
        let pieces: Vec<String> = meta
            .get_array("tokenizer.ggml.tokens")
            .context("GGUF has no tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_owned).context("tokenizer.ggml.tokens holds a non-string"))
            .collect::<Result<_>>()?;
        let n = pieces.len();
        let scores: Vec<f32> = match meta.get_array("tokenizer.ggml.scores") {
            Some(values) => values
                .iter()
                .map(|v| v.as_f64().map(|s| s as f32).context("tokenizer.ggml.scores holds a non-number"))
                .collect::<Result<_>>()?,
            None => vec![0.0; n],
        };
        let types: Vec<i32> = match meta.get_array("tokenizer.ggml.token_type") {
            Some(values) => values
                .iter()
                .map(|v| {
                    v.as_i64()
                        .and_then(|t| i32::try_from(t).ok())
                        .context("tokenizer.ggml.token_type holds a non-integer")
                })
                .collect::<Result<_>>()?,
            None => vec![token_type::NORMAL; n],
        };
        if scores.len() != n || types.len() != n {
            bail!(
                "GGUF tokenizer arrays disagree: {n} tokens, {} scores, {} token types",
                scores.len(),
                types.len()
            );
        }
        let token_id = |key: &str, default: u32| -> Result<u32> {
            let id = match meta.get(key) {
                Some(v) => v.as_u64().with_context(|| format!("{key} is not an integer"))?,
                None => u64::from(default),
            };
            if id >= n as u64 {
                bail!("{key} = {id} is outside the vocabulary of {n} tokens");
            }
            Ok(id as u32)
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id", 1)?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id", 2)?;
        let unk_id = token_id("tokenizer.ggml.unknown_token_id", 0)?;

        let mut ids = HashMap::with_capacity(n);
        let mut byte_ids = [None; 256];
        let mut specials = Vec::new();
        for (id, (piece, &ty)) in pieces.iter().zip(&types).enumerate() {
            let id = id as u32;
            // The first of duplicate pieces wins, as in llama.cpp.
            ids.entry(piece.clone()).or_insert(id);
            match ty {
                token_type::BYTE => {
                    let byte = parse_byte_piece(piece)
                        .with_context(|| format!("byte token {id} has piece {piece:?}, not <0xXX>"))?;
                    byte_ids[byte as usize] = Some(id);
                }
                token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN if !piece.is_empty() => {
                    specials.push((piece.clone(), id))
                }
                _ => {}
            }
        }
        specials.sort_by_key(|(piece, _)| Reverse(piece.len()));
        Ok(SpmTokenizer {
            pieces,
            scores,
            types,
            ids,
            byte_ids,
            specials,
            bos_id,
            eos_id,
            unk_id,
            add_bos: meta.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(true),
            add_space_prefix: meta.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<i32> {
        self.types.get(id as usize).copied()
    }

    /// Tokens of `text` (no BOS): special-token pieces in the text map to their ids, the rest is BPE.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut after_special = true;
        let mut fragment_start = 0;
        let mut pos = 0;
        while pos < text.len() {
            match self.specials.iter().find(|(piece, _)| text[pos..].starts_with(piece.as_str())) {
                Some((piece, id)) => {
                    self.encode_fragment(&text[fragment_start..pos], after_special, &mut out);
                    after_special = true;
                    out.push(*id);
                    pos += piece.len();
                    fragment_start = pos;
                }
                None => pos += text[pos..].chars().next().map_or(1, char::len_utf8),
            }
        }
        self.encode_fragment(&text[fragment_start..], after_special, &mut out);
        out
    }

    fn encode_fragment(&self, fragment: &str, after_special: bool, out: &mut Vec<u32>) {
        if fragment.is_empty() {
            return;
        }
        let prefix = if self.add_space_prefix && after_special { " " } else { "" };
        let text: String = format!("{prefix}{fragment}").replace(' ', "\u{2581}");
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol { start, len: c.len_utf8(), prev: None, next: None })
            .collect();
        let count = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < count).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        for i in 1..count {
            self.push_bigram(&text, &symbols, i - 1, i, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (bigram.left, bigram.right);
            // Stale entries: one side was merged away or grew since this pair was queued.
            if symbols[left].len == 0
                || symbols[right].len == 0
                || symbols[left].len + symbols[right].len != bigram.len
            {
                continue;
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            symbols[left].next = symbols[right].next;
            if let Some(next) = symbols[right].next {
                symbols[next].prev = Some(left);
            }
            if let Some(prev) = symbols[left].prev {
                self.push_bigram(&text, &symbols, prev, left, &mut queue);
            }
            if let Some(next) = symbols[left].next {
                self.push_bigram(&text, &symbols, left, next, &mut queue);
            }
        }
        let mut i = Some(0);
        while let Some(at) = i {
            let s = &symbols[at];
            self.emit(&text[s.start..s.start + s.len], out);
            i = s.next;
        }
    }

    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let len = symbols[left].len + symbols[right].len;
        let start = symbols[left].start;
        if let Some(&id) = self.ids.get(&text[start..start + len]) {
            queue.push(Bigram { score: self.scores[id as usize], left, right, len });
        }
    }

    /// A merged symbol is always a token; a single character may not be, and then falls back to bytes.
    fn emit(&self, symbol: &str, out: &mut Vec<u32>) {
        match self.ids.get(symbol) {
            Some(&id) => out.push(id),
            None => out.extend(symbol.bytes().map(|b| self.byte_ids[b as usize].unwrap_or(self.unk_id))),
        }
    }
}

/// `<0xAB>` → 0xAB.
pub fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; the heap pops the highest score, then the leftmost pair (as llama.cpp).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}
