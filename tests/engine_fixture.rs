//! The CPU engine against Hugging Face's float64 reference on models/tiny-mixtral (see
//! tests/fixtures/README.md): quantize the checkpoint to GGUF, load it, compare logits, router choices,
//! greedy continuations and perplexity.

mod common;

use common::fixture::{
    argmax, cases, greedy_tokens, id_list, perplexity, quantized, reference_json, relative_error,
};
use mixtral_q::engine::cpu::CpuEngine;
use mixtral_q::engine::Engine;
use mixtral_q::quantize::Target;

#[test]
fn f32_gguf_matches_the_reference_logits_router_and_perplexity() {
    let (_dir, model) = quantized(Target::F32);
    let vocab = model.config.vocab_size;
    let mut engine = CpuEngine::new(&model, 256).expect("engine");
    let cases = cases();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        engine.truncate(0);
        engine.set_router_trace(true).unwrap();
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
    let mut engine = CpuEngine::new(&model, 256).expect("engine");
    let greedy = reference_json()["greedy"].as_array().expect("greedy").clone();
    assert_eq!(greedy.len(), 3);
    for g in &greedy {
        let (prompt, want) = (id_list(&g["input_ids"]), id_list(&g["greedy_new_ids"]));
        assert_eq!(want.len(), 24);
        let got = greedy_tokens(&mut engine, &prompt, want.len());
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
        println!(
            "q4k {}: relative error {err:.3}, top-1 agreement {agree:.2} ({n} tokens), decode vs batch {diff:.1e}",
            case.name
        );
        if case.name == "long" {
            // llama.cpp's Q4_K_M on this model: relative error 0.21, top-1 agreement 0.69.
            assert!(err <= 0.21, "long: relative error {err} is worse than llama.cpp's Q4_K_M (0.21)");
            assert!(agree >= 0.69, "long: top-1 agreement {agree} is worse than llama.cpp's Q4_K_M (0.69)");
        }
    }
}

#[test]
fn other_targets_track_the_reference() {
    // (target, largest relative error on `long`): F16 holds bf16 weights exactly; 8 bits is close.
    for (target, bound) in [(Target::F16, 1e-4), (Target::Q8_0, 0.1), (Target::Q4_0, 0.45)] {
        let (_dir, model) = quantized(target);
        let mut engine = CpuEngine::new(&model, 256).expect("engine");
        let long = cases().into_iter().find(|c| c.name == "long").expect("long case");
        let logits = engine.forward(&long.ids, true).expect("forward");
        let err = relative_error(&logits, &long.logits);
        println!("{target:?} long: relative error {err:.2e}");
        assert!(err < bound, "{target:?}: relative error {err} on long");
    }
}
