//! mixtral-q: Mixtral-8x7B in 4 bits on consumer hardware.
//!
//! The modules follow the data flow:
//! `format` (GGUF, safetensors, block codecs) → `quantize` (HF checkpoint → GGUF) →
//! `model` (config and weights over a memory-mapped GGUF) → `placement` (what lives where) →
//! `engine` (the forward pass per backend) → `text` (tokenizer, chat template, sampling).
//! The command-line interface lives in the binary (`src/cli`). Errors a caller may want to tell apart
//! are [`Error`]s; the cache folder is [`cache::cache_dir`].

pub mod cache;
pub mod engine;
mod error;
pub mod format;
pub mod model;
pub mod placement;
pub mod quantize;
pub mod synth;
pub mod text;

pub use error::Error;
