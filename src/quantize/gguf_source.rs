//! Requantizing a GGUF file (what `llama-quantize` does): the hyperparameters come from its metadata,
//! the values from its tensors, decoded row by row from their stored type. Its tensors are in GGUF
//! layout already (q and k rows in llama.cpp's RoPE order, experts merged or one tensor each), so
//! nothing is permuted; every metadata key is kept but the file type.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::pipeline::{write_gguf, QuantizeOptions, QuantizeReport};
use super::source::{RowSource, SourceLayout};
use crate::format::codec;
use crate::format::gguf::{GgufFile, TensorInfo};
use crate::format::GgmlType;
use crate::model::names;
use crate::model::ModelConfig;

/// Requantizes the GGUF file `input` to `opts.target` at `out` (which may be `input` itself: the
/// output is written beside it and renamed over it only once complete, and the mapping of the input
/// stays valid through the rename).
pub fn requantize_gguf(input: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let file = GgufFile::open(input)?;
    let cfg = mixtral_config(&file).with_context(|| format!("in {}", input.display()))?;
    let mut meta = file.metadata.clone();
    // The output is one file, whatever the input was split from (llama-quantize drops them too).
    for key in ["split.no", "split.count", "split.tensors.count"] {
        meta.remove(key);
    }
    write_gguf(&GgufSource { file: &file, n_experts: cfg.n_experts }, &cfg, meta, out, opts)
}

/// The hyperparameters of a Mixtral in `file`, and a check that it holds no tensor a Mixtral of them
/// has not (the output would silently lack it).
fn mixtral_config(file: &GgufFile) -> Result<ModelConfig> {
    let split = file.metadata.get_u64("split.count").unwrap_or(1);
    ensure!(
        split <= 1,
        "this is one part of a GGUF split in {split} files: merge them first (llama-gguf-split --merge)"
    );
    let cfg = ModelConfig::from_gguf(&file.metadata)?;
    crate::model::weights::check_layers(&cfg)?;
    let mut known = HashSet::new();
    for (name, _) in cfg.gguf_tensors() {
        if let Some((layer, t)) = names::split_layer_tensor(&name).filter(|(_, t)| t.is_expert()) {
            let per_expert: Vec<String> =
                (0..cfg.n_experts).filter_map(|e| t.per_expert_gguf_name(layer, e)).collect();
            // Both layouts at once would leave one of them unread: which holds the model is unclear.
            if let Some(both) = per_expert.iter().find(|n| file.tensor(&name).and(file.tensor(n)).is_some()) {
                bail!(
                    "tensor {name} and the per-expert {both} are both present: which one holds the experts?"
                );
            }
            known.extend(per_expert);
        }
        known.insert(name);
    }
    if let Some(t) = file.tensors.iter().find(|t| !known.contains(&t.name)) {
        bail!(
            "tensor {} is not one of a Mixtral's ({} layers, {} experts): requantizing would drop it",
            t.name,
            cfg.n_layers,
            cfg.n_experts
        );
    }
    Ok(cfg)
}

/// The rows of a GGUF file's tensors, by GGUF name.
struct GgufSource<'f> {
    file: &'f GgufFile,
    /// Experts per layer, as the metadata says: a merged tensor must hold exactly this many.
    n_experts: usize,
}

/// Where one source matrix lies in the file: a whole tensor, or one expert's rows of a merged one.
struct Slab<'f> {
    info: &'f TensorInfo,
    first_row: usize,
    rows: usize,
    /// Row-major shape of the matrix (a 1-D tensor is one row).
    shape: Vec<usize>,
}

impl Slab<'_> {
    fn cols(&self) -> usize {
        self.info.dims.first().map_or(1, |&d| d as usize)
    }

    /// Encoded bytes of a row (rows are whole blocks: the reader checked every tensor).
    fn row_bytes(&self) -> usize {
        self.info.ty.bytes_for(self.cols()).unwrap_or(0)
    }

    /// The slab's byte range within the tensor's data.
    fn byte_range(&self) -> std::ops::Range<usize> {
        let row = self.row_bytes();
        self.first_row * row..(self.first_row + self.rows) * row
    }
}

impl<'f> GgufSource<'f> {
    /// The tensor `name`, or (for a per-expert name) the expert's slab of the merged tensor, which
    /// stores experts expert-major (`[cols, rows, n_experts]` in ggml order).
    fn slab(&self, name: &str) -> Result<Slab<'f>> {
        let whole = |info: &'f TensorInfo| {
            let rows = info.dims[1..].iter().product::<u64>() as usize;
            Slab { info, first_row: 0, rows, shape: info.shape() }
        };
        if let Some(info) = self.file.tensor(name) {
            return Ok(whole(info));
        }
        let Some((layer, t, expert)) = names::split_per_expert(name) else {
            bail!("tensor {name} is missing");
        };
        let merged = t.gguf_name(layer);
        let Some(info) = self.file.tensor(&merged) else {
            bail!("tensor {merged} is missing (and so is the per-expert {name})");
        };
        match info.dims[..] {
            [cols, rows, n] if n == self.n_experts as u64 && expert < self.n_experts => Ok(Slab {
                info,
                first_row: expert * rows as usize,
                rows: rows as usize,
                shape: vec![rows as usize, cols as usize],
            }),
            _ => bail!(
                "tensor {merged} has dims {:?}, but a merged expert tensor of this model is [cols, rows, {}]",
                info.dims,
                self.n_experts
            ),
        }
    }
}

impl RowSource for GgufSource<'_> {
    fn layout(&self) -> SourceLayout {
        SourceLayout::Gguf
    }

    fn origin(&self) -> String {
        self.file.path.display().to_string()
    }

    /// One expert's slab of a merged tensor is named by the tensor the file has.
    fn describe(&self, name: &str) -> String {
        match (self.file.tensor(name), names::split_per_expert(name)) {
            (None, Some((layer, t, expert))) => format!("{} (expert {expert})", t.gguf_name(layer)),
            _ => name.to_string(),
        }
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.slab(name)?.shape)
    }

    fn read_row(&self, name: &str, row: usize, out: &mut [f32]) -> Result<()> {
        let slab = self.slab(name)?;
        ensure!(row < slab.rows, "row {row} of tensor {name}, which has {} rows", slab.rows);
        ensure!(
            out.len() == slab.cols(),
            "rows of tensor {name} have {} values, not {}",
            slab.cols(),
            out.len()
        );
        let bytes = slab.row_bytes();
        let data = &self.file.tensor_data(slab.info)[slab.byte_range()];
        codec::dequantize(slab.info.ty, &data[row * bytes..][..bytes], out)
            .with_context(|| format!("{}: tensor {name}", self.file.path.display()))
    }

    fn source_bytes(&self, name: &str) -> u64 {
        self.slab(name).map_or(0, |s| s.byte_range().len() as u64)
    }

    fn stored(&self, name: &str) -> Option<(GgmlType, &[u8])> {
        let slab = self.slab(name).ok()?;
        Some((slab.info.ty, &self.file.tensor_data(slab.info)[slab.byte_range()]))
    }

    fn done_with(&self, name: &str) {
        if let Ok(slab) = self.slab(name) {
            let range = slab.byte_range();
            self.file.release(slab.info, range.start as u64..range.end as u64);
        }
    }
}
