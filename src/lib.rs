//! mixtral-q: Mixtral-8x7B in 4 bits on consumer hardware.
//!
//! The modules follow the data flow:
//! `format` (GGUF, safetensors, block codecs) → `quantize` (HF checkpoint → GGUF) →
//! `model` (config and weights over a memory-mapped GGUF) → `placement` (what lives where) →
//! `engine` (the forward pass per backend) → `text` (tokenizer, chat template, sampling);
//! `routing` analyses the engine's expert choices on a text (the Mixtral paper's §5).
//! The command-line interface lives in the binary (`src/cli`).

pub mod engine;
pub mod format;
pub mod model;
pub mod placement;
pub mod quantize;
pub mod routing;
pub mod synth;
pub mod text;
