//! Incremental decoding for printing tokens as they are generated.

use anyhow::Result;

use super::tokenizer::Tokenizer;

/// Streams decoded text token by token; emits only complete UTF-8 (byte-fallback tokens <0xE2><0x82><0xAC> are
/// buffered until the character is whole), never U+FFFD for split characters; handles the SentencePiece "▁"
/// leading-space rule the same way decode() of the whole sequence does (concatenating pushes == decode(all)):
/// one leading space of the whole text is dropped.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
    at_start: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder { tok, pending: Vec::new(), at_start: true }
    }

    /// For text that continues other text (a prompt's continuation): the leading space is kept, so
    /// `prompt + pushes` reads as the whole sequence does ("Ownership is" + "▁to" → "Ownership is to").
    pub fn keep_leading_space(&mut self) {
        self.at_start = false;
    }

    /// The text that token `id` completes (possibly empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        let bytes = self.tok.token_bytes(id)?;
        self.pending.extend_from_slice(&bytes);
        self.strip_leading_space();
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: the prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Bytes that no continuation can make valid: show them as U+FFFD like decode().
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// What is still buffered (an unfinished character, as U+FFFD), at the end of generation.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    fn strip_leading_space(&mut self) {
        if self.at_start && !self.pending.is_empty() {
            if self.pending[0] == b' ' {
                self.pending.remove(0);
            }
            self.at_start = false;
        }
    }
}
