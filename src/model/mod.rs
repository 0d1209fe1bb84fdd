//! The model: hyperparameters and tensor names (one source of truth for shapes), the layer specs
//! derived from them (the architecture as data), and weight handles that point into a memory-mapped
//! GGUF.

pub mod config;
pub mod names;
pub mod spec;
pub mod weights;

pub use config::ModelConfig;
