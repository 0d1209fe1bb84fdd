//! The CPU backend: the reference forward pass that every other backend is checked against.
//!
//! Per layer: `h = x + Attn(RMSNorm(x))`, `out = h + MoE(RMSNorm(h))`; then a final RMSNorm and the
//! output head. All tokens of one `forward` call go through each layer together, so every weight
//! matrix is read once per call; parallelism is inside the matrix products and across attention heads.

mod attention;
pub mod dot;
mod kv_cache;
mod moe;
mod norm;
mod rope;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use self::kv_cache::KvCache;
use self::rope::Rope;
use super::Engine;
use crate::format::GgmlType;
use crate::model::weights::{LayerWeights, Matrix, Model, ModelWeights};
use crate::model::ModelConfig;

/// The experts the router chose in one forward call: `[layer][token]` → expert ids, highest weight first.
pub type RouterTrace = Vec<Vec<Vec<usize>>>;

pub struct CpuEngine<'a> {
    weights: ModelWeights<'a>,
    cfg: ModelConfig,
    cache: KvCache,
    rope: Rope,
    /// Longer `forward` calls are processed in batches of this many tokens.
    max_batch: usize,
    /// `Some` while tracing: one entry per forward call.
    router_trace: Option<Vec<RouterTrace>>,
}

impl<'a> CpuEngine<'a> {
    /// An engine over `model` with a KV cache of `ctx` tokens.
    pub fn new(model: &'a Model, ctx: usize) -> Result<CpuEngine<'a>> {
        Self::from_weights(model.weights()?, model.config.clone(), ctx)
    }

    pub fn from_weights(weights: ModelWeights<'a>, cfg: ModelConfig, ctx: usize) -> Result<CpuEngine<'a>> {
        ensure!(ctx > 0, "the context size must be at least 1 token");
        ensure!(
            ctx <= cfg.context_length,
            "context size {ctx} exceeds the model's context length {}",
            cfg.context_length
        );
        Ok(CpuEngine {
            cache: KvCache::new(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, ctx),
            rope: Rope::new(cfg.head_dim, cfg.rope_theta),
            weights,
            cfg,
            max_batch: DEFAULT_MAX_BATCH,
            router_trace: None,
        })
    }

    /// Sets the batch size of prompt processing (at least 1).
    pub fn set_max_batch(&mut self, tokens: usize) {
        self.max_batch = tokens.max(1);
    }

    /// Records the router's choices of the following forward calls (for tests and `/stats`).
    pub fn set_router_trace(&mut self, on: bool) {
        self.router_trace = on.then(Vec::new);
    }

    /// The choices recorded since tracing was turned on or last taken, one entry per forward call.
    pub fn take_router_trace(&mut self) -> Vec<RouterTrace> {
        self.router_trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// One batch through every layer; appends its keys and values to the cache and returns the logits
    /// that `logits` asks for, with the router's choices (`[layer][token]`).
    fn run(&mut self, tokens: &[u32], logits: Logits) -> Result<(Vec<f32>, RouterTrace)> {
        let cfg = &self.cfg;
        let (n, hidden, start) = (tokens.len(), cfg.hidden_size, self.cache.len());
        let mut x = vec![0.0; n * hidden];
        for (&tok, row) in tokens.iter().zip(x.chunks_exact_mut(hidden)) {
            self.weights.token_embd.dequantize_row(tok as usize, row)?;
        }
        let mut trace = Vec::with_capacity(cfg.n_layers);
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let attn = attention_block(cfg, layer, &self.rope, &mut self.cache, l, &x, start)?;
            add(&mut x, &attn);
            let xn = norm::rms_norm_rows(&x, &layer.ffn_norm, cfg.rms_norm_eps);
            let routes = moe::route_tokens(layer, &xn, cfg.n_experts_used)?;
            add(&mut x, &moe::mix_experts(&layer.experts, &xn, &routes)?);
            trace.push(routes.iter().map(|r| r.iter().map(|&(e, _)| e).collect()).collect());
        }
        self.cache.commit(n);
        let rows = match logits {
            Logits::None => return Ok((Vec::new(), trace)),
            Logits::Last => &x[(n - 1) * hidden..],
            Logits::All => &x[..],
        };
        let xn = norm::rms_norm_rows(rows, &self.weights.output_norm, cfg.rms_norm_eps);
        let mut out = vec![0.0; rows.len() / hidden * cfg.vocab_size];
        Input::new(&xn).matmul(&self.weights.output, &mut out)?;
        Ok((out, trace))
    }
}

/// Which logits a batch returns.
#[derive(Clone, Copy)]
enum Logits {
    None,
    Last,
    All,
}

/// Default longest batch sent through the layers at once: bounds the activation memory of long
/// prompts (an expert's `[tokens, ffn]` intermediate is 56 KiB per token at Mixtral's size) while every
/// weight is still read only once per 512 tokens.
pub const DEFAULT_MAX_BATCH: usize = 512;

impl Engine for CpuEngine<'_> {
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {} tokens", self.cfg.vocab_size);
        }
        let start = self.cache.len();
        ensure!(
            start + tokens.len() <= self.cache.capacity(),
            "{} new tokens after {start} do not fit in the context of {} tokens",
            tokens.len(),
            self.cache.capacity()
        );
        let mut logits = Vec::new();
        let mut trace: RouterTrace = vec![Vec::new(); self.cfg.n_layers];
        let n_batches = tokens.len().div_ceil(self.max_batch);
        for (i, batch) in tokens.chunks(self.max_batch).enumerate() {
            let want = match (all_logits, i + 1 == n_batches) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            // On a worker of the thread pool: its parallel loops then start and end without handing work
            // across from a thread outside the pool (which sleeps and wakes at every one).
            match rayon::scope(|_| self.run(batch, want)) {
                Ok((batch_logits, batch_trace)) => {
                    logits.extend(batch_logits);
                    for (layer, choices) in trace.iter_mut().zip(batch_trace) {
                        layer.extend(choices);
                    }
                }
                Err(e) => {
                    self.cache.truncate(start);
                    return Err(e);
                }
            }
        }
        if let Some(traces) = &mut self.router_trace {
            traces.push(trace);
        }
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn context_size(&self) -> usize {
        self.cache.capacity()
    }

    fn truncate(&mut self, n: usize) {
        self.cache.truncate(n);
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn stats_line(&self) -> Option<String> {
        let threads = rayon::current_num_threads();
        let s = if threads == 1 { "" } else { "s" };
        Some(format!("cpu: {} kernels, {threads} thread{s}", dot::simd_level()))
    }
}

/// `Attn(RMSNorm(x))` for the new tokens `x` (`[n, hidden]`) at positions `start ..`; appends their
/// keys and values to the cache of layer `l`.
fn attention_block(
    cfg: &ModelConfig,
    layer: &LayerWeights,
    rope: &Rope,
    cache: &mut KvCache,
    l: usize,
    x: &[f32],
    start: usize,
) -> Result<Vec<f32>> {
    let n = x.len() / cfg.hidden_size;
    let xn = norm::rms_norm_rows(x, &layer.attn_norm, cfg.rms_norm_eps);
    let (mut q, mut k, v) = if n == 1 {
        let [q, k, v] = matvecs(&[(&xn, &layer.attn_q), (&xn, &layer.attn_k), (&xn, &layer.attn_v)])?
            .try_into()
            .expect("three products");
        (q, k, v)
    } else {
        let mut q = vec![0.0; n * cfg.q_dim()];
        let mut k = vec![0.0; n * cfg.kv_dim()];
        let mut v = vec![0.0; n * cfg.kv_dim()];
        let mut input = Input::new(&xn);
        input.matmul(&layer.attn_q, &mut q)?;
        input.matmul(&layer.attn_k, &mut k)?;
        input.matmul(&layer.attn_v, &mut v)?;
        (q, k, v)
    };
    for (t, (qt, kt)) in q.chunks_exact_mut(cfg.q_dim()).zip(k.chunks_exact_mut(cfg.kv_dim())).enumerate() {
        rope.apply(qt, start + t);
        rope.apply(kt, start + t);
    }
    cache.append(l, &k, &v);
    let mut att = vec![0.0; n * cfg.q_dim()];
    attention::causal_attention(cfg, &q, cache.heads(l), start, &mut att);
    let mut out = vec![0.0; n * cfg.hidden_size];
    Input::new(&att).matmul(&layer.attn_output, &mut out)?;
    Ok(out)
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `out[i] = w_i · x_i` for one token per product, all in one parallel pass (`dot::matvec_many`). Inputs
/// shared by several matrices of one weight type are quantized once.
fn matvecs(products: &[(&[f32], &Matrix)]) -> Result<Vec<Vec<f32>>> {
    let mut quantized: Vec<(&[f32], GgmlType, dot::QuantizedActivations)> = Vec::new();
    let mut which = Vec::with_capacity(products.len());
    for &(x, w) in products {
        let known = quantized.iter().position(|(qx, ty, _)| std::ptr::eq(*qx, x) && *ty == w.ty);
        which.push(match known {
            Some(i) => i,
            None => {
                quantized.push((x, w.ty, dot::QuantizedActivations::new(w.ty, x)?));
                quantized.len() - 1
            }
        });
    }
    let mut outs: Vec<Vec<f32>> = products.iter().map(|(_, w)| vec![0.0; w.rows]).collect();
    let mut jobs: Vec<dot::MatVec> = products
        .iter()
        .zip(&which)
        .zip(&mut outs)
        .map(|((&(_, w), &i), out)| dot::MatVec {
            ty: w.ty,
            w: w.data,
            rows: w.rows,
            cols: w.cols,
            x: &quantized[i].2,
            out,
        })
        .collect();
    dot::matvec_many(&mut jobs)?;
    Ok(outs)
}

/// Rows of activations (`[n, cols]`) on their way into weight matrices. They are quantized for a
/// matrix's type (in parallel, over tokens) the first time one needs it, and kept: the matrices that
/// read the same input (q, k and v; an expert's gate and up) share the quantization.
struct Input<'a> {
    xs: &'a [f32],
    quantized: Vec<(GgmlType, Vec<dot::QuantizedActivations>)>,
}

impl<'a> Input<'a> {
    fn new(xs: &'a [f32]) -> Input<'a> {
        Input { xs, quantized: Vec::new() }
    }

    /// `out[t, r] = Σ_c w[r, c] · xs[t, c]` for every row `t` (`[n, w.cols]` → `[n, w.rows]`). The one
    /// place the engine multiplies by a weight matrix: `dot` reads each weight row once for all tokens.
    fn matmul(&mut self, w: &Matrix, out: &mut [f32]) -> Result<()> {
        let known = self.quantized.iter().position(|(ty, _)| *ty == w.ty);
        let i = match known {
            Some(i) => i,
            None => {
                let acts = self
                    .xs
                    .par_chunks_exact(w.cols)
                    .map(|x| dot::QuantizedActivations::new(w.ty, x))
                    .collect::<Result<Vec<_>>>()?;
                self.quantized.push((w.ty, acts));
                self.quantized.len() - 1
            }
        };
        dot::matmul(w.ty, w.data, w.rows, w.cols, &self.quantized[i].1, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        batch.set_router_trace(true);
        chunked.set_router_trace(true);
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
        engine.set_router_trace(true);
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
