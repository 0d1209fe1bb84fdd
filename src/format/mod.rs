//! File formats, with no model knowledge: GGUF read/write, safetensors read, ggml block codecs.

pub mod codec;
pub mod gguf;
pub mod safetensors;
mod ggml_type;

pub use ggml_type::GgmlType;
