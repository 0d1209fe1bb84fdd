//! Text: the tokenizer (HF tokenizer.json or the GGUF vocabulary), incremental decoding, chat templates,
//! sampling, and the tokenizer metadata the quantizer writes into GGUF files.

mod chat_template;
mod gguf_vocab;
mod sampling;
mod spm;
mod stream;
mod tokenizer;

pub use chat_template::{fold_system_prompt, ChatTemplate, Message};
pub use gguf_vocab::tokenizer_metadata;
pub use sampling::{Sampler, SamplingParams, DEFAULT_SEED};
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;
