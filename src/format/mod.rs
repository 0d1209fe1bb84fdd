//! File formats, with no model knowledge: GGUF read/write, safetensors read, ggml block codecs, and
//! atomic output files.

pub mod codec;
mod ggml_type;
pub mod gguf;
pub mod output;
pub mod safetensors;

pub use ggml_type::GgmlType;
