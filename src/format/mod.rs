//! File formats, with no model knowledge: GGUF read/write, safetensors read, ggml block codecs.

pub mod codec;
mod ggml_type;
pub mod gguf;
pub mod safetensors;

pub use ggml_type::GgmlType;
