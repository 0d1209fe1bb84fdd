//! GGUF v3: a reader over a memory-mapped file (bounded allocations on hostile input) and a
//! streaming writer that lays tensors out at precomputed offsets.

mod read;
mod value;
mod write;

pub use read::{GgufFile, TensorInfo};
pub use value::{value_type, MetaValue, Metadata};
pub use write::{GgufFileWriter, GgufLayout};
