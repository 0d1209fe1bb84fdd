//! The errors callers of the library may want to tell apart (the rest are `anyhow` errors with
//! context). They travel inside `anyhow::Error`: `err.downcast_ref::<mixtral_q::Error>()` finds them,
//! and `{:#}` prints them as one line, as every error of this crate.

use crate::format::GgmlType;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A forward call with more tokens than the KV cache has room for.
    ContextFull { cached: usize, new: usize, capacity: usize },
    /// A token id the model's vocabulary does not have.
    TokenOutOfVocabulary { token: u32, vocab: usize },
    /// A tensor type the engines cannot compute with.
    UnsupportedType(GgmlType),
    /// `--device cuda` (or a CUDA engine) where CUDA cannot be used: why.
    NoGpu(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::ContextFull { cached, new, capacity } => {
                write!(f, "{new} new tokens after {cached} do not fit in the context of {capacity} tokens")
            }
            Error::TokenOutOfVocabulary { token, vocab } => {
                write!(f, "token id {token} is outside the vocabulary of {vocab} tokens")
            }
            Error::UnsupportedType(ty) => write!(f, "type {ty} is not supported"),
            Error::NoGpu(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Error {}
