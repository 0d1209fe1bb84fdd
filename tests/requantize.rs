//! `mixtral-q quantize IN.gguf`: requantizing a GGUF file as llama-quantize does. The reference is
//! the direct conversion of the same checkpoint: the demo model's bf16 weights, stored exactly in an
//! F32 GGUF, must requantize to the very file `quantize` writes from the checkpoint itself.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use mixtral_q::format::codec;
use mixtral_q::format::gguf::{GgufFile, GgufFileWriter, GgufLayout, MetaValue, Metadata};
use mixtral_q::format::GgmlType;
use mixtral_q::model::weights::Model;
use mixtral_q::model::ModelConfig;
use mixtral_q::quantize::{requantize_gguf, tensor_type, ModelShape, QuantizeOptions, Target, TensorRole};

/// The demo checkpoint converted once per test run: (F32 GGUF, Q4_K_M GGUF), both straight from the
/// checkpoint.
fn reference_files() -> &'static (PathBuf, PathBuf) {
    static FILES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("requantize");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (f32_file, q4_k_m) = (dir.join("demo-f32.gguf"), dir.join("demo-q4_k_m.gguf"));
        quantize_ok(&[DEMO_MODEL, "-o", f32_file.to_str().unwrap(), "--type", "F32"]);
        quantize_ok(&[DEMO_MODEL, "-o", q4_k_m.to_str().unwrap(), "--type", "Q4_K_M"]);
        (f32_file, q4_k_m)
    })
}

const DEMO_MODEL: &str = "models/rustdoc-mixtral";

fn quantize_ok(args: &[&str]) {
    let o = run(&[&["quantize"], args].concat());
    assert!(o.status.success(), "quantize {args:?}: {}", stderr(&o));
}

/// Runs `quantize` expecting a one-line error that mentions every one of `needles`, and checks that
/// neither `out` nor a temporary file beside it exists afterwards.
fn quantize_fails(args: &[&str], out: &Path, needles: &[&str]) {
    let o = run(&[&["quantize"], args].concat());
    let err = stderr(&o);
    assert!(!o.status.success(), "quantize {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "not a one-line error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "the error does not mention {needle:?}: {err}");
    }
    assert!(!out.exists(), "{} was created", out.display());
    let dir = out.parent().unwrap();
    let temporary: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(temporary.is_empty(), "temporary files left in {}: {temporary:?}", dir.display());
}

/// One tensor of a GGUF being rewritten: name, ggml dims, type, bytes.
type Tensor = (String, Vec<u64>, GgmlType, Vec<u8>);

/// Writes `dst`: `src`'s metadata and tensors after `edit`.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Metadata, &mut Vec<Tensor>)) {
    let file = GgufFile::open(src).unwrap();
    let mut meta = file.metadata.clone();
    let mut tensors: Vec<Tensor> = file
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.ty, file.tensor_data(t).to_vec()))
        .collect();
    edit(&mut meta, &mut tensors);
    let infos = tensors.iter().map(|(n, d, t, _)| (n.clone(), d.clone(), *t)).collect();
    let out = std::fs::File::create(dst).unwrap();
    let writer = GgufFileWriter::new(&out, GgufLayout::new(meta, infos).unwrap()).unwrap();
    for (i, (_, _, _, bytes)) in tensors.iter().enumerate() {
        writer.write_tensor(i, bytes).unwrap();
    }
    writer.finish().unwrap();
}

/// Asserts that two GGUF files hold the same metadata (keys, order, values) and tensors (names,
/// dims, types, bytes), naming the first difference.
fn assert_same_gguf(a: &Path, b: &Path) {
    let (fa, fb) = (GgufFile::open(a).unwrap(), GgufFile::open(b).unwrap());
    let keys = |f: &GgufFile| f.metadata.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&fa), keys(&fb), "metadata keys of {} and {}", a.display(), b.display());
    for (key, value) in fa.metadata.iter() {
        assert_eq!(Some(value), fb.metadata.get(key), "metadata {key}");
    }
    assert_eq!(fa.tensors.len(), fb.tensors.len());
    for (ta, tb) in fa.tensors.iter().zip(&fb.tensors) {
        assert_eq!((&ta.name, &ta.dims, ta.ty), (&tb.name, &tb.dims, tb.ty));
        assert!(fa.tensor_data(ta) == fb.tensor_data(tb), "the bytes of tensor {} differ", ta.name);
    }
    assert!(std::fs::read(a).unwrap() == std::fs::read(b).unwrap(), "the files differ");
}

/// HF → F32 GGUF → Q4_K_M is HF → Q4_K_M: the F32 file holds the bf16 weights exactly and in GGUF
/// layout (q/k rows permuted, experts merged), so requantizing it must reproduce every byte of the
/// direct conversion, metadata included: the requantized file keeps the F32 file's keys, and those
/// are the direct conversion's (general.name too: both come from the checkpoint's folder name) but
/// for the file type, which requantizing sets.
#[test]
fn requantizing_the_f32_file_gives_the_direct_conversion_byte_for_byte() {
    let (f32_file, direct) = reference_files();
    let source = GgufFile::open(f32_file).unwrap();
    for t in source.tensors.iter().filter(|t| t.dims.len() > 1) {
        assert_eq!(t.ty, GgmlType::F32, "{}", t.name);
        let values: &[u8] = source.tensor_data(t);
        let not_bf16 = values.chunks_exact(4).filter(|v| v[0] != 0 || v[1] != 0).count();
        assert_eq!(not_bf16, 0, "{}: {not_bf16} values are not bf16 values", t.name);
    }
    assert_eq!(source.metadata.get_u64("general.file_type"), Some(0));
    assert_eq!(source.metadata.get_str("general.name"), Some("rustdoc-mixtral"));

    let dir = tempfile::tempdir().unwrap();
    let requantized = dir.path().join("requantized.gguf");
    quantize_ok(&[f32_file.to_str().unwrap(), "-o", requantized.to_str().unwrap(), "--type", "Q4_K_M"]);
    assert_same_gguf(&requantized, direct);
    let file = GgufFile::open(&requantized).unwrap();
    assert_eq!(file.metadata.get_u64("general.file_type"), Some(Target::Q4KM.file_type() as u64));
    assert_eq!(file.metadata.get_u64("general.quantization_version"), Some(2));
    assert_eq!(file.metadata.get_str("general.name"), Some("rustdoc-mixtral"));
}

/// A file whose matrices are quantized already is refused unless --allow-requantize; with it, each
/// tensor gets the mix's type and stays close to the values it had.
#[test]
fn quantized_input_needs_allow_requantize() {
    let (_, q4_k_m) = reference_files();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8_0.gguf");
    let (input, output) = (q4_k_m.to_str().unwrap(), out.to_str().unwrap());
    quantize_fails(
        &[input, "-o", output, "--type", "Q8_0"],
        &out,
        &[input, "--allow-requantize", "token_embd.weight from q5_K to q8_0"],
    );

    quantize_ok(&[input, "-o", output, "--type", "Q8_0", "--allow-requantize"]);
    let model = Model::load(&out).unwrap();
    let (before, after) = (GgufFile::open(q4_k_m).unwrap(), &model.file);
    let shape = ModelShape::of(&model.config);
    assert_eq!(after.metadata.get_u64("general.file_type"), Some(Target::Q8_0.file_type() as u64));
    let mut requantized = 0;
    for t in &after.tensors {
        let wanted = tensor_type(Target::Q8_0, TensorRole::of(&t.name), t.dims[0] as usize, shape);
        assert_eq!(t.ty, wanted, "{}", t.name);
        let source = before.tensor(&t.name).unwrap();
        let n = t.n_elements() as usize;
        let old = codec::dequantize_to_vec(source.ty, before.tensor_data(source), n).unwrap();
        let new = codec::dequantize_to_vec(t.ty, after.tensor_data(t), n).unwrap();
        let err: f64 = old.iter().zip(&new).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let norm: f64 = old.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (err / norm).sqrt();
        if source.ty == t.ty {
            assert_eq!(rel, 0.0, "{}", t.name);
        } else {
            requantized += 1;
            // Q8_0 rounds to 1/254 of each block's range: far under Q4_K's own error.
            assert!(rel > 0.0 && rel < 0.01, "{}: relative error {rel}", t.name);
        }
    }
    assert!(requantized > 10, "{requantized} tensors requantized");
}

/// A tensor already in its target type is copied, not decoded and rounded again: Q4_K_M → Q3_K_M
/// keeps Q4_K_M's Q8_0, Q5_K, Q4_K and f32 tensors byte for byte, and Q4_K_M → Q4_K_M changes
/// nothing (and needs no --allow-requantize, since nothing is requantized).
#[test]
fn tensors_already_in_their_target_type_are_copied() {
    let (_, q4_k_m) = reference_files();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q3_k_m.gguf");
    quantize_ok(&[
        q4_k_m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--type",
        "Q3_K_M",
        "--allow-requantize",
    ]);
    let (before, after) = (GgufFile::open(q4_k_m).unwrap(), GgufFile::open(&out).unwrap());
    let (mut copied, mut converted, mut would_change) = (0, 0, 0);
    for t in &after.tensors {
        let source = before.tensor(&t.name).unwrap();
        if source.ty != t.ty {
            converted += 1;
            continue;
        }
        copied += 1;
        assert!(after.tensor_data(t) == before.tensor_data(source), "{} was not copied", t.name);
        // Decoding and encoding again would not give the same bytes: the copy is what kept them.
        let n = t.n_elements() as usize;
        let values = codec::dequantize_to_vec(t.ty, before.tensor_data(source), n).unwrap();
        if codec::quantize_to_vec(t.ty, &values).unwrap() != before.tensor_data(source) {
            would_change += 1;
        }
    }
    assert!(copied > 10 && converted > 10, "{copied} copied, {converted} converted");
    assert!(would_change > 0, "every copied tensor survives re-encoding: this test cannot tell copies apart");

    let same = dir.path().join("q4_k_m.gguf");
    quantize_ok(&[q4_k_m.to_str().unwrap(), "-o", same.to_str().unwrap(), "--type", "Q4_K_M"]);
    assert_same_gguf(&same, q4_k_m);
}

/// The older layout, one tensor per expert (`blk.N.ffn_gate.E.weight`), is read too; the output has
/// the merged tensors, the same file as from the merged input.
#[test]
fn per_expert_layout_requantizes_to_the_merged_file() {
    let (f32_file, direct) = reference_files();
    let dir = tempfile::tempdir().unwrap();
    let per_expert = dir.path().join("per-expert-f32.gguf");
    rewrite(f32_file, &per_expert, |_, tensors| {
        let mut split = Vec::new();
        for (name, dims, ty, bytes) in tensors.drain(..) {
            match name.strip_suffix("_exps.weight") {
                Some(base) => {
                    let slab = bytes.len() / dims[2] as usize;
                    for (e, chunk) in bytes.chunks_exact(slab).enumerate() {
                        split.push((format!("{base}.{e}.weight"), dims[..2].to_vec(), ty, chunk.to_vec()));
                    }
                }
                None => split.push((name, dims, ty, bytes)),
            }
        }
        *tensors = split;
    });
    assert!(GgufFile::open(&per_expert).unwrap().tensor("blk.3.ffn_down.7.weight").is_some());
    let out = dir.path().join("out.gguf");
    quantize_ok(&[per_expert.to_str().unwrap(), "-o", out.to_str().unwrap(), "--type", "Q4_K_M"]);
    assert_same_gguf(&out, direct);
}

/// `-o` naming the input replaces it only once the new file is complete: the input's mapping stays
/// readable through the rename, and a refused run leaves the input as it was.
#[test]
fn the_output_may_be_the_input() {
    let (f32_file, direct) = reference_files();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::copy(f32_file, &path).unwrap();
    let mapped = GgufFile::open(&path).unwrap();
    let embd = mapped.tensor("token_embd.weight").unwrap();
    let embd_bytes = mapped.tensor_data(embd).to_vec();

    requantize_gguf(&path, &path, &QuantizeOptions::new(Target::Q4KM)).unwrap();
    assert_same_gguf(&path, direct);
    // The old file's pages are still there for whoever mapped it (its inode lives on).
    assert!(mapped.tensor_data(embd) == &embd_bytes[..], "the input's mapping changed under it");

    let before = std::fs::read(&path).unwrap();
    let p = path.to_str().unwrap();
    let o = run(&["quantize", p, "-o", p, "--type", "Q8_0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--allow-requantize"), "{}", stderr(&o));
    assert!(std::fs::read(&path).unwrap() == before, "a refused run changed its input");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary files were left");

    // The command line, too, writes over its input.
    let copy = dir.path().join("again.gguf");
    std::fs::copy(f32_file, &copy).unwrap();
    quantize_ok(&[copy.to_str().unwrap(), "-o", copy.to_str().unwrap(), "--type", "Q4_K_M"]);
    assert_same_gguf(&copy, direct);
}

#[test]
fn a_truncated_gguf_is_one_line_naming_the_file_and_tensor() {
    let (f32_file, _) = reference_files();
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(f32_file).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out.gguf");
    let (input, output) = (truncated.to_str().unwrap(), out.to_str().unwrap());
    quantize_fails(&[input, "-o", output, "--type", "Q4_K_M"], &out, &[input, "tensor blk.", "truncated"]);
    // Cut inside the header: still one line naming the file.
    std::fs::write(&truncated, &bytes[..100]).unwrap();
    quantize_fails(&[input, "-o", output], &out, &[input, "truncated"]);
    // Neither a directory nor a GGUF.
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "not a model").unwrap();
    quantize_fails(&[text.to_str().unwrap(), "-o", output], &out, &["notes.gguf", "nor a GGUF file"]);
}

/// Files that are not the Mixtral their metadata describes: each refused in one line naming the
/// file, and the tensor where one is at fault.
#[test]
fn gguf_files_that_are_not_mixtral_are_refused() {
    let (f32_file, _) = reference_files();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let output = out.to_str().unwrap();
    type Edit = Box<dyn FnOnce(&mut Metadata, &mut Vec<Tensor>)>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "gpt2",
            Box::new(|m, _| m.set("general.architecture", MetaValue::String("gpt2".into()))),
            vec!["\"gpt2\""],
        ),
        ("dense", Box::new(|m, _| drop(m.remove("llama.expert_count"))), vec!["dense llama model"]),
        (
            "extra-tensor",
            Box::new(|_, t| t.push(("rope_freqs.weight".into(), vec![16], GgmlType::F32, vec![0; 64]))),
            vec!["tensor rope_freqs.weight"],
        ),
        (
            "missing-tensor",
            Box::new(|_, t| t.retain(|(n, ..)| n != "blk.2.attn_v.weight")),
            vec!["tensor blk.2.attn_v.weight is missing"],
        ),
        (
            "wrong-width",
            Box::new(|m, _| m.set("llama.feed_forward_length", MetaValue::U32(768))),
            vec!["tensor blk.0.ffn_gate_exps.weight (expert 0) has shape [512, 256]", "imply [768, 256]"],
        ),
        (
            "sixteen-experts",
            Box::new(|_, tensors| {
                let (_, dims, _, bytes) =
                    tensors.iter_mut().find(|(n, ..)| n == "blk.1.ffn_up_exps.weight").unwrap();
                dims[2] = 16;
                bytes.extend_from_within(..);
            }),
            vec!["tensor blk.1.ffn_up_exps.weight has dims [256, 512, 16]", "[cols, rows, 8]"],
        ),
        (
            "both-layouts",
            Box::new(|_, t| {
                let (_, dims, ty, bytes) = t.iter().find(|(n, ..)| n == "blk.0.ffn_up_exps.weight").unwrap();
                let slab = bytes.len() / 8;
                let one = ("blk.0.ffn_up.5.weight".into(), dims[..2].to_vec(), *ty, bytes[..slab].to_vec());
                t.push(one);
            }),
            vec!["blk.0.ffn_up_exps.weight and the per-expert blk.0.ffn_up.5.weight are both present"],
        ),
        ("split", Box::new(|m, _| m.set("split.count", MetaValue::U16(3))), vec!["split in 3 files"]),
    ];
    for (name, edit, needles) in cases {
        let input = dir.path().join(format!("{name}.gguf"));
        rewrite(f32_file, &input, edit);
        let input = input.to_str().unwrap();
        let mut all = needles.clone();
        all.push(input);
        quantize_fails(&[input, "-o", output], &out, &all);
    }
    // The untouched file still converts: the failures above are the edits'.
    quantize_ok(&[f32_file.to_str().unwrap(), "-o", output, "--type", "Q8_0"]);
    let cfg = ModelConfig::from_gguf(&GgufFile::open(&out).unwrap().metadata).unwrap();
    assert_eq!((cfg.n_layers, cfg.n_experts), (4, 8));
}
