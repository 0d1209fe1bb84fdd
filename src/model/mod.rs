//! The model: hyperparameters and tensor names (one source of truth for shapes), and weight handles
//! that point into a memory-mapped GGUF.

pub mod config;
pub mod names;
pub mod weights;

pub use config::ModelConfig;
