//! mixtral-q: Mixtral-8x7B in 4 bits on consumer hardware.
//!
//! The modules follow the data flow:
//! `format` (GGUF, safetensors, block codecs, the ggml type descriptors) → `quantize` (HF checkpoint →
//! GGUF) → `model` (config, layer specs and weights over a memory-mapped GGUF) → `placement` (what lives
//! where) → `engine` (the transformer written once over backend ops; the CPU and CUDA backends;
//! `engine::open`) → `text` (tokenizer, chat template, sampling);
//! `routing` analyses the engine's expert choices on a text (the Mixtral paper's §5).
//! The command-line interface lives in the binary (`src/cli`). Errors a caller may want to tell apart
//! are [`Error`]s; the cache folder is [`cache::cache_dir`].

pub mod cache;
pub mod engine;
mod error;
pub mod format;
pub mod model;
pub mod placement;
pub mod quantize;
pub mod routing;
pub mod synth;
pub mod text;

pub use error::Error;
