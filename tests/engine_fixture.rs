//! The CPU engine against Hugging Face's float64 reference on models/tiny-mixtral (see
//! tests/fixtures/README.md): quantize the checkpoint to GGUF, load it, compare logits, router choices,
//! greedy continuations and perplexity.

use std::path::Path;

use mixtral_q::engine::cpu::CpuEngine;
use mixtral_q::engine::Engine;
use mixtral_q::model::weights::Model;
use mixtral_q::quantize::{quantize_checkpoint, QuantizeOptions, Target};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

struct Case {
    name: String,
    ids: Vec<u32>,
    /// `[layer][token]` → the two experts HF picked.
    router_top2: Vec<Vec<Vec<usize>>>,
    /// `[seq, vocab]`, float64.
    logits: Vec<f64>,
}

fn reference_json() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/reference.json").expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

fn id_list(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn cases() -> Vec<Case> {
    let bytes = std::fs::read("tests/fixtures/reference.safetensors").expect("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("reference.safetensors parses");
    reference_json()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_string();
            let ids = id_list(&c["input_ids"]);
            let router_top2 = c["router_top2"]
                .as_array()
                .expect("router_top2")
                .iter()
                .map(|layer| {
                    layer
                        .as_array()
                        .expect("layer")
                        .iter()
                        .map(|tok| id_list(tok).into_iter().map(|e| e as usize).collect())
                        .collect()
                })
                .collect();
            let view = st.tensor(&format!("{name}.logits_f64")).expect("logits_f64");
            assert_eq!(view.dtype(), Dtype::F64);
            assert_eq!(view.shape()[0], ids.len());
            let logits = view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            Case { name, ids, router_top2, logits }
        })
        .collect()
}

/// Converts models/tiny-mixtral to a GGUF of `target` in a temporary directory.
fn quantized(target: Target) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    quantize_checkpoint(Path::new("models/tiny-mixtral"), &path, &QuantizeOptions::new(target))
        .expect("quantize tiny-mixtral");
    let model = Model::load(&path).expect("load the GGUF");
    (dir, model)
}

fn relative_error(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

fn argmax<T: Copy + Into<f64>>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v.into() > row[best].into() {
            best = i;
        }
    }
    best
}

/// exp(mean negative log-likelihood of each next token).
fn perplexity<T: Copy + Into<f64>>(logits: &[T], ids: &[u32], vocab: usize) -> f64 {
    let nll: f64 = (0..ids.len() - 1)
        .map(|t| {
            let row: Vec<f64> = logits[t * vocab..(t + 1) * vocab].iter().map(|&v| v.into()).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let log_z = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            log_z - row[ids[t + 1] as usize]
        })
        .sum();
    (nll / (ids.len() - 1) as f64).exp()
}

#[test]
fn f32_gguf_matches_the_reference_logits_router_and_perplexity() {
    let (_dir, model) = quantized(Target::F32);
    let vocab = model.config.vocab_size;
    let mut engine = CpuEngine::new(&model, 256).expect("engine");
    let cases = cases();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        engine.truncate(0);
        engine.set_router_trace(true);
        let logits = engine.forward(&case.ids, true).expect("forward");
        let trace = engine.take_router_trace();

        let err = relative_error(&logits, &case.logits);
        println!("{}: {} tokens, relative error {err:.2e}", case.name, case.ids.len());
        assert!(err < 1e-4, "{}: relative error {err}", case.name);

        assert_eq!(trace.len(), 1);
        assert_eq!(trace[0].len(), model.config.n_layers);
        for (layer, (ours, theirs)) in trace[0].iter().zip(&case.router_top2).enumerate() {
            assert_eq!(ours.len(), case.ids.len());
            for (t, (a, b)) in ours.iter().zip(theirs).enumerate() {
                let (mut a, mut b) = (a.clone(), b.clone());
                a.sort();
                b.sort();
                assert_eq!(a, b, "{}: layer {layer} token {t}", case.name);
            }
        }

        if case.name == "long" {
            let ours = perplexity(&logits, &case.ids, vocab);
            let theirs = perplexity(&case.logits, &case.ids, vocab);
            println!("long: perplexity {ours:.4} (reference {theirs:.4})");
            assert!((ours / theirs - 1.0).abs() < 1e-4, "perplexity {ours} vs {theirs}");
        }
    }
    assert!(cases.iter().any(|c| c.name == "long"));
}

#[test]
fn f32_gguf_greedy_continuations_match() {
    let (_dir, model) = quantized(Target::F32);
    let vocab = model.config.vocab_size;
    let mut engine = CpuEngine::new(&model, 256).expect("engine");
    let greedy = reference_json()["greedy"].as_array().expect("greedy").clone();
    assert_eq!(greedy.len(), 3);
    for g in &greedy {
        let (prompt, want) = (id_list(&g["input_ids"]), id_list(&g["greedy_new_ids"]));
        assert_eq!(want.len(), 24);
        engine.truncate(0);
        let mut logits = engine.forward(&prompt, false).expect("prompt");
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = argmax(&logits[..vocab]) as u32;
            got.push(next);
            logits = engine.forward(&[next], false).expect("decode");
        }
        assert_eq!(got, want, "continuation of {:?}", g["text"]);
        assert_eq!(engine.position(), prompt.len() + want.len());
    }
}

#[test]
fn q4k_gguf_decodes_like_it_batches_and_is_no_worse_than_llama_cpp() {
    let (_dir, model) = quantized(Target::Q4K);
    let vocab = model.config.vocab_size;
    let mut engine = CpuEngine::new(&model, 256).expect("engine");
    for case in cases() {
        engine.truncate(0);
        let batch = engine.forward(&case.ids, true).expect("forward");

        // Decode the same sequence one token at a time after a 1-token prompt.
        engine.truncate(0);
        let mut stepped = engine.forward(&case.ids[..1], false).expect("first token");
        for &t in &case.ids[1..] {
            stepped.extend(engine.forward(&[t], false).expect("decode"));
        }
        let diff = relative_error(&stepped, &batch.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(diff < 1e-5, "{}: decode vs batch relative difference {diff}", case.name);

        let err = relative_error(&batch, &case.logits);
        let n = case.ids.len();
        let agree = (0..n)
            .filter(|&t| {
                argmax(&batch[t * vocab..(t + 1) * vocab]) == argmax(&case.logits[t * vocab..(t + 1) * vocab])
            })
            .count() as f64
            / n as f64;
        println!("q4k {}: relative error {err:.3}, top-1 agreement {agree:.2} ({n} tokens)", case.name);
        if case.name == "long" {
            // llama.cpp's Q4_K_M on this model: relative error 0.21, top-1 agreement 0.69.
            assert!(err <= 0.21, "long: relative error {err} is worse than llama.cpp's Q4_K_M (0.21)");
            assert!(agree >= 0.69, "long: top-1 agreement {agree} is worse than llama.cpp's Q4_K_M (0.69)");
        }
    }
}
