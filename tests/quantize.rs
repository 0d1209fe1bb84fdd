//! `mixtral-q quantize` on the tiny fixture: every --type, read back by our reader and by llama.cpp's
//! `gguf` Python package, exact f32 round trip, and bad input.

mod common;

use std::path::Path;

use common::*;
use mixtral_q::format::codec;
use mixtral_q::format::gguf::GgufFile;
use mixtral_q::format::safetensors::Checkpoint;
use mixtral_q::format::GgmlType;
use mixtral_q::model::names::LayerTensor;
use mixtral_q::model::ModelConfig;
use mixtral_q::quantize::{
    quantize_checkpoint, tensor_type, ModelShape, QuantizeOptions, Target, TensorRole,
};

fn convert(target: Target, out: &Path) {
    let mut opts = QuantizeOptions::new(target);
    opts.verbose = true;
    let report = quantize_checkpoint(&tiny_model_dir(), out, &opts).unwrap();
    for t in &report.tensors {
        let err = t.rel_rmse.unwrap();
        assert!(err.is_finite(), "{}: {err}", t.name);
    }
}

#[test]
fn every_type_converts_with_the_expected_names_shapes_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::from_hf_config_file(&tiny_model_dir().join("config.json")).unwrap();
    for &target in <Target as clap::ValueEnum>::value_variants() {
        let out = dir.path().join(format!("tiny-{}.gguf", target.name()));
        convert(target, &out);
        let file = GgufFile::open(&out).unwrap();
        assert_eq!(ModelConfig::from_gguf(&file.metadata).unwrap(), cfg);
        assert_eq!(file.metadata.get_u64("general.file_type"), Some(target.file_type() as u64));
        let expected = cfg.gguf_tensors();
        assert_eq!(file.tensors.len(), expected.len());
        for (t, (name, dims)) in file.tensors.iter().zip(&expected) {
            assert_eq!(&t.name, name);
            assert_eq!(&t.dims, dims, "{name}");
            let ty = tensor_type(target, TensorRole::of(name), dims[0] as usize, ModelShape::of(&cfg));
            assert_eq!(t.ty, ty, "{name}");
        }
        // The tiny model's rows (128, 224) are not multiples of 256: K-quants must have fallen back.
        if target == Target::Q4K {
            let attn_q = file.tensor("blk.0.attn_q.weight").unwrap();
            assert_eq!(attn_q.ty, GgmlType::Q5_0);
        }
        let tokens = file.metadata.get_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len(), cfg.vocab_size);
        assert!(file.metadata.get_str("tokenizer.huggingface.json").is_some());
        assert!(file.metadata.get_str("tokenizer.chat_template").unwrap().contains("[INST]"));
    }
}

/// The f32 output holds exactly the checkpoint's values once the q/k row permutation is undone.
#[test]
fn f32_output_reproduces_the_checkpoint_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-f32.gguf");
    convert(Target::F32, &out);
    let file = GgufFile::open(&out).unwrap();
    let ckpt = Checkpoint::open(&tiny_model_dir()).unwrap();
    let cfg = ModelConfig::from_gguf(&file.metadata).unwrap();

    let read_hf = |name: &str| {
        let t = ckpt.tensor(name).unwrap();
        let mut v = vec![0f32; t.n_elements()];
        t.to_f32(&mut v).unwrap();
        v
    };
    let read_gguf = |name: &str| {
        let t = file.tensor(name).unwrap();
        codec::dequantize_to_vec(t.ty, file.tensor_data(t), t.n_elements() as usize).unwrap()
    };
    // Inverse of llama.cpp's permute: GGUF row (head, i, j) came from HF row (head, j, i).
    let unpermute = |gguf: &[f32], n_heads: usize| {
        let cols = cfg.hidden_size;
        let rows = gguf.len() / cols;
        let hd = rows / n_heads;
        let mut hf = vec![0f32; gguf.len()];
        for r in 0..rows {
            let (head, within) = (r / hd, r % hd);
            let src = head * hd + (within % 2) * (hd / 2) + within / 2;
            hf[src * cols..(src + 1) * cols].copy_from_slice(&gguf[r * cols..(r + 1) * cols]);
        }
        hf
    };

    assert_eq!(read_gguf("token_embd.weight"), read_hf("model.embed_tokens.weight"));
    assert_eq!(read_gguf("output.weight"), read_hf("lm_head.weight"));
    assert_eq!(read_gguf("output_norm.weight"), read_hf("model.norm.weight"));
    for layer in 0..cfg.n_layers {
        for t in LayerTensor::ALL {
            let ours = read_gguf(&t.gguf_name(layer));
            if t.is_expert() {
                let per = ours.len() / cfg.n_experts;
                for e in 0..cfg.n_experts {
                    assert_eq!(
                        &ours[e * per..(e + 1) * per],
                        &read_hf(&t.hf_name(layer, e))[..],
                        "{t:?} {e}"
                    );
                }
            } else {
                let ours = match t {
                    LayerTensor::AttnQ => unpermute(&ours, cfg.n_heads),
                    LayerTensor::AttnK => unpermute(&ours, cfg.n_kv_heads),
                    _ => ours,
                };
                assert_eq!(ours, read_hf(&t.hf_name(layer, 0)), "{}", t.gguf_name(layer));
            }
        }
    }
}

/// llama.cpp's own reader (the `gguf` package) parses our files and dequantizes every tensor to the
/// same values as our codecs.
#[test]
fn llama_cpp_gguf_package_reads_our_output() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, json, numpy as np, gguf
r = gguf.GGUFReader(sys.argv[1])
out = {"arch": r.fields["general.architecture"].contents(), "tensors": []}
for t in r.tensors:
    v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
    out["tensors"].append([t.name, int(t.tensor_type), [int(d) for d in t.shape], float(v.sum()), float((v * v).sum())])
print(json.dumps(out))
"#;
    for &target in <Target as clap::ValueEnum>::value_variants() {
        let out = dir.path().join(format!("tiny-{}.gguf", target.name()));
        convert(target, &out);
        let o = std::process::Command::new(python()).arg("-c").arg(script).arg(&out).output().unwrap();
        assert!(o.status.success(), "gguf package failed on {}: {}", out.display(), stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(json["arch"], "llama");
        let file = GgufFile::open(&out).unwrap();
        let theirs = json["tensors"].as_array().unwrap();
        assert_eq!(theirs.len(), file.tensors.len());
        for (t, row) in file.tensors.iter().zip(theirs) {
            assert_eq!(row[0], t.name.as_str());
            assert_eq!(row[1], t.ty.id());
            let dims: Vec<u64> = row[2].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            assert_eq!(dims, t.dims, "{}", t.name);
            let v = codec::dequantize_to_vec(t.ty, file.tensor_data(t), t.n_elements() as usize).unwrap();
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            let sum2: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
            assert!(close(sum, row[3].as_f64().unwrap()), "{}: sum {sum} vs {}", t.name, row[3]);
            assert!(close(sum2, row[4].as_f64().unwrap()), "{}: sum of squares {sum2} vs {}", t.name, row[4]);
        }
    }
}

// ---- bad input: one-line error naming the problem, non-zero exit, no output left behind ----

fn quantize_expecting_error(hf_dir: &Path, out: &Path, needle: &str) {
    let o = run(&["quantize", hf_dir.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success");
    assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "not a one-line error: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny_model_dir(), &dir.path().join("model"));
    edit(&dir.path().join("model"));
    dir
}

#[test]
fn missing_shard_is_named() {
    let d = broken_copy(|m| std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap());
    quantize_expecting_error(
        &d.path().join("model"),
        &d.path().join("out.gguf"),
        "model-00002-of-00002.safetensors",
    );
}

#[test]
fn truncated_shard_is_named() {
    let d = broken_copy(|m| {
        let p = m.join("model-00001-of-00002.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
    });
    quantize_expecting_error(
        &d.path().join("model"),
        &d.path().join("out.gguf"),
        "model-00001-of-00002.safetensors",
    );
}

#[test]
fn corrupt_header_is_named() {
    let d = broken_copy(|m| {
        let p = m.join("model-00001-of-00002.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8..40].fill(b'#');
        std::fs::write(&p, bytes).unwrap();
    });
    quantize_expecting_error(
        &d.path().join("model"),
        &d.path().join("out.gguf"),
        "model-00001-of-00002.safetensors",
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let d = broken_copy(|m| {
        // Same element size, so offsets stay valid; only the dtype is one we do not read.
        let p = m.join("model-00001-of-00002.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&bytes[..2000]).into_owned();
        let at = text.find("\"BF16\"").unwrap();
        let mut bytes = bytes;
        bytes[at..at + 6].copy_from_slice(b"\"I16\" ");
        std::fs::write(&p, bytes).unwrap();
    });
    quantize_expecting_error(&d.path().join("model"), &d.path().join("out.gguf"), "I16");
}

#[test]
fn wrong_shape_for_config_is_named() {
    let d = broken_copy(|m| {
        let p = m.join("config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"intermediate_size\": 224", "\"intermediate_size\": 256");
        std::fs::write(&p, text).unwrap();
    });
    quantize_expecting_error(&d.path().join("model"), &d.path().join("out.gguf"), "w1.weight");
}

#[test]
fn other_architectures_are_rejected() {
    let d = broken_copy(|m| {
        let p = m.join("config.json");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"model_type\": \"mixtral\"", "\"model_type\": \"llama\"");
        std::fs::write(&p, text).unwrap();
    });
    quantize_expecting_error(&d.path().join("model"), &d.path().join("out.gguf"), "mixtral");
}

#[test]
fn missing_input_directory_and_unwritable_output() {
    let d = tempfile::tempdir().unwrap();
    quantize_expecting_error(&d.path().join("nope"), &d.path().join("out.gguf"), "nope");
    let o = run(&["quantize", tiny_model_dir().to_str().unwrap(), "-o", "/nonexistent-dir/out.gguf"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent-dir"), "{}", stderr(&o));
}

/// A failed conversion leaves an existing output file untouched.
#[test]
fn failure_keeps_an_existing_output() {
    let d = broken_copy(|m| std::fs::remove_file(m.join("model-00002-of-00002.safetensors")).unwrap());
    let out = d.path().join("out.gguf");
    std::fs::write(&out, b"precious").unwrap();
    quantize_expecting_error(&d.path().join("model"), &out, "model-00002-of-00002.safetensors");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

/// A disk that fills during the write: a 64 KiB tmpfs (CI runs as root), else a file-size limit.
#[test]
fn full_disk_is_an_error_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt.to_str().unwrap()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let out = mnt.join("out.gguf");
    let o = if mounted {
        run(&["quantize", tiny_model_dir().to_str().unwrap(), "-o", out.to_str().unwrap(), "--type", "f32"])
    } else {
        use std::os::unix::process::CommandExt;
        let mut cmd = bin();
        cmd.args([
            "quantize",
            tiny_model_dir().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--type",
            "f32",
        ]);
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                Ok(())
            });
        }
        cmd.output().unwrap()
    };
    let leftovers: Vec<_> =
        std::fs::read_dir(&mnt).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    if mounted {
        let _ = std::process::Command::new("umount").arg(&mnt).status();
    }
    assert!(!o.status.success(), "a full disk must fail the conversion");
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("out.gguf"), "{err}");
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// Ctrl-C during a conversion: non-zero exit, one line, no output and no temporary file left.
#[test]
fn ctrl_c_stops_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let o = run(&[
        "synth",
        "--hf",
        "-o",
        hf.to_str().unwrap(),
        "--layers",
        "2",
        "--hidden",
        "512",
        "--ffn",
        "1024",
        "--heads",
        "4",
        "--kv-heads",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.gguf");
    let child = bin()
        .args(["quantize", hf.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary output exists, i.e. the conversion is under way.
    let started = std::time::Instant::now();
    while std::fs::read_dir(&out_dir).unwrap().count() == 0 {
        assert!(started.elapsed().as_secs() < 60, "the conversion never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: sends SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "an interrupted conversion must fail");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let left: Vec<_> =
        std::fs::read_dir(&out_dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `-o` naming a device, a FIFO or a link to a device is refused before any work (the final rename
/// would replace the node with a regular file); the node is left as it was. Also for `synth`.
#[test]
fn outputs_that_are_not_regular_files_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;

    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo.gguf");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path inside our temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let to_full = d.path().join("full.gguf");
    std::os::unix::fs::symlink("/dev/full", &to_full).unwrap();
    let tiny = tiny_model_dir();
    for (out, kind) in [(&fifo, "a FIFO"), (&to_full, "a symbolic link to a character device")] {
        let out = out.to_str().unwrap();
        let runs = [
            run(&["quantize", tiny.to_str().unwrap(), "-o", out, "--type", "f32"]),
            run(&[
                "synth",
                "-o",
                out,
                "--layers",
                "1",
                "--hidden",
                "64",
                "--ffn",
                "64",
                "--heads",
                "2",
                "--kv-heads",
                "1",
                "--vocab",
                "512",
            ]),
        ];
        for o in runs {
            let err = stderr(&o);
            assert!(!o.status.success(), "writing to {out} succeeded: {}", stdout(&o));
            assert!(err.contains("refusing to write") && err.contains(kind), "{err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
    }
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&to_full).unwrap().file_type().is_symlink());
    assert!(std::fs::metadata("/dev/full").unwrap().file_type().is_char_device());
    let files = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(files, 2, "temporary files were left behind");
}

/// `--type` takes llama.cpp's mix names in any case; `info` names the mix and lists the K-quant
/// types the rules chose (rows of 256 so that no K-quant falls back).
#[test]
fn mix_names_are_case_insensitive_and_info_names_the_mix() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("q3km.gguf");
    let out = out.to_str().unwrap();
    let shape = [
        "--layers",
        "2",
        "--hidden",
        "256",
        "--ffn",
        "512",
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--vocab",
        "512",
    ];
    let o = run(&[&["synth", "-o", out, "--type", "q3_k_m"][..], &shape].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["info", out, "--tensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("12 (MOSTLY_Q3_K_M, mix Q3_K_M)"), "{text}");
    let file = GgufFile::open(Path::new(out)).unwrap();
    let ty = |name: &str| file.tensor(name).unwrap().ty;
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q3_K);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.1.ffn_gate_exps.weight"), GgmlType::Q3_K);
    assert_eq!(ty("blk.0.attn_output.weight"), GgmlType::Q5_K);
    assert_eq!(ty("output.weight"), GgmlType::Q5_K);
    assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
    // 2 layers: 2 / 16 = 0 layers of Q5_K, so every ffn_down is Q4_K.
    assert_eq!(ty("blk.0.ffn_down_exps.weight"), GgmlType::Q4_K);
    let o = run(&[&["synth", "-o", out, "--type", "Q2_k"][..], &shape].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let file = GgufFile::open(Path::new(out)).unwrap();
    assert_eq!(file.tensor("blk.1.ffn_up_exps.weight").unwrap().ty, GgmlType::Q2_K);
    assert_eq!(file.tensor("blk.1.ffn_down_exps.weight").unwrap().ty, GgmlType::Q3_K);
    let o = run(&[&["synth", "-o", out, "--type", "q3_k_xl"][..], &shape].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q3_k_xl"), "{}", stderr(&o));
}

/// llama-quantize's per-tensor flags: `--token-embedding-type`, `--output-tensor-type` and
/// `--tensor-type PATTERN=TYPE` (regular expressions, the last match wins) set those tensors' types
/// and nothing else; a type that does not exist is refused before any output exists.
#[test]
fn tensor_type_flags_override_the_mix() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.gguf");
    let (model, path) = (tiny_model_dir(), out.to_str().unwrap().to_string());
    let model = model.to_str().unwrap();
    let o = run(&[
        "quantize",
        model,
        "-o",
        &path,
        "--type",
        "Q8_0",
        "--token-embedding-type",
        "F16",
        "--output-tensor-type",
        "q4_0",
        "--tensor-type",
        r"blk\.1\.ffn_(up|down)=q5_0",
        "--tensor-type",
        r"ffn_down=Q4_1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = GgufFile::open(&out).unwrap();
    let ty = |name: &str| file.tensor(name).unwrap().ty;
    assert_eq!(ty("token_embd.weight"), GgmlType::F16);
    assert_eq!(ty("output.weight"), GgmlType::Q4_0);
    assert_eq!(ty("blk.1.ffn_up_exps.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.1.ffn_down_exps.weight"), GgmlType::Q4_1);
    assert_eq!(ty("blk.0.ffn_down_exps.weight"), GgmlType::Q4_1);
    assert_eq!(ty("blk.0.ffn_up_exps.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.ffn_norm.weight"), GgmlType::F32);

    let bad = dir.path().join("bad.gguf");
    for flags in
        [["--tensor-type", "ffn_down=q9_k"], ["--output-tensor-type", "q8_k"], ["--tensor-type", "ffn_("]]
    {
        let o = run(&["quantize", model, "-o", bad.to_str().unwrap(), flags[0], flags[1]]);
        assert!(!o.status.success() && !bad.exists(), "{flags:?}");
        let err = stderr(&o);
        assert!(err.contains(flags[1]) && !err.contains("panicked"), "{err}");
    }
}
