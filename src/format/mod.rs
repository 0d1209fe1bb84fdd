//! File formats, with no model knowledge: GGUF read/write, safetensors read, ggml block codecs, and
//! atomic output files.

pub mod codec;
mod file_type;
mod ggml_type;
pub mod gguf;
pub mod imatrix;
pub mod output;
pub mod safetensors;

pub use file_type::{FileType, FILE_TYPES};
pub use ggml_type::{ActivationKind, GgmlType, TypeInfo};
