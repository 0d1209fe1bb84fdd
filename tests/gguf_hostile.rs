//! GGUF writer → reader round trips, and hostile or truncated files that must give an error (never a
//! panic or a huge allocation) naming the problem.

use std::fs::File;
use std::path::Path;

use mixtral_q::format::gguf::{value_type, GgufFile, GgufFileWriter, GgufLayout, MetaValue, Metadata};
use mixtral_q::format::GgmlType;

/// Metadata of every value type, with string/f32/i32 arrays of `n_tokens` entries.
fn every_value_type(n_tokens: i32) -> Metadata {
    let mut m = Metadata::new();
    m.set("general.architecture", MetaValue::String("llama".into()));
    m.set("t.u8", MetaValue::U8(200));
    m.set("t.i8", MetaValue::I8(-100));
    m.set("t.u16", MetaValue::U16(60000));
    m.set("t.i16", MetaValue::I16(-30000));
    m.set("t.u32", MetaValue::U32(4_000_000_000));
    m.set("t.i32", MetaValue::I32(-2_000_000_000));
    m.set("t.u64", MetaValue::U64(u64::MAX - 1));
    m.set("t.i64", MetaValue::I64(i64::MIN + 1));
    m.set("t.f32", MetaValue::F32(-1.5e-5));
    m.set("t.f64", MetaValue::F64(std::f64::consts::PI));
    m.set("t.bool", MetaValue::Bool(true));
    m.set("t.string", MetaValue::String("héllo ▁wörld\n".into()));
    m.set("t.empty_string", MetaValue::String(String::new()));
    m.set("tokenizer.ggml.tokens", MetaValue::string_array((0..n_tokens).map(|i| format!("tok{i}▁"))));
    m.set("tokenizer.ggml.scores", MetaValue::f32_array((0..n_tokens).map(|i| -(i as f32))));
    m.set("tokenizer.ggml.token_type", MetaValue::i32_array((0..n_tokens).map(|i| i % 6)));
    m.set("t.bools", MetaValue::Array { elem_type: value_type::BOOL, values: vec![MetaValue::Bool(false)] });
    m.set("t.empty_array", MetaValue::Array { elem_type: value_type::U64, values: vec![] });
    let inner = |n: u32| MetaValue::Array {
        elem_type: value_type::U32,
        values: (0..n).map(MetaValue::U32).collect(),
    };
    m.set(
        "t.nested",
        MetaValue::Array {
            elem_type: value_type::ARRAY,
            values: vec![
                inner(3),
                inner(0),
                MetaValue::Array {
                    elem_type: value_type::STRING,
                    values: vec![MetaValue::String("x".into())],
                },
            ],
        },
    );
    m
}

/// Tensors of several types, with deterministic pseudo-random bytes.
fn tensors() -> Vec<(String, Vec<u64>, GgmlType)> {
    vec![
        ("token_embd.weight".into(), vec![256, 10], GgmlType::Q4_K),
        ("blk.0.attn_norm.weight".into(), vec![257], GgmlType::F32),
        ("blk.0.attn_k.weight".into(), vec![64, 3], GgmlType::Q8_0),
        ("blk.0.ffn_gate_exps.weight".into(), vec![256, 4, 8], GgmlType::Q4_K),
        ("blk.0.attn_q.weight".into(), vec![32, 5], GgmlType::Q4_0),
        ("output.weight".into(), vec![256, 3], GgmlType::Q6_K),
        ("f16.weight".into(), vec![3, 1, 1, 1], GgmlType::F16),
    ]
}

fn pattern(len: u64, seed: usize) -> Vec<u8> {
    (0..len as usize).map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8).collect()
}

/// Writes the test file, tensors in reverse order and from several threads; returns the bytes.
fn write(path: &Path, metadata: Metadata) -> Vec<Vec<u8>> {
    let layout = GgufLayout::new(metadata, tensors()).unwrap();
    let datas: Vec<Vec<u8>> =
        layout.tensors().iter().enumerate().map(|(i, t)| pattern(t.n_bytes(), i)).collect();
    let file = File::create(path).unwrap();
    let writer = GgufFileWriter::new(&file, layout).unwrap();
    std::thread::scope(|s| {
        for (i, d) in datas.iter().enumerate().rev() {
            let writer = &writer;
            s.spawn(move || writer.write_tensor(i, d).unwrap());
        }
    });
    writer.finish().unwrap();
    datas
}

fn valid_file(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("valid.gguf");
    write(&path, every_value_type(32000));
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn open_err(dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("hostile.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = format!("{:#}", GgufFile::open(&path).expect_err("hostile file was accepted"));
    assert!(err.contains("hostile.gguf"), "error does not name the file: {err}");
    assert!(!err.contains('\n'), "error is not one line: {err}");
    err
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn round_trips_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    let meta = every_value_type(32000);
    let datas = write(&path, meta.clone());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(f.metadata.len(), meta.len());
    for ((k1, v1), (k2, v2)) in meta.iter().zip(f.metadata.iter()) {
        assert_eq!((k1, v1), (k2, v2));
    }
    let expected = tensors();
    assert_eq!(f.tensors.len(), expected.len());
    for ((t, (name, dims, ty)), data) in f.tensors.iter().zip(&expected).zip(&datas) {
        assert_eq!((&t.name, &t.dims, t.ty), (name, dims, *ty));
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.tensor_data(t), &data[..], "{name}");
        assert_eq!(f.tensor(name).unwrap(), t);
    }
    let exps = f.tensor("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(exps.shape(), vec![8, 4, 256]);
    assert_eq!(exps.n_elements(), 8192);
    assert_eq!(exps.n_bytes(), 32 * 144);
    // llama.cpp pads the last tensor to the alignment too.
    assert_eq!(f.file_size() % 32, 0);
    assert_eq!(f.bytes().len() as u64, f.file_size());
}

#[test]
fn version_2_files_are_read() {
    // v2 has the same layout as v3 (64-bit counts); only the version field differs.
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = valid_file(dir.path());
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let path = dir.path().join("v2.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.tensors.len(), tensors().len());
}

#[test]
fn custom_alignment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    let mut meta = Metadata::new();
    meta.set("general.alignment", MetaValue::U32(64));
    write(&path, meta);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment, 64);
    assert!(f.data_offset.is_multiple_of(64) && f.tensors.iter().all(|t| t.offset.is_multiple_of(64)));

    let mut bad = Metadata::new();
    bad.set("general.alignment", MetaValue::U32(48));
    assert!(GgufLayout::new(bad, tensors()).is_err());
}

#[test]
fn layout_rejects_bad_tensors() {
    let dup = vec![("a".into(), vec![32], GgmlType::F32), ("a".into(), vec![32], GgmlType::F32)];
    let err = GgufLayout::new(Metadata::new(), dup).unwrap_err().to_string();
    assert!(err.contains("duplicate") && err.contains('a'), "{err}");
    let partial_block = vec![("w".into(), vec![224, 4], GgmlType::Q4_K)];
    let err = format!("{:#}", GgufLayout::new(Metadata::new(), partial_block).unwrap_err());
    assert!(err.contains("w") && err.contains("224"), "{err}");
    let mixed = Metadata::new();
    let mut m = mixed.clone();
    m.set("bad", MetaValue::Array { elem_type: value_type::U8, values: vec![MetaValue::U16(1)] });
    assert!(GgufLayout::new(m, vec![]).is_err());
}

#[test]
fn writer_checks_each_tensor_is_written_once_with_the_right_length() {
    let dir = tempfile::tempdir().unwrap();
    let file = File::create(dir.path().join("w.gguf")).unwrap();
    let layout = GgufLayout::new(Metadata::new(), tensors()).unwrap();
    let n0 = layout.tensors()[0].n_bytes();
    let writer = GgufFileWriter::new(&file, layout).unwrap();
    let err = writer.write_tensor(0, &vec![0; n0 as usize - 1]).unwrap_err().to_string();
    assert!(err.contains("token_embd.weight"), "{err}");
    writer.write_tensor(0, &vec![0; n0 as usize]).unwrap();
    let err = writer.write_tensor(0, &vec![0; n0 as usize]).unwrap_err().to_string();
    assert!(err.contains("already written"), "{err}");
    assert!(writer.write_tensor(99, &[]).is_err());
    let err = writer.finish().unwrap_err().to_string();
    assert!(err.contains("never written") && err.contains("blk.0.attn_norm.weight"), "{err}");
}

#[test]
fn writer_on_a_read_only_handle_errors() {
    // A read-only handle makes every write fail, as a full disk would.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.gguf");
    std::fs::write(&path, b"").unwrap();
    let file = File::open(&path).unwrap();
    let layout = GgufLayout::new(Metadata::new(), tensors()).unwrap();
    let err = GgufFileWriter::new(&file, layout).err().unwrap().to_string();
    assert!(err.contains("output GGUF file"), "{err}");
}

#[test]
fn truncated_files_error_at_every_offset() {
    let dir = tempfile::tempdir().unwrap();
    // Short arrays, so that every byte offset of the header can be tried in a second.
    let valid = dir.path().join("small.gguf");
    write(&valid, every_value_type(50));
    let bytes = std::fs::read(&valid).unwrap();
    let f = GgufFile::open(&valid).unwrap();
    // Only the padding after the last tensor may be cut without losing data.
    let data_end = f.tensors.iter().map(|t| f.data_offset + t.offset + t.n_bytes()).max().unwrap() as usize;
    assert!(data_end > bytes.len() - 32);
    let path = dir.path().join("hostile.gguf");
    // Every offset up to the data section, then a stride through the tensor data.
    let data_start = f.data_offset as usize;
    let cuts = (0..data_start).chain((data_start..data_end).step_by(7)).chain([data_end - 1]);
    for cut in cuts {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&path).err().unwrap_or_else(|| panic!("truncation at {cut} was accepted"));
        let msg = format!("{err:#}");
        assert!(msg.contains("hostile.gguf") && !msg.contains('\n'), "{msg}");
    }
    assert!(open_err(dir.path(), &[]).contains("empty"));
    assert!(open_err(dir.path(), &bytes[..cut_after_tensor_infos(&bytes)]).contains("past the end"));
}

/// The offset just past the tensor-info table (the padding before the data section).
fn cut_after_tensor_infos(bytes: &[u8]) -> usize {
    let name = b"f16.weight";
    find(bytes, name) + name.len() + 4 + 4 * 8 + 4 + 8
}

#[test]
fn hostile_headers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, valid) = valid_file(d);

    assert!(open_err(d, b"GGML\x03\0\0\0").contains("not a GGUF file"));
    assert!(open_err(d, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0").contains("not a GGUF file"));
    assert!(open_err(d, b"GG").contains("not a GGUF file"));
    let mut v = valid.clone();
    v[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err(d, &v).contains("big-endian"));
    v[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open_err(d, &v).contains("version 1"));
    v[4..8].copy_from_slice(&77u32.to_le_bytes());
    assert!(open_err(d, &v).contains("version 77"));

    // Huge tensor and key counts.
    let mut v = valid.clone();
    v[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err(d, &v).contains("tensor infos"));
    let mut v = valid.clone();
    v[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(d, &v).contains("metadata keys"));

    // A huge key length: the first key's length field.
    let mut v = valid.clone();
    v[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(open_err(d, &v).contains("truncated"));

    // A string array claiming 2^60 elements: its count follows the element type after the key.
    let key = b"tokenizer.ggml.tokens";
    let count_at = find(&valid, key) + key.len() + 4 + 4;
    assert_eq!(u64::from_le_bytes(valid[count_at..count_at + 8].try_into().unwrap()), 32000);
    let mut v = valid.clone();
    v[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let err = open_err(d, &v);
    assert!(err.contains("array elements") && err.contains("tokenizer.ggml.tokens"), "{err}");

    // Unknown metadata value type.
    let mut v = valid.clone();
    let type_at = find(&valid, b"t.u8") + 4;
    v[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = open_err(d, &v);
    assert!(err.contains("t.u8") && err.contains("unknown value type 99"), "{err}");

    // Tensor infos: name, n_dims, dims, type, offset.
    let name = b"token_embd.weight";
    let ndims_at = find(&valid, name) + name.len();
    let dims_at = ndims_at + 4;
    let type_at = dims_at + 2 * 8;
    let offset_at = type_at + 4;

    let mut v = valid.clone();
    v[ndims_at..ndims_at + 4].copy_from_slice(&5u32.to_le_bytes());
    let err = open_err(d, &v);
    assert!(err.contains("token_embd.weight") && err.contains("n_dims 5"), "{err}");

    let mut v = valid.clone();
    v[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes()); // IQ2_XXS: not supported
    let err = open_err(d, &v);
    assert!(err.contains("token_embd.weight") && err.contains("type id 16"), "{err}");

    let mut v = valid.clone();
    v[offset_at..offset_at + 8].copy_from_slice(&8u64.to_le_bytes());
    let err = open_err(d, &v);
    assert!(err.contains("token_embd.weight") && err.contains("not a multiple of the alignment"), "{err}");

    let mut v = valid.clone();
    v[offset_at..offset_at + 8].copy_from_slice(&(valid.len() as u64).next_multiple_of(32).to_le_bytes());
    let err = open_err(d, &v);
    assert!(err.contains("token_embd.weight") && err.contains("past the end"), "{err}");

    let mut v = valid.clone();
    v[offset_at..offset_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    assert!(open_err(d, &v).contains("past the end"));

    // A row that is not a whole number of Q4_K blocks.
    let mut v = valid.clone();
    v[dims_at..dims_at + 8].copy_from_slice(&224u64.to_le_bytes());
    let err = open_err(d, &v);
    assert!(err.contains("token_embd.weight") && err.contains("224"), "{err}");

    // Element count overflow.
    let mut v = valid.clone();
    v[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    v[dims_at + 8..dims_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(open_err(d, &v).contains("overflows"));

    // Alignment that is not a power of two.
    let mut meta = Metadata::new();
    meta.set("general.alignment", MetaValue::U32(32));
    let p = d.join("aligned.gguf");
    write(&p, meta);
    let mut v = std::fs::read(&p).unwrap();
    let at = find(&v, b"general.alignment") + "general.alignment".len() + 4;
    v[at..at + 4].copy_from_slice(&24u32.to_le_bytes());
    assert!(open_err(d, &v).contains("power of two"));
}

#[test]
fn duplicate_tensor_names_and_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("dup.gguf");
    let layout = GgufLayout::new(
        Metadata::new(),
        vec![("aa".into(), vec![8], GgmlType::F32), ("ab".into(), vec![8], GgmlType::F32)],
    )
    .unwrap();
    let file = File::create(&p).unwrap();
    let w = GgufFileWriter::new(&file, layout).unwrap();
    w.write_tensor(0, &[1; 32]).unwrap();
    w.write_tensor(1, &[2; 32]).unwrap();
    w.finish().unwrap();
    let mut v = std::fs::read(&p).unwrap();
    let at = find(&v, b"ab");
    v[at + 1] = b'a';
    let err = open_err(d, &v);
    assert!(err.contains("duplicate tensor name aa"), "{err}");

    let mut meta = Metadata::new();
    meta.set("k1", MetaValue::U8(1));
    meta.set("k2", MetaValue::U8(2));
    write(&p, meta);
    let mut v = std::fs::read(&p).unwrap();
    let at = find(&v, b"k2");
    v[at + 1] = b'1';
    assert!(open_err(d, &v).contains("duplicate metadata key k1"));
}

#[test]
fn deeply_nested_arrays_are_rejected_without_overflowing_the_stack() {
    // Header, one KV "k" whose value is an array of one array of one array ... 10000 deep.
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.push(b'k');
    v.extend_from_slice(&value_type::ARRAY.to_le_bytes());
    for _ in 0..10000 {
        v.extend_from_slice(&value_type::ARRAY.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(open_err(dir.path(), &v).contains("nested"));
}
