//! The forward pass, per backend. Every backend implements [`Engine`], so the commands and the chat
//! REPL do not care where the math runs.

use anyhow::Result;

use crate::model::ModelConfig;

pub mod cpu;

/// A model instance with its KV cache: tokens go in at the cache's current position, logits come out.
pub trait Engine {
    /// Processes `tokens` at positions `position() .. position() + tokens.len()`, appending them to the
    /// KV cache. Returns the logits of the last token (`[vocab]`), or of every token (`[n, vocab]`,
    /// row-major) when `all_logits` is set. Errors (leaving the cache unchanged) when the tokens do not
    /// fit in the context or an id is out of the vocabulary.
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>>;

    /// Number of tokens in the KV cache.
    fn position(&self) -> usize;

    /// Capacity of the KV cache in tokens (`--ctx`).
    fn context_size(&self) -> usize;

    /// Keeps the first `n` cached tokens and forgets the rest (n ≥ position() is a no-op).
    fn truncate(&mut self, n: usize);

    fn config(&self) -> &ModelConfig;

    /// One line of backend statistics for `/stats` and `--verbose` (e.g. the expert-cache hit rate).
    fn stats_line(&self) -> Option<String> {
        None
    }
}
