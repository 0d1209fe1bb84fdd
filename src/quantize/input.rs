//! What `quantize` was given: a Hugging Face checkpoint directory, or a GGUF file to requantize.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::gguf_source::requantize_gguf;
use super::pipeline::{quantize_checkpoint, QuantizeOptions, QuantizeReport};

/// The kinds of input `quantize` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// A directory: config.json, safetensors shards, tokenizer.
    HuggingFace,
    /// A file starting with the GGUF magic.
    Gguf,
}

impl InputKind {
    /// Tells the kinds apart by what `path` is: a directory, or a file whose first bytes are "GGUF"
    /// (whatever its name ends in).
    pub fn of(path: &Path) -> Result<InputKind> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
        if meta.is_dir() {
            return Ok(InputKind::HuggingFace);
        }
        let mut magic = [0u8; 4];
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let n = file.read(&mut magic).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 4 && &magic == b"GGUF" {
            return Ok(InputKind::Gguf);
        }
        bail!(
            "{} is neither a Hugging Face checkpoint directory nor a GGUF file (it does not start with \"GGUF\")",
            path.display()
        )
    }
}

/// Converts `input` (a Hugging Face checkpoint directory, or a GGUF file to requantize) to a GGUF of
/// `opts.target` at `out`.
pub fn quantize_input(input: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    match InputKind::of(input)? {
        InputKind::HuggingFace => quantize_checkpoint(input, out, opts),
        InputKind::Gguf => requantize_gguf(input, out, opts),
    }
}
