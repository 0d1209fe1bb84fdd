//! The CPU backend: the transformer's ops on host threads (rayon) with SIMD dot products, reading the
//! weights straight from the mapped file. It is the reference every other backend is checked against.
//!
//! Decode (one token) runs the products of a step in one parallel pass (`products::matvecs`: q/k/v
//! together, both experts' gate and up together, both downs together), so that no core waits at the
//! end of each; prompts quantize each input once per weight type and share it across the matrices
//! that read it (q/k/v; an expert's gate and up). Parallelism is inside the products and across
//! attention heads.

mod attention;
pub mod dot;
mod kv_cache;
mod moe;
mod norm;
mod products;
mod rope;

use anyhow::{ensure, Result};
use rayon::prelude::*;

use self::kv_cache::KvCache;
pub use self::moe::Routes;
use self::products::{matvecs, Input};
use self::rope::Rope;
use super::transformer::{Backend, ExpertInput, ExpertMatrix, Prepare, Route, Transformer, Weights};
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix, Model};
use crate::model::ModelConfig;

/// The CPU engine: the transformer on the CPU backend.
pub type CpuEngine<'a> = Transformer<CpuBackend<'a>>;

impl<'a> CpuEngine<'a> {
    /// An engine over `model` with a KV cache of `ctx` tokens.
    pub fn new(model: &'a Model, ctx: usize) -> Result<CpuEngine<'a>> {
        let mut backend = CpuBackend::new(&model.config);
        let weights = Weights::prepare(&mut backend, &model.weights()?, &model.config)?;
        Transformer::with_weights(backend, weights, model.config.clone(), ctx)
    }
}

/// Activations on the host: `[rows, width]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub width: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, width: usize) -> CpuTensor {
        debug_assert!(width > 0 && data.len().is_multiple_of(width));
        CpuTensor { data, width }
    }

    pub fn zeros(rows: usize, width: usize) -> CpuTensor {
        CpuTensor::new(vec![0.0; rows * width], width)
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.width
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.width..][..self.width]
    }
}

/// The ops on the CPU, for one model's shapes. Weights are the host's views into the mapped file.
pub struct CpuBackend<'a> {
    cfg: ModelConfig,
    rope: Rope,
    _weights: std::marker::PhantomData<Matrix<'a>>,
}

impl CpuBackend<'_> {
    pub fn new(cfg: &ModelConfig) -> Self {
        CpuBackend {
            cfg: cfg.clone(),
            rope: Rope::new(cfg.head_dim, cfg.rope_theta),
            _weights: Default::default(),
        }
    }
}

impl<'a> Prepare<'a> for CpuBackend<'a> {
    fn matrix(&mut self, m: &Matrix<'a>) -> Result<Matrix<'a>> {
        Ok(*m)
    }

    fn vector(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn experts(&mut self, _layer: usize, experts: &[ExpertWeights<'a>]) -> Result<Vec<ExpertWeights<'a>>> {
        Ok(experts.to_vec())
    }
}

/// Below this many values an elementwise op runs on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

impl<'a> Backend for CpuBackend<'a> {
    type Tensor = CpuTensor;
    type Matrix = Matrix<'a>;
    type Vector = Vec<f32>;
    type Experts = Vec<ExpertWeights<'a>>;
    type Routes = Routes;
    type KvCache = KvCache;

    fn kv_cache(&mut self, _capacity: usize) -> Result<KvCache> {
        // The buffers grow with the tokens actually cached: a large `--ctx` costs nothing until used.
        Ok(KvCache::new(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim))
    }

    fn embed(&mut self, table: &Matrix<'a>, tokens: &[u32]) -> Result<CpuTensor> {
        let mut x = CpuTensor::zeros(tokens.len(), table.cols);
        for (&token, row) in tokens.iter().zip(x.data.chunks_exact_mut(table.cols)) {
            table.dequantize_row(token as usize, row)?;
        }
        Ok(x)
    }

    fn rows(&mut self, x: &CpuTensor, first: usize, count: usize) -> Result<CpuTensor> {
        ensure!(first + count <= x.rows(), "rows {first}..{} of a {}-row tensor", first + count, x.rows());
        Ok(CpuTensor::new(x.data[first * x.width..(first + count) * x.width].to_vec(), x.width))
    }

    fn to_host(&mut self, x: CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data)
    }

    fn rms_norm(&mut self, x: &CpuTensor, w: &Vec<f32>) -> Result<CpuTensor> {
        ensure!(x.width == w.len(), "RMSNorm of {}-wide rows with {} weights", x.width, w.len());
        Ok(CpuTensor::new(norm::rms_norm_rows(&x.data, w, self.cfg.rms_norm_eps), x.width))
    }

    fn add(&mut self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        ensure!(x.data.len() == y.data.len(), "adding {} values to {}", y.data.len(), x.data.len());
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn swiglu(&mut self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<()> {
        ensure!(
            gate.data.len() == up.data.len(),
            "SwiGLU of {} gate and {} up values",
            gate.data.len(),
            up.data.len()
        );
        swiglu_in_place(&mut gate.data, &up.data, gate.width);
        Ok(())
    }

    fn matmul(&mut self, w: &Matrix<'a>, x: &CpuTensor) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(x.rows(), w.rows);
        Input::new(&x.data).matmul(w, &mut out.data)?;
        Ok(out)
    }

    fn matmul_many<const N: usize>(&mut self, ws: [&Matrix<'a>; N], x: &CpuTensor) -> Result<[CpuTensor; N]> {
        let outs: Vec<CpuTensor> = if x.rows() == 1 {
            let products: Vec<(&[f32], &Matrix)> = ws.iter().map(|&w| (&x.data[..], w)).collect();
            matvecs(&products)?.into_iter().zip(ws).map(|(y, w)| CpuTensor::new(y, w.rows)).collect()
        } else {
            let mut input = Input::new(&x.data);
            ws.iter()
                .map(|w| {
                    let mut out = CpuTensor::zeros(x.rows(), w.rows);
                    input.matmul(w, &mut out.data)?;
                    Ok(out)
                })
                .collect::<Result<_>>()?
        };
        Ok(outs.try_into().unwrap_or_else(|_| unreachable!("N products")))
    }

    fn rope(&mut self, x: &mut CpuTensor, start: usize) -> Result<()> {
        let width = x.width;
        for (t, row) in x.data.chunks_exact_mut(width).enumerate() {
            self.rope.apply(row, start + t);
        }
        Ok(())
    }

    fn kv_append(
        &mut self,
        cache: &mut KvCache,
        layer: usize,
        start: usize,
        k: &CpuTensor,
        v: &CpuTensor,
    ) -> Result<()> {
        cache.append(layer, start, &k.data, &v.data);
        Ok(())
    }

    fn kv_truncate(&mut self, cache: &mut KvCache, len: usize) {
        cache.truncate(len);
    }

    fn attention(&mut self, cache: &KvCache, layer: usize, start: usize, q: &CpuTensor) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(q.rows(), self.cfg.q_dim());
        attention::causal_attention(&self.cfg, &q.data, cache.heads(layer), start, &mut out.data);
        Ok(out)
    }

    fn route(&mut self, logits: &CpuTensor, top_k: usize, gating: Gating) -> Result<Routes> {
        let routes = logits.data.chunks_exact(logits.width).map(|l| moe::route(l, top_k, gating)).collect();
        Ok(Routes::new(routes, logits.width))
    }

    fn routes_to_host(&mut self, routes: &Routes) -> Result<Vec<Route>> {
        Ok(routes.per_token().to_vec())
    }

    fn routes_from_host(&mut self, per_token: &[Route]) -> Result<Routes> {
        Ok(Routes::new(per_token.to_vec(), self.cfg.n_experts))
    }

    fn expert_matmul<const N: usize>(
        &mut self,
        experts: &Vec<ExpertWeights<'a>>,
        which: [ExpertMatrix; N],
        x: &CpuTensor,
        input: ExpertInput,
        routes: &Routes,
    ) -> Result<[CpuTensor; N]> {
        moe::expert_matmul(experts, which, x, input, routes)
    }

    fn weighted_sum(&mut self, y: &CpuTensor, routes: &Routes) -> Result<CpuTensor> {
        moe::weighted_sum(y, routes)
    }

    fn expert_swiglu(
        &mut self,
        experts: &Vec<ExpertWeights<'a>>,
        x: &CpuTensor,
        routes: &Routes,
    ) -> Result<CpuTensor> {
        moe::expert_swiglu(experts, x, routes)
    }

    fn scoped<R: Send>(&mut self, work: impl FnOnce(&mut Self) -> R + Send) -> R {
        // On a worker of the thread pool: its parallel loops then start and end without handing work
        // across from a thread outside the pool (which sleeps and wakes at every one).
        rayon::scope(|_| work(self))
    }

    fn stats_line(&self) -> Option<String> {
        let threads = rayon::current_num_threads();
        let s = if threads == 1 { "" } else { "s" };
        Some(format!("cpu: {} kernels, {threads} thread{s}", dot::simd_level()))
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`, in parallel over rows of `width` when there are many values.
fn swiglu_in_place(gate: &mut [f32], up: &[f32], width: usize) {
    let rows = |g: &mut [f32], u: &[f32]| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = silu(*g) * u;
        }
    };
    if gate.len() >= PARALLEL_MIN_VALUES {
        gate.par_chunks_mut(width).zip(up.par_chunks(width)).for_each(|(g, u)| rows(g, u));
    } else {
        rows(gate, up);
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::format::GgmlType;
    use crate::model::weights::testing::{tiny_config, tiny_tensors, write_gguf};

    /// The tiny random model of `model::weights::testing`, as a GGUF file in `dir`.
    fn tiny_model(dir: &tempfile::TempDir) -> Model {
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &tiny_config(), &tiny_tensors(&tiny_config(), false)).unwrap();
        Model::load(&path).unwrap()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    const TOKENS: [u32; 9] = [1, 17, 5, 63, 0, 42, 42, 8, 30];

    #[test]
    fn decoding_with_the_cache_equals_processing_the_whole_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(&dir);
        let cfg = &model.config;
        let mut batch = CpuEngine::new(&model, 16).unwrap();
        let all = batch.forward(&TOKENS, true).unwrap();
        assert_eq!(all.len(), TOKENS.len() * cfg.vocab_size);
        assert_eq!(batch.position(), TOKENS.len());

        let mut step = CpuEngine::new(&model, 16).unwrap();
        let first = step.forward(&TOKENS[..4], false).unwrap();
        assert!(max_abs_diff(&first, &all[3 * cfg.vocab_size..4 * cfg.vocab_size]) < 1e-5);
        for (i, &t) in TOKENS.iter().enumerate().skip(4) {
            let logits = step.forward(&[t], false).unwrap();
            let want = &all[i * cfg.vocab_size..(i + 1) * cfg.vocab_size];
            assert!(max_abs_diff(&logits, want) < 1e-5, "token {i}: {}", max_abs_diff(&logits, want));
        }
        // Split into batches of 4 tokens: the same logits and the same router choices.
        let mut chunked = CpuEngine::new(&model, 16).unwrap();
        chunked.set_max_batch(4);
        batch.set_router_trace(true).unwrap();
        chunked.set_router_trace(true).unwrap();
        batch.truncate(0);
        let all_again = batch.forward(&TOKENS, true).unwrap();
        assert_eq!(all_again, all);
        let all_chunked = chunked.forward(&TOKENS, true).unwrap();
        assert!(max_abs_diff(&all_chunked, &all) < 1e-5);
        assert_eq!(chunked.take_router_trace(), batch.take_router_trace());
        let last = chunked.forward(&TOKENS[..5], false).unwrap();
        assert_eq!(last.len(), cfg.vocab_size);
        // The logits are not trivially equal: positions differ.
        assert!(max_abs_diff(&all[..cfg.vocab_size], &all[cfg.vocab_size..2 * cfg.vocab_size]) > 1e-2);
    }

    /// With Q4_K weights in 256-wide rows, prompts take the many-token kernels and decode the one-token
    /// ones (and the shared parallel passes). They sum in different orders, and a last-bit difference
    /// can flip an activation's 8-bit rounding in a later product, which moves that token's logits by
    /// up to a few percent on random weights (seen: 1 token in 20, by 1.7%). So: most tokens equal to
    /// float rounding, none far off; a wrong kernel breaks both.
    #[test]
    fn q4k_prompt_and_decode_paths_agree() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig {
            vocab_size: 512,
            hidden_size: 256,
            ffn_size: 512,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ..tiny_config()
        };
        let path = dir.path().join("q4k.gguf");
        let opts = crate::quantize::QuantizeOptions::new(crate::quantize::Target::Q4K);
        let weights = crate::synth::RandomWeights::new(cfg.clone(), 3);
        crate::synth::write_random_gguf(&path, &weights, &opts, 3).unwrap();
        let model = Model::load(&path).unwrap();
        assert_eq!(model.weights().unwrap().layers[0].experts[0].gate.ty, GgmlType::Q4_K);
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 512).collect();
        let all = CpuEngine::new(&model, 32).unwrap().forward(&tokens, true).unwrap();
        let mut step = CpuEngine::new(&model, 32).unwrap();
        let mut close = 0;
        for (i, &t) in tokens.iter().enumerate() {
            let logits = step.forward(&[t], false).unwrap();
            let want = &all[i * cfg.vocab_size..(i + 1) * cfg.vocab_size];
            let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
            let diff = logits.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            assert!(diff <= 0.05 * norm, "token {i}: relative difference {}", diff / norm);
            close += usize::from(diff <= 1e-5 * norm);
        }
        assert!(close * 4 >= tokens.len() * 3, "only {close} of {} tokens agree to 1e-5", tokens.len());
    }

    #[test]
    fn bad_input_is_rejected_and_leaves_the_cache_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(&dir);
        let mut engine = CpuEngine::new(&model, 11).unwrap();
        let before = engine.forward(&TOKENS[..3], false).unwrap();
        let err = engine.forward(&[5, 64], false).unwrap_err().to_string();
        assert!(err.contains("64"), "{err}");
        assert_eq!(engine.position(), 3);
        let err = engine.forward(&TOKENS, false).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        assert_eq!(engine.position(), 3);
        assert!(engine.forward(&[], false).is_err());
        // Truncating and replaying the last token reproduces the same logits.
        engine.truncate(2);
        assert_eq!(engine.position(), 2);
        let again = engine.forward(&TOKENS[2..3], false).unwrap();
        assert!(max_abs_diff(&before, &again) < 1e-5);
        assert!(CpuEngine::new(&model, 33).is_err());
    }

    #[test]
    fn router_trace_records_top_k_per_layer_and_token() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(&dir);
        let cfg = &model.config;
        let mut engine = CpuEngine::new(&model, 16).unwrap();
        engine.forward(&TOKENS[..2], false).unwrap();
        assert!(engine.take_router_trace().is_empty());
        engine.set_router_trace(true).unwrap();
        engine.forward(&TOKENS[2..5], false).unwrap();
        engine.forward(&TOKENS[5..6], false).unwrap();
        let trace = engine.take_router_trace();
        assert_eq!(trace.len(), 2);
        assert_eq!((trace[0].len(), trace[0][0].len(), trace[1][1].len()), (2, 3, 1));
        for experts in trace.iter().flatten().flatten() {
            assert_eq!(experts.len(), 2);
            assert!(experts[0] != experts[1] && experts.iter().all(|&e| e < cfg.n_experts));
        }
        assert!(engine.take_router_trace().is_empty());
    }
}
