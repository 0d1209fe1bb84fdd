//! Reading Hugging Face safetensors checkpoints, memory-mapped: tensor data is borrowed from the
//! mapping, never copied to the heap.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

/// Bytes of the little-endian u64 header length that starts every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// One memory-mapped safetensors file with its parsed (and validated) header.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    /// Absolute offset of the data section (tensor offsets in `header` are relative to it).
    data_start: usize,
    header: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping; a concurrent truncation of the checkpoint by another process is
        // outside what we can guard against.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        // read_metadata checks that every tensor's offsets fit its shape and dtype and that the
        // tensors exactly cover the file, so slicing the mapping later cannot go out of bounds.
        let (header_len, header) = SafeTensors::read_metadata(&map)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            data_start: HEADER_LEN_BYTES + header_len,
            map,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_names(&self) -> Vec<String> {
        self.header.offset_keys()
    }

    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let info = self
            .header
            .info(name)
            .with_context(|| format!("tensor {name} is not in {}", self.path.display()))?;
        let dtype = match info.dtype {
            Dtype::F32 => SourceDtype::F32,
            Dtype::F16 => SourceDtype::F16,
            Dtype::BF16 => SourceDtype::BF16,
            other => bail!("tensor {name} in {} has unsupported dtype {other:?}", self.path.display()),
        };
        let (start, end) = info.data_offsets;
        Ok(TensorRef {
            name: name.to_string(),
            dtype,
            shape: info.shape.clone(),
            data: &self.map[self.data_start + start..self.data_start + end],
        })
    }

    fn file_size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Drops the pages of tensor `name` from this process's memory (they are read again from the
    /// file if touched later). Converting a 93 GB checkpoint would otherwise keep every page read so
    /// far resident in the mapping.
    pub fn release(&self, name: &str) {
        let Some(info) = self.header.info(name) else { return };
        let (start, end) = info.data_offsets;
        // Advice needs a page-aligned start: round inward so no neighbouring tensor is affected.
        let page = 4096;
        let first = (self.data_start + start).div_ceil(page) * page;
        let last = (self.data_start + end) / page * page;
        if last > first {
            // SAFETY: the mapping is read-only and file-backed, so DontNeed only drops clean pages that
            // the kernel re-reads from the file on the next access; no data can be lost. Failure only
            // means the pages stay resident.
            let _ = unsafe {
                self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }
}

/// The source dtypes we convert from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    F16,
    BF16,
}

impl SourceDtype {
    pub fn size(self) -> usize {
        match self {
            SourceDtype::F32 => 4,
            SourceDtype::F16 | SourceDtype::BF16 => 2,
        }
    }
}

/// A tensor's bytes, borrowed from the mapping (little-endian, row-major, possibly unaligned).
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    pub name: String,
    pub dtype: SourceDtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts every element to f32 into `out`, which must hold exactly `n_elements()` values.
    pub fn to_f32(&self, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == self.n_elements() && self.data.len() == out.len() * self.dtype.size(),
            "tensor {}: cannot convert {} bytes of {:?} into {} f32 values",
            self.name,
            self.data.len(),
            self.dtype,
            out.len()
        );
        convert_to_f32(self.dtype, self.data, out);
        Ok(())
    }

    /// Converts row `row` (the last dimension is the row) into `out`, which must hold one row.
    pub fn row_to_f32(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = self.n_elements() / cols.max(1);
        ensure!(
            row < rows && out.len() == cols,
            "tensor {}: no row {row} of {} values (shape {:?})",
            self.name,
            out.len(),
            self.shape
        );
        let size = self.dtype.size();
        convert_to_f32(self.dtype, &self.data[row * cols * size..(row + 1) * cols * size], out);
        Ok(())
    }
}

/// Little-endian `dtype` values → f32; `bytes` holds exactly `out.len()` values.
fn convert_to_f32(dtype: SourceDtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        SourceDtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        // bf16 is the top half of an f32: a shift the compiler vectorizes.
        SourceDtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        // The data may be unaligned: copy a chunk into an aligned buffer, then let `half`
        // convert it (with F16C where the CPU has it).
        SourceDtype::F16 => {
            const CHUNK: usize = 1024;
            let mut buf = [half::f16::ZERO; CHUNK];
            for (o, b) in out.chunks_mut(CHUNK).zip(bytes.chunks(2 * CHUNK)) {
                let buf = &mut buf[..o.len()];
                for (h, b) in buf.iter_mut().zip(b.chunks_exact(2)) {
                    *h = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                buf.convert_to_f32_slice(o);
            }
        }
    }
}

/// A Hugging Face checkpoint directory: sharded (`model.safetensors.index.json`) or a single
/// `model.safetensors`.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → index into `shards`.
    shard_of: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single_path = dir.join("model.safetensors");
        if index_path.exists() {
            Self::open_sharded(dir, &index_path)
        } else if single_path.exists() {
            let shard = SafetensorsFile::open(&single_path)?;
            let shard_of = shard.tensor_names().into_iter().map(|n| (n, 0)).collect();
            Ok(Checkpoint { dir: dir.to_path_buf(), shards: vec![shard], shard_of })
        } else {
            bail!(
                "{} has neither model.safetensors.index.json nor model.safetensors: not a Hugging Face \
                 safetensors checkpoint",
                dir.display()
            )
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
        let weight_map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no \"weight_map\" object", index_path.display()))?;
        let mut shards = Vec::new();
        let mut shard_index: HashMap<&str, usize> = HashMap::new();
        let mut shard_of = HashMap::new();
        for (name, shard) in weight_map {
            let shard = shard.as_str().with_context(|| {
                format!("{}: shard of tensor {name} is not a string", index_path.display())
            })?;
            let i = match shard_index.get(shard) {
                Some(&i) => i,
                None => {
                    ensure!(
                        !shard.contains('/') && !shard.contains('\\'),
                        "{}: shard name {shard:?} is not a plain file name",
                        index_path.display()
                    );
                    let path = dir.join(shard);
                    ensure!(
                        path.exists(),
                        "shard {} named in {} is missing",
                        path.display(),
                        index_path.display()
                    );
                    shards.push(SafetensorsFile::open(&path)?);
                    shard_index.insert(shard, shards.len() - 1);
                    shards.len() - 1
                }
            };
            ensure!(
                shards[i].header.info(name).is_some(),
                "tensor {name} is listed in {} but missing from {}",
                index_path.display(),
                shards[i].path.display()
            );
            shard_of.insert(name.clone(), i);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, shard_of })
    }

    /// The checkpoint's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        match self.shard_of.get(name) {
            Some(&i) => self.shards[i].tensor(name),
            None => bail!("tensor {name} is not in the checkpoint ({} shards)", self.shards.len()),
        }
    }

    /// See [`SafetensorsFile::release`].
    pub fn release(&self, name: &str) {
        if let Some(&i) = self.shard_of.get(name) {
            self.shards[i].release(name);
        }
    }

    /// Sum of the shard file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(SafetensorsFile::file_size).sum()
    }

    pub fn shard_paths(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shard_of.keys().cloned().collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral")
    }

    /// A one-tensor safetensors file written by the crate itself.
    fn write_file(path: &Path, dtype: Dtype, shape: Vec<usize>, data: &[u8]) {
        let view = safetensors::tensor::TensorView::new(dtype, shape, data).unwrap();
        safetensors::serialize_to_file([("t", view)], None, path).unwrap();
    }

    #[test]
    fn reads_the_sharded_tiny_checkpoint() {
        let ck = Checkpoint::open(&tiny()).unwrap();
        assert_eq!(ck.shard_paths().len(), 2);
        let embed = ck.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(embed.dtype, SourceDtype::BF16);
        assert_eq!(embed.shape, vec![512, 128]);
        let mut out = vec![0f32; embed.n_elements()];
        embed.to_f32(&mut out).unwrap();
        // bf16 → f32 is exact; weights of a randomly initialised model are small, finite and not all 0.
        assert!(out.iter().all(|v| v.is_finite() && v.abs() < 10.0));
        assert!(out.iter().any(|&v| v != 0.0));
        let w2 = ck.tensor("model.layers.1.block_sparse_moe.experts.7.w2.weight").unwrap();
        assert_eq!(w2.shape, vec![128, 224]);
        let sizes: u64 = ck.shard_paths().iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
        assert_eq!(ck.total_bytes(), sizes);
        let err = ck.tensor("model.nope").unwrap_err().to_string();
        assert!(err.contains("model.nope"), "{err}");
    }

    #[test]
    fn converts_f16_bf16_f32_at_odd_offsets() {
        let values: Vec<f32> = (0..3000).map(|i| (i as f32 - 1500.0) * 0.125).collect();
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let f32b: Vec<u8> = values.iter().flat_map(|&v| v.to_le_bytes()).collect();
        let rounded = |f: fn(f32) -> f32| values.iter().map(|&v| f(v)).collect::<Vec<f32>>();
        let cases = [
            (SourceDtype::F16, &f16, rounded(|v| half::f16::from_f32(v).to_f32())),
            (SourceDtype::BF16, &bf16, rounded(|v| half::bf16::from_f32(v).to_f32())),
            (SourceDtype::F32, &f32b, values.clone()),
        ];
        for (dtype, bytes, expected) in cases {
            // Shift the data by one byte so that it is unaligned.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(bytes);
            let t = TensorRef { name: "t".into(), dtype, shape: vec![3, 1000], data: &shifted[1..] };
            let mut out = vec![f32::NAN; 3000];
            t.to_f32(&mut out).unwrap();
            assert!(out == expected, "{dtype:?} conversion differs");
            assert!(t.to_f32(&mut out[..2999]).is_err());
        }
    }

    #[test]
    fn corrupt_checkpoints_give_errors_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let copy = |name: &str| std::fs::copy(tiny().join(name), dir.path().join(name)).unwrap();
        copy("model.safetensors.index.json");
        copy("model-00001-of-00002.safetensors");
        // Missing shard.
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
        // Truncated shard.
        let shard2 = dir.path().join("model-00002-of-00002.safetensors");
        let bytes = std::fs::read(tiny().join("model-00002-of-00002.safetensors")).unwrap();
        std::fs::write(&shard2, &bytes[..bytes.len() - 100]).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        // Garbage header.
        let mut garbage = bytes.clone();
        garbage[8..40].fill(b'#');
        std::fs::write(&shard2, &garbage).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("not a valid"), "{err}");
        // Header length beyond the file, and an empty file.
        std::fs::write(&shard2, u64::MAX.to_le_bytes()).unwrap();
        assert!(SafetensorsFile::open(&shard2).is_err());
        std::fs::write(&shard2, b"").unwrap();
        assert!(SafetensorsFile::open(&shard2).is_err());
        // A file with neither index nor single model file.
        let empty = tempfile::tempdir().unwrap();
        assert!(Checkpoint::open(empty.path()).is_err());
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_file(&path, Dtype::I64, vec![2], &[0u8; 16]);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let err = ck.tensor("t").unwrap_err().to_string();
        assert!(err.contains("unsupported dtype I64") && err.contains("model.safetensors"), "{err}");
        write_file(&path, Dtype::F16, vec![2], &[0, 0x3c, 0, 0xc0]);
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.tensor_names(), vec!["t".to_string()]);
        let mut out = [0f32; 2];
        f.tensor("t").unwrap().to_f32(&mut out).unwrap();
        assert_eq!(out, [1.0, -2.0]);
    }
}
