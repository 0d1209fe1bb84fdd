//! GGUF reader over a memory-mapped file.
//!
//! The file may be hostile or truncated: every count and length read from it is checked against the
//! bytes that remain before anything is allocated, so a claim of 2^60 array elements fails at once
//! instead of exhausting memory. Every error is one line that names the file.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;

use super::value::{value_type, MetaValue, Metadata};
use crate::format::GgmlType;

pub(super) const MAGIC: &[u8; 4] = b"GGUF";
pub(super) const DEFAULT_ALIGNMENT: u64 = 32;
pub(super) const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
pub(super) const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal, but a hostile file could nest them deep enough to overflow the stack.
const MAX_ARRAY_NESTING: usize = 16;
/// `Metadata::set` is a linear scan, so a huge key count would make parsing quadratic; real files
/// have a few dozen keys.
const MAX_KEYS: u64 = 1 << 16;

/// One tensor's entry in the GGUF tensor-info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost (row length) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.n_elements() / self.ty.block_len() as u64 * self.ty.block_bytes() as u64
    }

    /// Row-major shape (the ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Checks that the element count and byte size fit in 64 bits (and in `usize`) and that a row is
    /// a whole number of blocks; returns the byte size.
    pub(super) fn checked_n_bytes(&self) -> Result<u64> {
        let n = self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).with_context(|| {
            format!("tensor {}: element count of dims {:?} overflows", self.name, self.dims)
        })?;
        ensure!(
            usize::try_from(n).is_ok(),
            "tensor {}: {n} elements do not fit in this machine's address space",
            self.name
        );
        let block = self.ty.block_len() as u64;
        let row = self.dims.first().copied().unwrap_or(1);
        ensure!(
            row % block == 0,
            "tensor {}: row length {row} is not a multiple of the {} block size {block}",
            self.name,
            self.ty
        );
        Ok(n / block * self.ty.block_bytes() as u64)
    }
}

/// A parsed, validated GGUF file whose tensor data stays in the memory mapping.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    by_name: HashMap<String, usize>,
    map: Mmap,
    /// Whether `map` maps a file: only then may its pages be dropped (an anonymous mapping's pages
    /// would come back as zeros).
    file_backed: bool,
}

impl GgufFile {
    /// Maps the file and parses and validates its header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        if len == 0 {
            bail!("{} is empty (0 bytes), not a GGUF file", path.display());
        }
        // SAFETY: the mapping is read-only. Another process truncating or rewriting the file while it
        // is mapped is outside what we can guard against (as for every mmap-based model loader).
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::from_map(path, map, true)
    }

    /// Parses a GGUF file held in memory (copied into an anonymous mapping); `path` names it in
    /// errors. For tests and fuzzing: the same checks as [`GgufFile::open`].
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
        if bytes.is_empty() {
            bail!("{} is empty (0 bytes), not a GGUF file", path.display());
        }
        let mut map = memmap2::MmapOptions::new().len(bytes.len()).map_anon().context("cannot map memory")?;
        map.copy_from_slice(bytes);
        Self::from_map(path, map.make_read_only().context("cannot map memory")?, false)
    }

    fn from_map(path: &Path, map: Mmap, file_backed: bool) -> Result<GgufFile> {
        let header = parse(&map).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
            by_name,
            map,
            file_backed,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `t`, which must be one of this file's tensors (bounds were checked in
    /// `open`).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.map[start..start + t.n_bytes() as usize]
    }

    /// Drops the pages of `range` (bytes within tensor `t`'s data) from this process's memory; they
    /// are read again from the file if touched later. Requantizing a 93 GB file would otherwise keep
    /// every page read so far resident.
    pub fn release(&self, t: &TensorInfo, range: std::ops::Range<u64>) {
        if !self.file_backed {
            return;
        }
        let start = self.data_offset + t.offset + range.start;
        let end = self.data_offset + t.offset + range.end.min(t.n_bytes());
        // Advice needs a page-aligned start: round inward so that no neighbouring data is affected.
        let page = 4096;
        let (first, last) = (start.div_ceil(page) * page, end / page * page);
        if last > first && last <= self.map.len() as u64 {
            // SAFETY: the mapping is read-only and file-backed, so DontNeed only drops clean pages that
            // the kernel re-reads from the file on the next access; no data can be lost. Failure only
            // means the pages stay resident.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    first as usize,
                    (last - first) as usize,
                )
            };
        }
    }

    /// The whole mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }
}

struct Header {
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

fn parse(bytes: &[u8]) -> Result<Header> {
    let mut r = Cursor { bytes, pos: 0 };
    let magic = r.take(4, "magic").context("not a GGUF file")?;
    ensure!(magic == MAGIC, "not a GGUF file (starts with \"{}\", not \"GGUF\")", magic.escape_ascii());
    let version = r.u32("version")?;
    if !(1..=3).contains(&version) && (1..=3).contains(&version.swap_bytes()) {
        bail!("big-endian GGUF (version {}) is not supported", version.swap_bytes());
    }
    match version {
        1 => bail!("GGUF version 1 is not supported (only versions 2 and 3); re-convert the model"),
        2 | 3 => {}
        v => bail!("unknown GGUF version {v} (supported: 2 and 3)"),
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata key count")?;
    // Minimum encoded sizes: a KV is a key length, a type and at least one value byte; a tensor
    // info is a name length, n_dims, one dim, a type and an offset.
    r.check_count(n_kv, 8 + 4 + 1, "metadata keys")?;
    ensure!(n_kv <= MAX_KEYS, "claims {n_kv} metadata keys (at most {MAX_KEYS} accepted)");

    let mut metadata = Metadata::new();
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = r.string(&format!("key of metadata entry {i}"))?;
        ensure!(keys.insert(key.clone()), "duplicate metadata key {key}");
        let ty = r.u32(&format!("type of metadata key {key}"))?;
        let value = r.value(ty, 0).with_context(|| format!("metadata key {key}"))?;
        metadata.set(key, value);
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => bail!("{ALIGNMENT_KEY} = {v:?} is not a power of two"),
        },
    };

    r.check_count(n_tensors, 8 + 4 + 8 + 4 + 8, "tensor infos")?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let t = r.tensor_info(i)?;
        ensure!(names.insert(t.name.clone()), "duplicate tensor name {}", t.name);
        tensors.push(t);
    }

    let data_offset = align_up(r.pos as u64, alignment).context("data section offset overflows")?;
    let file_len = bytes.len() as u64;
    for t in &tensors {
        let n_bytes = t.checked_n_bytes()?;
        ensure!(
            t.offset % alignment == 0,
            "tensor {}: offset {} is not a multiple of the alignment {alignment}",
            t.name,
            t.offset
        );
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(n_bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => bail!(
                "tensor {}: data ({n_bytes} bytes at data offset {}) extends past the end of the file \
                 ({file_len} bytes; truncated?)",
                t.name,
                t.offset
            ),
        }
    }
    Ok(Header { version, metadata, tensors, alignment, data_offset })
}

pub(super) fn align_up(x: u64, alignment: u64) -> Option<u64> {
    Some(x.checked_add(alignment - 1)? / alignment * alignment)
}

/// A bounds-checked little-endian reader.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= left => {
                let s = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => bail!("truncated: {what} needs {n} bytes at offset {} but only {left} remain", self.pos),
        }
    }

    /// Rejects a count of items that could not fit in the remaining bytes even at `min_size` bytes
    /// each; called before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        let left = self.remaining() as u64;
        match count.checked_mul(min_size) {
            Some(need) if need <= left => Ok(()),
            _ => bail!(
                "claims {count} {what} at offset {}, more than the {left} remaining bytes can hold",
                self.pos
            ),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        use value_type as t;
        const W: &str = "value";
        Ok(match ty {
            t::U8 => MetaValue::U8(u8::from_le_bytes(self.array(W)?)),
            t::I8 => MetaValue::I8(i8::from_le_bytes(self.array(W)?)),
            t::U16 => MetaValue::U16(u16::from_le_bytes(self.array(W)?)),
            t::I16 => MetaValue::I16(i16::from_le_bytes(self.array(W)?)),
            t::U32 => MetaValue::U32(u32::from_le_bytes(self.array(W)?)),
            t::I32 => MetaValue::I32(i32::from_le_bytes(self.array(W)?)),
            t::U64 => MetaValue::U64(u64::from_le_bytes(self.array(W)?)),
            t::I64 => MetaValue::I64(i64::from_le_bytes(self.array(W)?)),
            t::F32 => MetaValue::F32(f32::from_le_bytes(self.array(W)?)),
            t::F64 => MetaValue::F64(f64::from_le_bytes(self.array(W)?)),
            t::BOOL => match self.array::<1>(W)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => bail!("bool value {b} is neither 0 nor 1"),
            },
            t::STRING => MetaValue::String(self.string("string value")?),
            t::ARRAY => {
                ensure!(depth < MAX_ARRAY_NESTING, "arrays nested more than {MAX_ARRAY_NESTING} deep");
                let elem_type = self.u32("array element type")?;
                let count = self.u64("array length")?;
                let min_size = min_encoded_size(elem_type)
                    .with_context(|| format!("unknown array element type {elem_type}"))?;
                self.check_count(count, min_size, "array elements")?;
                let mut values = Vec::with_capacity(count as usize);
                for i in 0..count {
                    values.push(self.value(elem_type, depth + 1).with_context(|| format!("element {i}"))?);
                }
                MetaValue::Array { elem_type, values }
            }
            other => bail!("unknown value type {other}"),
        })
    }

    fn tensor_info(&mut self, index: u64) -> Result<TensorInfo> {
        let name = self.string(&format!("name of tensor {index}"))?;
        let n_dims = self.u32(&format!("n_dims of tensor {name}"))? as usize;
        ensure!(
            (1..=MAX_DIMS).contains(&n_dims),
            "tensor {name}: n_dims {n_dims} is not between 1 and {MAX_DIMS}"
        );
        let dims =
            (0..n_dims).map(|_| self.u64(&format!("dims of tensor {name}"))).collect::<Result<Vec<_>>>()?;
        let type_id = self.u32(&format!("type of tensor {name}"))?;
        let ty = GgmlType::from_id(type_id).with_context(|| format!("tensor {name}"))?;
        let offset = self.u64(&format!("offset of tensor {name}"))?;
        Ok(TensorInfo { name, dims, ty, offset })
    }
}

/// Smallest number of bytes one value of type `ty` takes; `None` for an unknown type.
fn min_encoded_size(ty: u32) -> Option<u64> {
    use value_type as t;
    Some(match ty {
        t::U8 | t::I8 | t::BOOL => 1,
        t::U16 | t::I16 => 2,
        t::U32 | t::I32 | t::F32 => 4,
        t::U64 | t::I64 | t::F64 | t::STRING => 8,
        t::ARRAY => 4 + 8,
        _ => return None,
    })
}
