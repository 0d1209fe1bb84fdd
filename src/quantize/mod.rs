//! `mixtral-q quantize`: a Hugging Face Mixtral checkpoint → a GGUF laid out as llama.cpp lays out
//! Mixtral. Streaming: shards are memory-mapped, one source matrix at a time is converted (rows in
//! parallel) and handed to a writer thread, so memory stays bounded by a few matrices. The output is
//! written to a temporary file beside the destination and renamed only on success.

mod permute;
mod pipeline;
mod plan;

pub use pipeline::{
    quantize_checkpoint, write_gguf, QuantizeOptions, QuantizeReport, RowSource, TensorReport,
};
pub use plan::{fit_row, tensor_type, tensor_types, ModelShape, Target, TensorRole};
