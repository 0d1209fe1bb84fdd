//! `mixtral-q quantize`: a Hugging Face Mixtral checkpoint → a GGUF laid out as llama.cpp lays out
//! Mixtral, or a GGUF → a GGUF of another type mix (requantizing, as `llama-quantize` does).
//! Streaming: inputs are memory-mapped, one source matrix at a time is converted (rows in parallel)
//! and handed to a writer thread, so memory stays bounded by a few matrices. The output is written to
//! a temporary file beside the destination and renamed only on success.

mod gguf_source;
mod input;
mod permute;
mod pipeline;
mod plan;
mod source;

pub use gguf_source::requantize_gguf;
pub use input::{quantize_input, InputKind};
pub use pipeline::{
    new_model_metadata, quantize_checkpoint, set_file_type, write_gguf, QuantizeOptions, QuantizeReport,
    TensorReport,
};
pub use plan::{
    fit_row, parse_tensor_override, parse_type, tensor_type, tensor_types, ModelShape, Target, TensorRole,
    TypeOverrides,
};
pub use source::{RowSource, SourceLayout};
