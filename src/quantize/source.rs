//! Where the values of a conversion come from: a source of rows, addressed by the names of the layout
//! it stores the model in.

use anyhow::Result;

use crate::format::safetensors::Checkpoint;
use crate::format::GgmlType;

/// How a source names and lays out the model's tensors; the pipeline plans each GGUF tensor's
/// sources from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceLayout {
    /// Hugging Face names (`model.layers.N.self_attn.q_proj.weight`), one tensor per expert, q and k
    /// rows in Hugging Face's RoPE order (the pipeline permutes them for llama.cpp's).
    HuggingFace,
    /// GGUF names, rows already in llama.cpp's order. Each expert's matrix is named by its
    /// per-expert GGUF name (`blk.N.ffn_gate.E.weight`), whether the file stores it so or as slab E of
    /// the merged `blk.N.ffn_gate_exps.weight`.
    Gguf,
}

/// Where the values of the source tensors come from: a checkpoint, a GGUF file being requantized, or
/// `synth`'s random generator.
pub trait RowSource: Sync {
    /// The naming and row order of this source's tensors.
    fn layout(&self) -> SourceLayout;
    /// The file or folder the values come from, named in errors about them.
    fn origin(&self) -> String;
    /// How errors name the source tensor `name` (by default, `name` itself).
    fn describe(&self, name: &str) -> String {
        name.to_string()
    }
    /// Row-major shape of the source tensor `name` (an error names a tensor that is missing).
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// Fills `out` with row `row` of the source tensor `name` (a 1-D tensor is one row).
    fn read_row(&self, name: &str, row: usize, out: &mut [f32]) -> Result<()>;
    /// Bytes the tensor takes in the source (for the progress bar and the throughput).
    fn source_bytes(&self, name: &str) -> u64;
    /// The tensor's ggml type and encoded bytes, when the source stores it in a ggml encoding: a
    /// tensor already in its target type is then copied instead of decoded and rounded again, and a
    /// quantized one is not requantized without being asked to.
    fn stored(&self, _name: &str) -> Option<(GgmlType, &[u8])> {
        None
    }
    /// Called once a source tensor is converted: its memory may be released.
    fn done_with(&self, _name: &str) {}
}

impl RowSource for Checkpoint {
    fn layout(&self) -> SourceLayout {
        SourceLayout::HuggingFace
    }

    fn origin(&self) -> String {
        self.dir().display().to_string()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.tensor(name)?.shape)
    }

    fn read_row(&self, name: &str, row: usize, out: &mut [f32]) -> Result<()> {
        self.tensor(name)?.row_to_f32(row, out)
    }

    fn source_bytes(&self, name: &str) -> u64 {
        self.tensor(name).map(|t| t.data.len() as u64).unwrap_or(0)
    }

    // No `stored`: safetensors dtypes are not ggml encodings to copy (and q/k rows are permuted).

    fn done_with(&self, name: &str) {
        self.release(name);
    }
}
