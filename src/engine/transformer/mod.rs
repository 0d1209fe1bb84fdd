//! The transformer, written once over the ops of a [`Backend`]: [`forward`] is the whole model, from
//! token ids to logits, for every backend and every layer kind of [`crate::model::spec`].
//! [`Transformer`] wraps it into an [`Engine`]: the KV cache, batching of long calls, rollback on
//! error, which logits to return and the router trace.
//!
//! Per layer: `h = x + Attn(RMSNorm(x))`, `out = h + FFN(RMSNorm(h))`, the FFN a dense SwiGLU or a
//! mixture of experts (router, top-k, the chosen experts, optional shared experts); then a final
//! RMSNorm and the output head. All tokens of one batch go through each layer together, so every
//! weight matrix is read once per batch.
//!
//! How the next backends plug in (design constraints, see [`backend`] for the rules):
//! - CUDA implements [`Backend`] with device buffers as tensors and uploaded matrices as weights;
//!   its fused kernels become overrides of the composite ops (both experts in one launch in
//!   `expert_matmul`, gate+up+SiLU in `expert_swiglu`, q/k/v in `matmul_many`); routes stay on the
//!   device, so decode with every expert resident never waits on the host inside a layer.
//! - Hybrid CPU+GPU experts live in [`Backend::moe`]: the CUDA backend splits a layer's (token,
//!   expert) pairs by residency and runs the missing experts with the CPU backend's kernels
//!   concurrently (or copies them, as its cost model says); [`Backend::moe_lookahead`] predicts the
//!   next layer's experts from this layer's output. `engine::hybrid` does the same over a stand-in
//!   device, so CI exercises the scheduler without a GPU.

pub mod backend;
#[cfg(test)]
mod tests;
pub mod weights;

use anyhow::{ensure, Result};

pub use self::backend::{Backend, ExpertInput, ExpertMatrix, Prepare, Route};
pub use self::weights::{Ffn, FfnWeights, Layer, Moe, Weights};
use super::Engine;
use crate::model::ModelConfig;
use crate::Error;

/// Default longest batch sent through the layers at once: bounds the activation memory of long
/// prompts (an expert's `[tokens, ffn]` intermediate is 56 KiB per token at Mixtral's size) while every
/// weight is still read only once per 512 tokens.
pub const DEFAULT_MAX_BATCH: usize = 512;

/// The experts the router chose in one forward call: `[layer][token]` → expert ids, highest weight
/// first (a dense layer has no tokens).
pub type RouterTrace = Vec<Vec<Vec<usize>>>;

/// Recorded expert choices that replace the router's (`--routing-trace`): benchmarks on random
/// weights, whose routers have no locality, replay a real model's routing. `experts[t][l]` are the
/// experts of the token at position `t` (modulo the trace's length) in layer `l`; each gets the same
/// weight (1/k), since a trace records choices, not weights.
#[derive(Clone, Debug)]
pub struct RoutingReplay {
    experts: std::sync::Arc<Vec<Vec<Vec<usize>>>>,
}

impl RoutingReplay {
    /// A replay for `cfg` (checked: every token has `n_experts_used` distinct ids below `n_experts`
    /// for each MoE layer).
    pub fn new(experts: Vec<Vec<Vec<usize>>>, cfg: &ModelConfig) -> Result<RoutingReplay> {
        ensure!(!experts.is_empty(), "the routing trace holds no tokens");
        for (t, layers) in experts.iter().enumerate() {
            ensure!(
                layers.len() == cfg.n_layers,
                "token {t} of the routing trace has choices for {} layers; the model has {}",
                layers.len(),
                cfg.n_layers
            );
            for (l, ids) in layers.iter().enumerate() {
                let distinct = ids.iter().enumerate().all(|(i, e)| !ids[..i].contains(e));
                ensure!(
                    ids.len() == cfg.n_experts_used && distinct && ids.iter().all(|&e| e < cfg.n_experts),
                    "token {t}, layer {l} of the routing trace: experts {ids:?}, but the model routes each \
                     token to {} distinct experts of {}",
                    cfg.n_experts_used,
                    cfg.n_experts
                );
            }
        }
        Ok(RoutingReplay { experts: std::sync::Arc::new(experts) })
    }

    /// The route of the token at position `pos` in layer `layer`.
    fn route(&self, pos: usize, layer: usize) -> Route {
        let ids = &self.experts[pos % self.experts.len()][layer];
        ids.iter().map(|&e| (e, 1.0 / ids.len() as f32)).collect()
    }
}

/// Which logits a batch returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// The forward pass of one batch: `tokens` at positions `start ..`, appending their keys and values
/// to `cache`. Returns the logits `want` asks for (`[vocab]` or `[tokens, vocab]`) and, when `trace`
/// is given, appends each MoE layer's choices to `trace[layer]`. With `replay`, the experts are the
/// recorded ones instead of the router's (the router still runs, so the work is the same).
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    b: &mut B,
    w: &Weights<B>,
    cache: &mut B::KvCache,
    tokens: &[u32],
    start: usize,
    want: Logits,
    mut trace: Option<&mut RouterTrace>,
    replay: Option<&RoutingReplay>,
) -> Result<Vec<f32>> {
    let mut x = b.embed(&w.token_embd, tokens)?;
    for (l, layer) in w.layers.iter().enumerate() {
        // Attention: x += Wo · Attn(RoPE(Wq xn), RoPE(Wk xn), Wv xn), with xn = RMSNorm(x).
        let xn = b.rms_norm(&x, &layer.attn_norm)?;
        let [mut q, mut k, v] = b.matmul_many([&layer.attn_q, &layer.attn_k, &layer.attn_v], &xn)?;
        b.rope(&mut q, start)?;
        b.rope(&mut k, start)?;
        b.kv_append(cache, l, start, &k, &v)?;
        let att = b.attention(cache, l, start, &q)?;
        let att_out = b.matmul(&layer.attn_output, &att)?;
        b.add(&mut x, &att_out)?;

        // Feed-forward: x += FFN(RMSNorm(x)).
        let xn = b.rms_norm(&x, &layer.ffn_norm)?;
        let y = match &layer.ffn {
            Ffn::Dense(ffn) => b.ffn(ffn, &xn)?,
            Ffn::Moe(moe) => {
                let router_logits = b.matmul(&moe.router, &xn)?;
                let mut routes = b.route(&router_logits, moe.top_k, moe.gating)?;
                if let Some(replay) = replay {
                    let recorded: Vec<Route> =
                        (0..tokens.len()).map(|i| replay.route(start + i, l)).collect();
                    routes = b.routes_from_host(&recorded)?;
                }
                if let Some(trace) = trace.as_deref_mut() {
                    let choices = b.routes_to_host(&routes)?;
                    trace[l].extend(choices.into_iter().map(|r| r.into_iter().map(|(e, _)| e).collect()));
                }
                let mut y = b.moe(l, &moe.experts, &xn, &routes)?;
                if let Some(shared) = &moe.shared {
                    let s = b.ffn(shared, &xn)?;
                    b.add(&mut y, &s)?;
                }
                y
            }
        };
        b.add(&mut x, &y)?;
        if let Some(next) = w.layers.get(l + 1) {
            b.moe_lookahead(l + 1, next, &x)?;
        }
    }

    // Head: logits = W_out · RMSNorm(x), for the rows asked for.
    let x = match want {
        Logits::None => return Ok(Vec::new()),
        Logits::Last => b.rows(&x, tokens.len() - 1, 1)?,
        Logits::All => x,
    };
    let xn = b.rms_norm(&x, &w.output_norm)?;
    let logits = b.matmul(&w.output, &xn)?;
    b.to_host(logits)
}

/// Errors unless a KV cache of `ctx` tokens is possible for `cfg` (checked before a backend plans
/// its memory for it).
pub fn check_context(cfg: &ModelConfig, ctx: usize) -> Result<()> {
    ensure!(ctx > 0, "the context size must be at least 1 token");
    ensure!(
        ctx <= cfg.context_length,
        "context size {ctx} exceeds the model's context length {}",
        cfg.context_length
    );
    Ok(())
}

/// A model on one backend with its KV cache: an [`Engine`].
pub struct Transformer<B: Backend> {
    backend: B,
    weights: Weights<B>,
    cfg: ModelConfig,
    cache: B::KvCache,
    capacity: usize,
    /// Tokens in the KV cache.
    len: usize,
    /// Longer `forward` calls are processed in batches of this many tokens.
    max_batch: usize,
    /// `Some` while tracing: one entry per forward call.
    router_trace: Option<Vec<RouterTrace>>,
    replay: Option<RoutingReplay>,
}

impl<B: Backend> Transformer<B> {
    /// The model `weights` (prepared by `backend` for `cfg`) with a KV cache of `ctx` tokens.
    pub fn with_weights(
        mut backend: B,
        weights: Weights<B>,
        cfg: ModelConfig,
        ctx: usize,
    ) -> Result<Transformer<B>> {
        check_context(&cfg, ctx)?;
        Ok(Transformer {
            cache: backend.kv_cache(ctx)?,
            backend,
            weights,
            cfg,
            capacity: ctx,
            len: 0,
            max_batch: DEFAULT_MAX_BATCH,
            router_trace: None,
            replay: None,
        })
    }

    /// The backend, for what it reports about itself (a GPU's placement plan).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Sets the batch size of prompt processing (at least 1).
    pub fn set_max_batch(&mut self, tokens: usize) {
        self.max_batch = tokens.max(1);
    }
}

impl<B: Backend> Engine for Transformer<B> {
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        let vocab = self.cfg.vocab_size;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::TokenOutOfVocabulary { token, vocab }.into());
        }
        let start = self.len;
        if start + tokens.len() > self.capacity {
            return Err(
                Error::ContextFull { cached: start, new: tokens.len(), capacity: self.capacity }.into()
            );
        }
        let n_layers = self.cfg.n_layers;
        let mut trace = self.router_trace.is_some().then(|| vec![Vec::new(); n_layers]);
        let mut logits = Vec::new();
        let n_batches = tokens.len().div_ceil(self.max_batch);
        for (i, batch) in tokens.chunks(self.max_batch).enumerate() {
            let want = match (all_logits, i + 1 == n_batches) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            let Transformer { backend, weights, cache, len, replay, .. } = self;
            let pos = *len;
            let replay = replay.as_ref();
            let result =
                backend.scoped(|b| forward(b, weights, cache, batch, pos, want, trace.as_mut(), replay));
            match result {
                Ok(batch_logits) => {
                    logits.extend(batch_logits);
                    self.len += batch.len();
                }
                Err(e) => {
                    self.len = start;
                    self.backend.kv_truncate(&mut self.cache, start);
                    return Err(e);
                }
            }
        }
        if let (Some(traces), Some(trace)) = (&mut self.router_trace, trace) {
            traces.push(trace);
        }
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.len
    }

    fn context_size(&self) -> usize {
        self.capacity
    }

    fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.len = n;
            self.backend.kv_truncate(&mut self.cache, n);
        }
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn stats_line(&self) -> Option<String> {
        self.backend.stats_line()
    }

    fn expert_stats(&self) -> Option<crate::engine::ExpertStats> {
        self.backend.expert_stats()
    }

    fn set_router_trace(&mut self, on: bool) -> Result<()> {
        self.router_trace = on.then(Vec::new);
        Ok(())
    }

    fn take_router_trace(&mut self) -> Vec<RouterTrace> {
        self.router_trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn set_routing_replay(&mut self, replay: Option<RoutingReplay>) -> Result<()> {
        self.replay = replay;
        Ok(())
    }
}
