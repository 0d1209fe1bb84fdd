//! The forward pass's layer kinds and the ops' default compositions, on the CPU backend with the tiny
//! random model of `model::weights::testing`.

use super::backend::{default_expert_swiglu, default_matmul_many, default_moe};
use super::*;
use crate::engine::cpu::{CpuBackend, CpuEngine, CpuTensor};
use crate::format::{codec, GgmlType};
use crate::model::spec::Gating;
use crate::model::weights::testing::{pseudo_random, tiny_config, tiny_tensors, write_gguf};
use crate::model::weights::{ExpertWeights, Matrix, Model};

const TOKENS: [u32; 7] = [1, 17, 5, 63, 0, 42, 8];

fn tiny_model(dir: &tempfile::TempDir) -> Model {
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_config(), &tiny_tensors(&tiny_config(), false)).unwrap();
    Model::load(&path).unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// `down(silu(gate x) * up x)` in f64 from the dequantized weights.
fn reference_ffn(e: &ExpertWeights, x: &[f32]) -> Vec<f64> {
    let product = |m: &Matrix, x: &[f64]| -> Vec<f64> {
        let w = codec::dequantize_to_vec(m.ty, m.data, m.rows * m.cols).unwrap();
        w.chunks_exact(m.cols).map(|row| row.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()).collect()
    };
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let (g, u) = (product(&e.gate, &x), product(&e.up, &x));
    let h: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    product(&e.down, &h)
}

#[test]
fn default_compositions_equal_the_cpu_ops_and_the_textbook_moe() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir);
    let cfg = &model.config;
    let mut b = CpuBackend::new(cfg);
    let w = Weights::prepare(&mut b, &model.weights().unwrap(), cfg).unwrap();
    let layer = &w.layers[1];
    let Ffn::Moe(moe) = &layer.ffn else { panic!("a Mixtral layer") };
    for n in [1, 5] {
        let x = CpuTensor::new(pseudo_random(n * cfg.hidden_size, n as u64), cfg.hidden_size);
        let fused = b.matmul_many([&layer.attn_q, &layer.attn_k, &layer.attn_v], &x).unwrap();
        let plain = default_matmul_many(&mut b, [&layer.attn_q, &layer.attn_k, &layer.attn_v], &x).unwrap();
        assert_eq!(fused, plain, "{n} tokens");

        let logits = b.matmul(&moe.router, &x).unwrap();
        let routes = b.route(&logits, moe.top_k, moe.gating).unwrap();
        let fused = b.expert_swiglu(&moe.experts, &x, &routes).unwrap();
        let plain = default_expert_swiglu(&mut b, &moe.experts, &x, &routes).unwrap();
        assert_eq!(fused, plain, "{n} tokens");

        let y = default_moe(&mut b, 1, &moe.experts, &x, &routes).unwrap();
        let choices = b.routes_to_host(&routes).unwrap();
        assert_eq!(choices.len(), n);
        for (t, route) in choices.iter().enumerate() {
            assert_eq!(route.len(), cfg.n_experts_used);
            let mut want = vec![0.0f64; cfg.hidden_size];
            for &(e, weight) in route {
                for (o, v) in want.iter_mut().zip(reference_ffn(&moe.experts[e], x.row(t))) {
                    *o += weight as f64 * v;
                }
            }
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let err = max_rel_diff(y.row(t), &want);
            assert!(err < 1e-5, "{n} tokens, token {t}: relative error {err}");
        }
    }
}

/// The tiny model's weights with each layer's FFN made by `ffn` from the layer's host weights.
fn with_ffn<'a>(
    b: &mut CpuBackend<'a>,
    model: &'a Model,
    ffn: &dyn Fn(&crate::model::weights::LayerWeights<'a>) -> Ffn<CpuBackend<'a>>,
) -> Weights<CpuBackend<'a>> {
    let host = model.weights().unwrap();
    let mut w = Weights::prepare(b, &host, &model.config).unwrap();
    for (layer, host) in w.layers.iter_mut().zip(&host.layers) {
        layer.ffn = ffn(host);
    }
    w
}

fn ffn_of<'a>(e: &ExpertWeights<'a>) -> FfnWeights<CpuBackend<'a>> {
    FfnWeights { gate: e.gate, up: e.up, down: e.down }
}

fn logits_and_trace<'a>(
    b: CpuBackend<'a>,
    w: Weights<CpuBackend<'a>>,
    cfg: &ModelConfig,
) -> (Vec<f32>, RouterTrace) {
    let mut engine = Transformer::with_weights(b, w, cfg.clone(), 16).unwrap();
    engine.set_router_trace(true).unwrap();
    let logits = engine.forward(&TOKENS, true).unwrap();
    (logits, engine.take_router_trace().remove(0))
}

#[test]
fn a_dense_layer_equals_a_mixture_of_one_expert() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir);
    let dense_cfg = ModelConfig { n_experts: 0, n_experts_used: 0, ..model.config.clone() };
    assert!(dense_cfg.validate().is_ok() && !dense_cfg.is_mixtral());
    let mut b = CpuBackend::new(&dense_cfg);
    let dense = with_ffn(&mut b, &model, &|l| Ffn::Dense(ffn_of(&l.experts[2])));
    let (dense, dense_trace) = logits_and_trace(b, dense, &dense_cfg);
    assert!(dense_trace.iter().all(Vec::is_empty), "dense layers route nothing");

    let moe_cfg = ModelConfig { n_experts: 1, n_experts_used: 1, ..model.config.clone() };
    let mut b = CpuBackend::new(&moe_cfg);
    let one_expert = with_ffn(&mut b, &model, &|l| {
        let router = Matrix::new(l.router.ty, 1, l.router.cols, l.router.row(0)).unwrap();
        Ffn::Moe(Moe { router, experts: vec![l.experts[2]], shared: None, top_k: 1, gating: Gating::MIXTRAL })
    });
    let (moe, moe_trace) = logits_and_trace(b, one_expert, &moe_cfg);
    assert!(moe_trace.iter().all(|l| l.len() == TOKENS.len() && l.iter().all(|e| e == &[0])));
    // One expert with weight exactly 1: the same sums in the same order.
    assert_eq!(dense, moe);

    // And it is not the Mixtral model.
    let mixtral = CpuEngine::new(&model, 16).unwrap().forward(&TOKENS, true).unwrap();
    assert!(max_rel_diff(&mixtral, &dense) > 1e-2);
}

#[test]
fn shared_experts_are_added_to_the_routed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir);
    let cfg = ModelConfig { shared_ffn_size: model.config.ffn_size, ..model.config.clone() };
    let host = model.weights().unwrap();
    // Every routed expert a copy of one FFN S, plus S as the shared expert: S(x) twice, since the
    // routed weights sum to 1. A dense FFN with S's down matrix doubled computes the same.
    let mut b = CpuBackend::new(&cfg);
    let shared = with_ffn(&mut b, &model, &|l| {
        let s = l.experts[1];
        Ffn::Moe(Moe {
            router: l.router,
            experts: vec![s; l.experts.len()],
            shared: Some(ffn_of(&s)),
            top_k: 2,
            gating: Gating::MIXTRAL,
        })
    });
    let (shared, trace) = logits_and_trace(b, shared, &cfg);
    assert!(trace.iter().all(|l| l.len() == TOKENS.len()));

    let doubled: Vec<Vec<u8>> = host
        .layers
        .iter()
        .map(|l| {
            let down = &l.experts[1].down;
            assert_eq!(down.ty, GgmlType::F32);
            let values = codec::dequantize_to_vec(GgmlType::F32, down.data, down.rows * down.cols).unwrap();
            bytemuck::cast_slice(&values.iter().map(|v| 2.0 * v).collect::<Vec<f32>>()).to_vec()
        })
        .collect();
    let mut b = CpuBackend::new(&cfg);
    let mut dense = Weights::prepare(&mut b, &host, &model.config).unwrap();
    for ((layer, h), down) in dense.layers.iter_mut().zip(&host.layers).zip(&doubled) {
        let s = h.experts[1];
        let down = Matrix::new(GgmlType::F32, s.down.rows, s.down.cols, down).unwrap();
        layer.ffn = Ffn::Dense(FfnWeights { gate: s.gate, up: s.up, down });
    }
    let (dense, _) = logits_and_trace(b, dense, &cfg);
    let err = max_rel_diff(&shared, &dense);
    assert!(err < 1e-5, "relative difference {err}");
}
