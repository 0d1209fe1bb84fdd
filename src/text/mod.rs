//! Text: the tokenizer (HF tokenizer.json or the GGUF vocabulary), incremental decoding, chat templates,
//! sampling, generation over a kept KV cache, stop sequences, and the tokenizer metadata the quantizer
//! writes into GGUF files.

pub mod budget;
mod chat_template;
mod generation;
mod gguf_vocab;
mod sampling;
mod spm;
mod stop;
mod stream;
mod tokenizer;

pub use chat_template::{fold_system_prompt, ChatTemplate, Message};
pub use generation::{common_prefix, Generation, KnownPrefix, Sequence, Step, StopReason, PREFILL_CHUNK};
pub use gguf_vocab::tokenizer_metadata;
pub use sampling::{InvalidSampling, Sampler, SamplingParams, DEFAULT_SEED};
pub use stop::StopSequences;
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;
