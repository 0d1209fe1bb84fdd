//! Streaming GGUF writer: the layout (every tensor's offset) is fixed up front, the header is written
//! once, and tensors are then written in any order, from any thread, at their final positions.
//! Padding is never written: the file is extended with `set_len`, so padding stays zero holes and no
//! byte is written twice.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};

use super::read::{align_up, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use super::value::{MetaValue, Metadata};
use crate::format::GgmlType;

const VERSION: u32 = 3;

/// A GGUF file's complete layout: the serialized header (magic, counts, metadata, tensor infos) and
/// the aligned offset of every tensor.
#[derive(Clone, Debug)]
pub struct GgufLayout {
    header: Vec<u8>,
    tensors: Vec<TensorInfo>,
    data_offset: u64,
    total_size: u64,
}

impl GgufLayout {
    /// Tensors in file order: (name, ggml dims, type). Offsets follow llama.cpp's rules: the data
    /// section starts at the first multiple of the alignment after the header, each tensor starts
    /// aligned, and the last tensor is padded to the alignment too.
    pub fn new(metadata: Metadata, tensors: Vec<(String, Vec<u64>, GgmlType)>) -> Result<GgufLayout> {
        let alignment = match metadata.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            // llama.cpp reads the alignment with gguf_get_val_u32, which requires the u32 type.
            Some(MetaValue::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => bail!("{ALIGNMENT_KEY} must be a u32 power of two, not {v:?}"),
        };
        let mut infos = Vec::with_capacity(tensors.len());
        let mut names = HashSet::new();
        let mut offset = 0u64;
        for (name, dims, ty) in tensors {
            ensure!(names.insert(name.clone()), "duplicate tensor name {name}");
            ensure!(
                (1..=MAX_DIMS).contains(&dims.len()),
                "tensor {name}: {} dims (1 to {MAX_DIMS} allowed)",
                dims.len()
            );
            let info = TensorInfo { name, dims, ty, offset };
            let n_bytes = info.checked_n_bytes()?;
            offset = offset
                .checked_add(n_bytes)
                .and_then(|end| align_up(end, alignment))
                .context("tensor data size overflows")?;
            infos.push(info);
        }

        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(infos.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata.iter() {
            put_string(&mut header, key);
            header.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut header, value).with_context(|| format!("metadata key {key}"))?;
        }
        for t in &infos {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&t.offset.to_le_bytes());
        }
        let data_offset = align_up(header.len() as u64, alignment).context("header size overflows")?;
        let total_size = data_offset.checked_add(offset).context("file size overflows")?;
        Ok(GgufLayout { header, tensors: infos, data_offset, total_size })
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The serialized header: magic, counts, metadata and tensor infos (a whole file when there are no
    /// tensors).
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Final file size in bytes.
    pub fn total_size(&self) -> u64 {
        self.total_size
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetaValue) -> Result<()> {
    match value {
        MetaValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(*v as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array { elem_type, values } => {
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for (i, v) in values.iter().enumerate() {
                // A mismatched element would be decoded as the array's type: a corrupt file.
                ensure!(
                    v.type_id() == *elem_type,
                    "array element {i} has type {} but the array's element type is {elem_type}",
                    v.type_id()
                );
                put_value(out, v)?;
            }
        }
    }
    Ok(())
}

/// Writes one GGUF file laid out by a `GgufLayout`. Tensors may be written in any order and from
/// several threads at once (`write_tensor` takes `&self`).
pub struct GgufFileWriter<'a> {
    file: &'a File,
    layout: GgufLayout,
    /// Bytes written so far, per tensor.
    written: Vec<AtomicU64>,
}

impl<'a> GgufFileWriter<'a> {
    /// Writes the header, metadata and tensor infos to `file` (created by the caller, e.g. a temp
    /// file) and sets the file length to the final size.
    pub fn new(file: &'a File, layout: GgufLayout) -> Result<Self> {
        // Truncating first makes every padding byte a zero hole, whatever the file held before.
        file.set_len(0).context("cannot truncate the output GGUF file")?;
        file.set_len(layout.total_size)
            .with_context(|| format!("cannot extend the output GGUF file to {} bytes", layout.total_size))?;
        file.write_all_at(&layout.header, 0).context("cannot write the GGUF header")?;
        let written = layout.tensors.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(GgufFileWriter { file, layout, written })
    }

    pub fn layout(&self) -> &GgufLayout {
        &self.layout
    }

    /// Writes tensor `index`'s bytes at its final position; each tensor exactly once.
    pub fn write_tensor(&self, index: usize, data: &[u8]) -> Result<()> {
        let t = self.tensor_info(index)?;
        ensure!(
            data.len() as u64 == t.n_bytes(),
            "tensor {}: got {} bytes, expected {} ({} of dims {:?})",
            t.name,
            data.len(),
            t.n_bytes(),
            t.ty,
            t.dims
        );
        self.write_tensor_part(index, 0, data)
    }

    /// Writes `data` at byte `offset` within tensor `index` (a big tensor, such as the stacked experts
    /// of a layer, arrives in parts). Parts must not overlap; `finish` checks that all bytes arrived.
    pub fn write_tensor_part(&self, index: usize, offset: u64, data: &[u8]) -> Result<()> {
        let t = self.tensor_info(index)?;
        let (len, expected) = (data.len() as u64, t.n_bytes());
        ensure!(
            offset.checked_add(len).is_some_and(|end| end <= expected),
            "tensor {}: {len} bytes at offset {offset} do not fit in its {expected} bytes",
            t.name
        );
        let before = self.written[index].fetch_add(len, Ordering::AcqRel);
        if before + len > expected {
            self.written[index].fetch_sub(len, Ordering::AcqRel);
            bail!("tensor {} was already written", t.name);
        }
        let result = self.file.write_all_at(data, self.layout.data_offset + t.offset + offset);
        if result.is_err() {
            self.written[index].fetch_sub(len, Ordering::AcqRel);
        }
        result.with_context(|| format!("cannot write tensor {} ({len} bytes)", t.name))
    }

    fn tensor_info(&self, index: usize) -> Result<&TensorInfo> {
        self.layout.tensors.get(index).with_context(|| {
            format!("tensor index {index} is out of range ({} tensors)", self.layout.tensors.len())
        })
    }

    /// Checks that every tensor was written and flushes the data to disk.
    pub fn finish(self) -> Result<()> {
        let missing: Vec<&str> = self
            .layout
            .tensors
            .iter()
            .zip(&self.written)
            .filter(|(t, w)| w.load(Ordering::Acquire) != t.n_bytes())
            .map(|(t, _)| t.name.as_str())
            .collect();
        if !missing.is_empty() {
            let shown = missing.iter().take(5).copied().collect::<Vec<_>>().join(", ");
            let more =
                if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
            bail!("{} tensors were never written: {shown}{more}", missing.len());
        }
        self.file.sync_data().context("cannot flush the GGUF file to disk")
    }
}
