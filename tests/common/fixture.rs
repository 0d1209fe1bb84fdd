//! The Hugging Face reference in tests/fixtures (see its README), and helpers to compare against it.

use std::path::Path;

use mixtral_q::engine::Engine;
use mixtral_q::model::weights::Model;
use mixtral_q::quantize::{quantize_checkpoint, QuantizeOptions, Target};
use mixtral_q::text::Tokenizer;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub struct Case {
    pub name: String,
    pub ids: Vec<u32>,
    /// `[layer][token]` → the two experts HF picked.
    pub router_top2: Vec<Vec<Vec<usize>>>,
    /// `[seq, vocab]`, float64.
    pub logits: Vec<f64>,
}

pub fn reference_json() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/reference.json").expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

pub fn id_list(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn cases() -> Vec<Case> {
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
pub fn quantized(target: Target) -> (tempfile::TempDir, Model) {
    quantized_model("models/tiny-mixtral", target)
}

/// Converts the checkpoint folder `checkpoint` (relative to the repository) to a GGUF of `target` in a temporary
/// directory.
pub fn quantized_model(checkpoint: &str, target: Target) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    quantize_checkpoint(Path::new(checkpoint), &path, &QuantizeOptions::new(target))
        .unwrap_or_else(|e| panic!("quantize {checkpoint}: {e:#}"));
    let model = Model::load(&path).expect("load the GGUF");
    (dir, model)
}

/// The log-probabilities of one row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_z = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - log_z).collect()
}

pub fn relative_error(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

pub fn argmax<T: Copy + Into<f64>>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v.into() > row[best].into() {
            best = i;
        }
    }
    best
}

/// exp(mean negative log-likelihood of each next token).
pub fn perplexity<T: Copy + Into<f64>>(logits: &[T], ids: &[u32], vocab: usize) -> f64 {
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

/// `n` greedy tokens after `prompt`, from an empty KV cache, one decode step per token.
pub fn greedy_tokens(engine: &mut dyn Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let vocab = engine.config().vocab_size;
    engine.truncate(0);
    let mut logits = engine.forward(prompt, false).expect("prompt");
    let mut got = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits[..vocab]) as u32;
        got.push(next);
        logits = engine.forward(&[next], false).expect("decode");
    }
    got
}

/// The trained demo model's checkpoint and its references (tests/fixtures/rustdoc-mixtral, see its README).
pub const DEMO_MODEL: &str = "models/rustdoc-mixtral";
pub const DEMO_FIXTURE: &str = "tests/fixtures/rustdoc-mixtral";

pub fn demo_file(name: &str) -> String {
    std::fs::read_to_string(format!("{DEMO_FIXTURE}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn demo_json(name: &str) -> Value {
    serde_json::from_str(&demo_file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn demo_tokenizer() -> Tokenizer {
    Tokenizer::from_hf_file(&Path::new(DEMO_MODEL).join("tokenizer.json"))
        .expect("the demo model's tokenizer")
}
