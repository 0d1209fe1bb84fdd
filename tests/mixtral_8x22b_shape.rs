//! Mixtral-8x22B's proportions (6 query heads per KV head, a 32768-token vocabulary, FFN 8/3 of the
//! width) run with no code change: a shrunk checkpoint of them, written by `synth --hf` and converted
//! by `quantize --type f32`, against what Hugging Face transformers computed on the same checkpoint in
//! float64 (tests/fixtures/make_8x22b_fixture.py wrote tests/fixtures/mixtral-8x22b-shape.*).

mod common;

use std::path::Path;

use common::fixture::{argmax, relative_error};
use common::{fixtures, run, stderr, stdout};
use mixtral_q::engine::cpu::CpuEngine;
use mixtral_q::engine::Engine;
use mixtral_q::model::weights::Model;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixtures().join("mixtral-8x22b-shape.json")).expect("fixture json");
    serde_json::from_str(&text).expect("fixture json parses")
}

/// The `synth` flags of the fixture's shape.
fn shape_args(fx: &Value) -> Vec<String> {
    let shape = fx["synth"].as_object().expect("synth shape");
    shape.iter().flat_map(|(k, v)| [format!("--{k}"), v.to_string()]).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// As the fixture script computes it: the wrapping sum of the file's little-endian u64 words.
fn checksum(path: &Path) -> u64 {
    let mut data = std::fs::read(path).expect("shard");
    data.resize(data.len().next_multiple_of(8), 0);
    data.chunks_exact(8).fold(0u64, |s, w| s.wrapping_add(u64::from_le_bytes(w.try_into().unwrap())))
}

fn check(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}{}", stdout(o), stderr(o));
}

#[test]
fn an_8x22b_shaped_checkpoint_converts_and_matches_transformers() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (hf, gguf) = (dir.path().join("hf"), dir.path().join("f32.gguf"));
    let mut synth = vec!["synth".to_string(), "--hf".into(), "-o".into(), hf.display().to_string()];
    synth.extend(["--dtype".into(), "bf16".into()]);
    synth.extend(shape_args(&fx));
    check(&run(&synth.iter().map(String::as_str).collect::<Vec<_>>()), "synth --hf");
    for (shard, sum) in fx["shard_checksums"].as_object().expect("checksums") {
        assert_eq!(
            checksum(&hf.join(shard)),
            sum.as_u64().expect("checksum"),
            "{shard}: synth writes other weights than when the fixture was made: rerun make_8x22b_fixture.py"
        );
    }
    check(
        &run(&["quantize", hf.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--type", "f32"]),
        "quantize",
    );

    let model = Model::load(&gguf).expect("load");
    let cfg = &model.config;
    assert_eq!(
        (cfg.n_heads / cfg.n_kv_heads, cfg.vocab_size, cfg.hidden_size, cfg.ffn_size),
        (6, 32768, 384, 1024)
    );
    let bytes = std::fs::read(fixtures().join("mixtral-8x22b-shape.safetensors")).expect("logits");
    let logits = SafeTensors::deserialize(&bytes).expect("logits parse");
    let mut engine = CpuEngine::new(&model, 64).expect("engine");
    for case in fx["cases"].as_array().expect("cases") {
        let (name, tokens) = (case["name"].as_str().unwrap(), ids(&case["input_ids"]));
        let view = logits.tensor(&format!("{name}.logits")).expect("case logits");
        assert_eq!((view.dtype(), view.shape()), (Dtype::F32, &[tokens.len(), cfg.vocab_size][..]));
        let want: Vec<f64> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect();
        engine.truncate(0);
        engine.set_router_trace(true).unwrap();
        let ours = engine.forward(&tokens, true).expect("forward");
        let trace = engine.take_router_trace();
        let err = relative_error(&ours, &want);
        println!("{name}: {} tokens, relative error {err:.2e}", tokens.len());
        assert!(err < 1e-4, "{name}: relative error {err}");
        let theirs = case["router_top2"].as_array().expect("router_top2");
        assert_eq!(trace[0].len(), cfg.n_layers);
        for (l, (ours, theirs)) in trace[0].iter().zip(theirs).enumerate() {
            for (t, (a, b)) in ours.iter().zip(theirs.as_array().unwrap()).enumerate() {
                let (mut a, mut b) = (a.clone(), ids(b).into_iter().map(|e| e as usize).collect::<Vec<_>>());
                a.sort();
                b.sort();
                assert_eq!(a, b, "{name}: layer {l} token {t}");
            }
        }
    }

    // Greedy decoding, one token at a time through the KV cache.
    let greedy = &fx["greedy"];
    let (prompt, want) = (ids(&greedy["input_ids"]), ids(&greedy["greedy_new_ids"]));
    engine.truncate(0);
    let mut next_logits = engine.forward(&prompt, false).expect("prompt");
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(argmax(&next_logits) as u32);
        next_logits = engine.forward(&got[got.len() - 1..], false).expect("decode");
    }
    assert_eq!(got, want);
}

/// A `synth` GGUF of the same proportions (Q4_K where rows allow) loads and generates.
#[test]
fn an_8x22b_shaped_synth_file_runs() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("q4k.gguf");
    let mut synth = vec!["synth".to_string(), "-o".into(), gguf.display().to_string()];
    synth.extend(shape_args(&fx));
    check(&run(&synth.iter().map(String::as_str).collect::<Vec<_>>()), "synth");
    let info = run(&["info", gguf.to_str().unwrap()]);
    check(&info, "info");
    assert!(stdout(&info).contains("12 heads / 2 KV heads"), "{}", stdout(&info));
    let o = run(&[
        "generate",
        "-m",
        gguf.to_str().unwrap(),
        "-p",
        "hello",
        "-n",
        "6",
        "--temp",
        "0",
        "--device",
        "cpu",
    ]);
    check(&o, "generate");
    let model = Model::load(&gguf).unwrap();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7919 + 1) % 32768).collect();
    let mut engine = CpuEngine::new(&model, 32).unwrap();
    let batch = engine.forward(&tokens, true).unwrap();
    engine.truncate(0);
    let mut stepped = Vec::new();
    for &t in &tokens {
        stepped.extend(engine.forward(&[t], false).unwrap());
    }
    let err = relative_error(&stepped, &batch.iter().map(|&v| v as f64).collect::<Vec<_>>());
    assert!(err < 0.05, "decode vs batch: {err}");
}
