//! Importance matrices in llama.cpp's two file formats, so that files move between `llama-imatrix`,
//! `llama-quantize` and ours both ways.
//!
//! An importance matrix holds, for each weight matrix a model multiplies activations with, the sum of
//! each input column's squares over a calibration text and how many input rows were summed: the
//! column's importance is the mean `E[x²]`, the factor by which an error in that column's weights
//! moves the product. Names are the GGUF tensor names (`blk.0.attn_q.weight`); a merged expert
//! tensor (`blk.0.ffn_down_exps.weight`) has one matrix per expert, each with its own count (the
//! tokens routed to it).
//!
//! - **GGUF** (llama.cpp's default, chosen here by a `.gguf` extension): per entry the F32 tensors
//!   `NAME.in_sum2` (`[n_mat, cols]`: the raw sums) and `NAME.counts` (`[n_mat, 1]`), with the
//!   metadata `general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`,
//!   `imatrix.chunk_size`.
//! - **Legacy `.dat`** (any other name): `i32` entry count; per entry `i32` name length, the name,
//!   `i32` ncall, `i32` value count, then `f32` values `mean(x²)·ncall` (the per-matrix counts are
//!   lost: a reader divides by ncall); then the optional `i32` chunk count and `i32`-length dataset
//!   name. All little-endian.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::gguf::{GgufFile, GgufFileWriter, GgufLayout, MetaValue, Metadata};
use super::output::{write_atomic, AtomicOutput};
use super::GgmlType;

/// The GGUF magic, which tells the two formats apart.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Entries at most in a legacy file (Mixtral has 8 per layer): bounds what a corrupt count allocates.
const MAX_ENTRIES: usize = 1 << 16;

/// One weight tensor's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Σ x² per input column, matrix after matrix: `[n_mat, cols]`.
    pub sums: Vec<f64>,
    /// Input rows summed per matrix (`n_mat` values).
    pub counts: Vec<u64>,
}

impl Entry {
    /// An empty entry for `n_mat` matrices of `cols` columns.
    pub fn new(n_mat: usize, cols: usize) -> Entry {
        Entry { sums: vec![0.0; n_mat * cols], counts: vec![0; n_mat] }
    }

    pub fn n_mat(&self) -> usize {
        self.counts.len()
    }

    pub fn cols(&self) -> usize {
        self.sums.len() / self.counts.len().max(1)
    }

    /// The importance of matrix `m`'s columns, `E[x²]`; all ones for a matrix that saw no input (an
    /// expert never routed to), as llama.cpp's quantizer does.
    pub fn importance(&self, m: usize) -> Vec<f32> {
        let cols = self.cols();
        let sums = &self.sums[m * cols..(m + 1) * cols];
        match self.counts[m] {
            0 => vec![1.0; cols],
            n => sums.iter().map(|&s| (s / n as f64) as f32).collect(),
        }
    }
}

/// An importance matrix: entries by GGUF tensor name, and where they came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportanceMatrix {
    pub entries: BTreeMap<String, Entry>,
    /// The calibration files.
    pub datasets: Vec<String>,
    /// Chunks of `chunk_size` tokens processed.
    pub chunk_count: u32,
    /// Tokens per chunk (0 when unknown: legacy files do not record it).
    pub chunk_size: u32,
}

impl ImportanceMatrix {
    /// Reads either format (GGUF by its magic, legacy otherwise).
    pub fn read(path: &Path) -> Result<ImportanceMatrix> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let m = if bytes.starts_with(GGUF_MAGIC) {
            from_gguf(&GgufFile::from_bytes(path, &bytes)?)
        } else {
            from_legacy(&bytes)
        };
        let m = m.with_context(|| format!("{} is not a usable importance matrix", path.display()))?;
        ensure!(!m.entries.is_empty(), "{} holds no importance matrix entries", path.display());
        Ok(m)
    }

    /// Writes GGUF when `path` ends in `.gguf` (as llama-imatrix decides), the legacy format
    /// otherwise; atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            self.write_gguf(path)
        } else {
            write_atomic(path, &self.to_legacy()?)
        }
    }

    /// The importance of each column of source matrix `m` of tensor `name` (expert `m` of a merged
    /// expert tensor, 0 otherwise), or `None` when the matrix has no entry. Errors when the entry's
    /// shape does not match `cols` and `n_mat` (an importance matrix of another model).
    pub fn importance(&self, name: &str, m: usize, n_mat: usize, cols: usize) -> Result<Option<Vec<f32>>> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        ensure!(
            e.sums.len() == n_mat * cols && (e.n_mat() == n_mat || e.n_mat() == 1),
            "the importance matrix has {} values in {} matrices for {name}, the model's tensor has {n_mat} \
             matrices of {cols} columns: it was computed for another model",
            e.sums.len(),
            e.n_mat()
        );
        Ok(Some(if e.n_mat() == n_mat {
            e.importance(m)
        } else {
            // A legacy file keeps one count for all of a tensor's matrices (its values were scaled
            // by it): matrix `m` is a slice of the one vector.
            e.importance(0)[m * cols..(m + 1) * cols].to_vec()
        }))
    }

    fn write_gguf(&self, path: &Path) -> Result<()> {
        let mut meta = Metadata::new();
        meta.set("general.type", MetaValue::String("imatrix".into()));
        meta.set("imatrix.datasets", MetaValue::string_array(self.datasets.iter().cloned()));
        meta.set("imatrix.chunk_count", MetaValue::U32(self.chunk_count));
        meta.set("imatrix.chunk_size", MetaValue::U32(self.chunk_size));
        let mut tensors = Vec::new();
        for (name, e) in &self.entries {
            let (cols, n_mat) = (e.cols() as u64, e.n_mat() as u64);
            tensors.push((format!("{name}.in_sum2"), vec![cols, n_mat], GgmlType::F32));
            tensors.push((format!("{name}.counts"), vec![1, n_mat], GgmlType::F32));
        }
        let out = AtomicOutput::create(path)?;
        let writer = GgufFileWriter::new(out.file(), GgufLayout::new(meta, tensors)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        for (i, e) in self.entries.values().enumerate() {
            let sums: Vec<f32> = e.sums.iter().map(|&s| s as f32).collect();
            let counts: Vec<f32> = e.counts.iter().map(|&c| c as f32).collect();
            writer.write_tensor(2 * i, bytemuck::cast_slice(&sums))?;
            writer.write_tensor(2 * i + 1, bytemuck::cast_slice(&counts))?;
        }
        writer.finish().with_context(|| format!("cannot write {}", path.display()))?;
        out.commit()
    }

    /// The legacy bytes: values `mean(x²)·ncall` with llama-imatrix's ncall, the number of chunks
    /// the busiest matrix saw (rounded up), so that readers dividing by ncall get the mean back.
    fn to_legacy(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let i32_of = |n: usize, what: &str| i32::try_from(n).with_context(|| format!("too many {what}"));
        out.extend(i32_of(self.entries.len(), "entries")?.to_le_bytes());
        for (name, e) in &self.entries {
            out.extend(i32_of(name.len(), "name bytes")?.to_le_bytes());
            out.extend(name.as_bytes());
            let max_count = e.counts.iter().copied().max().unwrap_or(0);
            let ncall = match self.chunk_size {
                0 => max_count,
                size => max_count.div_ceil(size as u64),
            }
            .max(1);
            out.extend(i32_of(ncall as usize, "calls")?.to_le_bytes());
            out.extend(i32_of(e.sums.len(), "values")?.to_le_bytes());
            for m in 0..e.n_mat() {
                for v in e.importance(m) {
                    out.extend((v * ncall as f32).to_le_bytes());
                }
            }
        }
        out.extend(i32_of(self.chunk_count as usize, "chunks")?.to_le_bytes());
        let dataset = self.datasets.last().map(String::as_str).unwrap_or("");
        out.extend(i32_of(dataset.len(), "dataset name bytes")?.to_le_bytes());
        out.extend(dataset.as_bytes());
        Ok(out)
    }
}

fn from_gguf(file: &GgufFile) -> Result<ImportanceMatrix> {
    let meta = &file.metadata;
    let datasets = meta
        .get_array("imatrix.datasets")
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let chunk_count = meta.get_u64("imatrix.chunk_count").unwrap_or(0) as u32;
    let chunk_size = meta.get_u64("imatrix.chunk_size").unwrap_or(0) as u32;
    ensure!(
        meta.get("imatrix.chunk_count").is_some() && meta.get("imatrix.chunk_size").is_some(),
        "a GGUF file without the imatrix.* metadata (a model, not an importance matrix?)"
    );
    let mut entries = BTreeMap::new();
    for t in &file.tensors {
        let Some(name) = t.name.strip_suffix(".in_sum2") else { continue };
        let counts_name = format!("{name}.counts");
        let counts =
            file.tensor(&counts_name).with_context(|| format!("{name} has sums but no {counts_name}"))?;
        ensure!(
            t.ty == GgmlType::F32 && counts.ty == GgmlType::F32,
            "{name}: sums and counts must be F32, found {} and {}",
            t.ty,
            counts.ty
        );
        let sums: Vec<f32> = f32s(file.tensor_data(t));
        let counts: Vec<f32> = f32s(file.tensor_data(counts));
        ensure!(
            !counts.is_empty() && sums.len().is_multiple_of(counts.len()),
            "{name}: {} sums do not split into {} matrices",
            sums.len(),
            counts.len()
        );
        ensure!(
            counts.iter().all(|c| c.is_finite() && *c >= 0.0)
                && sums.iter().all(|s| s.is_finite() && *s >= 0.0),
            "{name}: negative or non-finite sums or counts"
        );
        let entry = Entry {
            sums: sums.iter().map(|&s| s as f64).collect(),
            counts: counts.iter().map(|&c| c.round() as u64).collect(),
        };
        entries.insert(name.to_string(), entry);
    }
    Ok(ImportanceMatrix { entries, datasets, chunk_count, chunk_size })
}

/// Little-endian f32 values.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Reads little-endian values from a byte slice, with errors that say what was cut short.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        ensure!(self.bytes.len() >= n, "the file ends inside {what}");
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count in `0..=max`.
    fn count(&mut self, what: &str, max: usize) -> Result<usize> {
        let n = self.i32(what)?;
        match usize::try_from(n) {
            Ok(n) if n <= max => Ok(n),
            _ => bail!("{what} is {n}"),
        }
    }
}

fn from_legacy(bytes: &[u8]) -> Result<ImportanceMatrix> {
    let mut r = Reader { bytes };
    let n_entries = r.count("the entry count", MAX_ENTRIES)?;
    ensure!(n_entries > 0, "no entries");
    let mut entries = BTreeMap::new();
    for i in 0..n_entries {
        let len = r.count("a name length", 4096)?;
        let name = String::from_utf8(r.take(len, "a name")?.to_vec())
            .with_context(|| format!("entry {i}: the name is not UTF-8"))?;
        let ncall = r.i32(&format!("{name}'s call count"))?;
        // Values are bounded by the bytes left, so a corrupt count cannot allocate much.
        let nval = r.count(&format!("{name}'s value count"), r.bytes.len() / 4)?;
        ensure!(nval > 0, "{name} has no values");
        let values: Vec<f32> = f32s(r.take(4 * nval, &format!("{name}'s values"))?);
        ensure!(values.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}: negative or non-finite values");
        // Stored: mean(x²)·ncall. As one matrix with count ncall, `importance` gives the mean back;
        // llama.cpp takes the values as they are when ncall is 0, as a count of 1 does.
        let sums = values.iter().map(|&v| v as f64).collect();
        entries.insert(name, Entry { sums, counts: vec![ncall.max(1) as u64] });
    }
    // Optional trailer: the chunk count and the dataset's name.
    let (mut chunk_count, mut datasets) = (0, Vec::new());
    if !r.bytes.is_empty() {
        chunk_count = r.count("the chunk count", i32::MAX as usize)? as u32;
        if !r.bytes.is_empty() {
            let len = r.count("the dataset name length", r.bytes.len())?;
            if len > 0 {
                datasets.push(String::from_utf8_lossy(r.take(len, "the dataset name")?).into_owned());
            }
        }
    }
    Ok(ImportanceMatrix { entries, datasets, chunk_count, chunk_size: 0 })
}
