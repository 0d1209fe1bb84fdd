//! GGUF v3: a reader over a memory-mapped file (bounded allocations on hostile input) and a
//! streaming writer that lays tensors out at precomputed offsets.

mod value;

pub use value::{value_type, MetaValue, Metadata};
