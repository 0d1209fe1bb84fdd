//! The hybrid engine equals the CPU engine bit for bit, for every slot budget and policy.

use super::policy::{Lfu, Lru, Policy, StaticPopular};
use super::{hybrid_engine, HybridEngine, Lookahead};
use crate::engine::cpu::CpuEngine;
use crate::engine::Engine;
use crate::model::weights::testing::{tiny_config, tiny_tensors, write_gguf};
use crate::model::weights::Model;

/// Prompt (all logits), then decode token by token, then truncate and replay: every output.
fn session(engine: &mut dyn Engine, prompt: &[u32], decode: &[u32]) -> Vec<Vec<f32>> {
    let mut outs = vec![engine.forward(prompt, true).unwrap()];
    for &t in decode {
        outs.push(engine.forward(&[t], false).unwrap());
    }
    engine.truncate(prompt.len() / 2);
    outs.push(engine.forward(&prompt[prompt.len() / 2..], true).unwrap());
    outs
}

/// Checks every slot budget 0 ..= all experts with LRU (and LFU / static-popular at a few), and
/// that few slots miss and copy. Returns the stats line of the smallest nonzero budget.
fn check_model(model: &Model, prompt: &[u32], decode: &[u32]) -> String {
    check_model_with(model, prompt, decode, Lookahead::Router).0
}

/// [`check_model`] with `lookahead`; also returns the lookahead's recall with every expert resident.
fn check_model_with(model: &Model, prompt: &[u32], decode: &[u32], lookahead: Lookahead) -> (String, f64) {
    let ctx = prompt.len() + decode.len();
    let want = session(&mut CpuEngine::new(model, ctx).unwrap(), prompt, decode);
    let cfg = &model.config;
    let all = cfg.n_layers * cfg.n_experts;
    let (mut line, mut recall_all) = (String::new(), 0.0);
    for slots in 0..=all {
        let mut policies: Vec<Box<dyn Policy + Send>> = vec![Box::new(Lru::new(slots))];
        if slots % 3 == 1 {
            policies.push(Box::new(Lfu::new(slots, 0.9)));
            policies.push(Box::new(StaticPopular::from_steps(&[vec![(0, 0), (0, 1), (1, 2)]], slots)));
        }
        for policy in policies {
            let mut engine: HybridEngine = hybrid_engine(model, ctx, slots, policy, lookahead).unwrap();
            let got = session(&mut engine, prompt, decode);
            assert!(got == want, "{slots} slots: the hybrid engine's logits differ from the CPU engine's");
            let stats = engine.expert_stats().unwrap();
            let tokens = prompt.len() + decode.len() + (prompt.len() - prompt.len() / 2);
            assert_eq!(stats.tokens, tokens as u64);
            let recall = stats.lookahead_recall();
            assert_eq!(recall.is_some(), lookahead != Lookahead::Off, "{stats:?}");
            if slots == all {
                recall_all = recall.unwrap_or(0.0);
            }
            assert!(stats.device + stats.host > 0);
            if slots == 0 {
                assert_eq!((stats.device, stats.copies), (0, 0));
            }
            if slots == 1 {
                assert!(stats.host > 0 || stats.copies > 1, "{stats:?}");
                line = engine.stats_line().unwrap();
            }
            if slots == all {
                assert!(stats.device > 0, "{slots} slots: nothing ran on the stand-in: {stats:?}");
            }
            if slots > 0 && slots < all {
                assert!(stats.copies > 0 || stats.host > 0, "{slots} slots: {stats:?}");
            }
        }
    }
    (line, recall_all)
}

#[test]
fn tiny_model_matches_the_cpu_engine_for_every_slot_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_config(), &tiny_tensors(&tiny_config(), false)).unwrap();
    let model = Model::load(&path).unwrap();
    let line = check_model(&model, &[1, 17, 5, 63, 0, 42, 42, 8], &[30, 2, 9, 9]);
    assert!(line.contains("copied"), "{line}");
}

#[test]
fn demo_model_q4_k_m_matches_the_cpu_engine_for_every_slot_budget() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rustdoc-mixtral/rustdoc-q4_k_m.gguf");
    let model = Model::load(&path).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| (i * 331 + 7) % 4096).collect();
    let line = check_model(&model, &prompt, &[13, 783, 586, 1664, 413, 294]);
    println!("{line}");
}

/// A lookahead that is wrong (it predicts the experts the next router ranks lowest) costs copies,
/// never correctness; with no lookahead the output is the same too (both checked bit for bit against
/// the CPU engine for every budget by `check_model_with`).
#[test]
fn a_wrong_or_no_lookahead_gives_the_same_output() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rustdoc-mixtral/rustdoc-q4_k_m.gguf");
    let model = Model::load(&path).unwrap();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 331 + 7) % 4096).collect();
    let decode = [13, 783, 586, 1664, 413, 294];
    let (_, right) = check_model_with(&model, &prompt, &decode, Lookahead::Router);
    let (_, wrong) = check_model_with(&model, &prompt, &decode, Lookahead::AlwaysWrong);
    check_model_with(&model, &prompt, &decode, Lookahead::Off);
    println!("lookahead recall: router {:.1}%, always wrong {:.1}%", 100.0 * right, 100.0 * wrong);
    assert!(wrong < right && wrong < 0.5, "router {right}, always wrong {wrong}");
}

/// On the trained model the next router, applied one layer early, names most of the experts the
/// next layer uses (published for Mixtral: ~90-96% of top-1 choices).
#[test]
fn lookahead_recall_on_the_demo_model() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rustdoc-mixtral/rustdoc-q4_k_m.gguf");
    let model = Model::load(&path).unwrap();
    let text = "Rust's ownership rules: each value has an owner, there can be only one owner at a time, \
                and when the owner goes out of scope the value is dropped.";
    let tokens = crate::text::Tokenizer::from_gguf(&model.file.metadata, &model.file.path)
        .unwrap()
        .encode(text, true)
        .unwrap();
    let mut engine =
        hybrid_engine(&model, tokens.len(), 8, Box::new(Lru::new(8)), Lookahead::Router).unwrap();
    for &t in &tokens {
        engine.forward(&[t], false).unwrap();
    }
    let stats = engine.expert_stats().unwrap();
    let recall = stats.lookahead_recall().unwrap();
    println!("lookahead recall over {} decode steps: {:.1}% ({stats})", tokens.len(), 100.0 * recall);
    assert!(recall > 0.5, "{stats}");
}
