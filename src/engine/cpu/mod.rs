//! The CPU backend (in progress).

pub mod dot;
