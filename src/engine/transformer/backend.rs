//! The operations a backend provides to the transformer: what [`super::forward`] is written in.
//!
//! The trait is narrow on purpose: every op is something a device runs as one kernel (or one parallel
//! pass), never a piece of the model. Required ops are the primitives; *composite* ops have a default
//! composition of primitives (the free functions at the end of this file) that a backend overrides
//! where it has something faster — the CPU runs a decode step's q/k/v products in one parallel pass
//! (`matmul_many`) and fuses an expert's gate, up and SiLU (`expert_swiglu`); CUDA will run both
//! chosen experts in one launch and fuse gate+up+SiLU the same way.
//!
//! Design rules, for the backends to come:
//! - **Backend-owned data.** Activations ([`Backend::Tensor`]), weights ([`Backend::Matrix`],
//!   [`Backend::Vector`], [`Backend::Experts`]), the router's choice ([`Backend::Routes`]) and the KV
//!   cache live where the backend keeps them: on a GPU, device buffers. The transformer never reads
//!   them; only [`Backend::to_host`] (the logits) and [`Backend::routes_to_host`] (router traces,
//!   when asked for) cross to the host on its behalf, so a device backend need not wait for the device
//!   inside a forward call (an op may, where it needs the router's ids on the host: grouping a
//!   prompt's tokens by expert, fetching a missing expert). Weights are
//!   handles the backend prepared at load ([`Prepare`]: the CPU keeps views into the mapped file, CUDA
//!   uploads). Ops return fresh tensors; a device backend recycles buffers (a pool, or stream-ordered
//!   allocation) so that this costs no allocation per op.
//! - **Shapes in the backend.** A tensor is `[rows, width]` row-major f32; the backend was built for
//!   one model (see each backend's constructor) and knows its widths, head geometry and RoPE table,
//!   so the ops carry only what changes per call: tensors, positions, layer indices.
//! - **Kernel choice inside the op.** One token or many is the backend's business: `matmul` picks the
//!   matrix-vector or the matrix-matrix kernel, never the model code.
//! - **The expert seam.** [`Backend::moe`] runs one layer's selected (token, expert) pairs and is the
//!   one place where experts execute. A device backend with experts outside its memory splits the
//!   pairs there (the CUDA backend; `engine::hybrid` over a stand-in device): those whose expert is
//!   resident run on the device (this default composition), the others on the CPU backend's `moe`
//!   concurrently (their few activation rows copied to the host and the sums back), or are copied
//!   into a slot when that is cheaper (prompts). [`Backend::moe_lookahead`]
//!   is called with each layer's output and the next layer's weights, so such a scheduler can apply
//!   the next router early (the prediction is ~90-96% right on Mixtral) and start the next layer's CPU
//!   experts or copies while the GPU runs attention; a wrong guess costs time, never correctness,
//!   because `moe` always gets the true routes.

use anyhow::Result;

use super::weights::{FfnWeights, Layer};
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix};

/// One token's chosen experts with their weights, highest weight first.
pub type Route = Vec<(usize, f32)>;

/// Which of an expert's matrices a product uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertMatrix {
    /// w1: `[ffn, hidden]`.
    Gate,
    /// w3: `[ffn, hidden]`.
    Up,
    /// w2: `[hidden, ffn]`.
    Down,
}

/// What the rows of an expert product's input are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertInput {
    /// One row per token (`[tokens, width]`): each (token, expert) pair reads its token's row.
    Tokens,
    /// One row per pair, in the order of the routes' pairs (the output of an earlier expert product).
    Pairs,
}

/// The ops of one backend. See the module documentation for the rules.
///
/// Backends and their data are `Send + Sync`: an engine moves between threads (a server), and the CPU
/// runs a whole batch on a worker of its thread pool.
pub trait Backend: Send {
    /// Activations `[rows, width]`, f32.
    type Tensor: Send + Sync;
    /// A weight matrix `[rows, cols]` (row r = output r), in its quantized type.
    type Matrix: Send + Sync;
    /// The weights of a norm (`[width]`, f32).
    type Vector: Send + Sync;
    /// The experts of one layer.
    type Experts: Send + Sync;
    /// The router's choice for a batch: per token, k experts and their weights.
    type Routes: Send + Sync;
    /// The keys and values of every layer.
    type KvCache: Send + Sync;

    /// A KV cache for `capacity` tokens.
    fn kv_cache(&mut self, capacity: usize) -> Result<Self::KvCache>;

    // --- Data movement ---------------------------------------------------------------------------

    /// Rows `tokens` of the embedding table (`[tokens, hidden]`): embedding gather.
    fn embed(&mut self, table: &Self::Matrix, tokens: &[u32]) -> Result<Self::Tensor>;

    /// `count` rows of `x` from row `first`.
    fn rows(&mut self, x: &Self::Tensor, first: usize, count: usize) -> Result<Self::Tensor>;

    /// The values of `x`, row-major, on the host.
    fn to_host(&mut self, x: Self::Tensor) -> Result<Vec<f32>>;

    // --- Elementwise -----------------------------------------------------------------------------

    /// `x * w / sqrt(mean(x²) + eps)` per row (eps from the model).
    fn rms_norm(&mut self, x: &Self::Tensor, w: &Self::Vector) -> Result<Self::Tensor>;

    /// `x += y`.
    fn add(&mut self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// `gate = silu(gate) * up`, elementwise.
    fn swiglu(&mut self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<()>;

    // --- Products --------------------------------------------------------------------------------

    /// `y[t] = W x[t]` for every row: `[rows, w.cols]` → `[rows, w.rows]`.
    fn matmul(&mut self, w: &Self::Matrix, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Several matrices against the same input (q/k/v; gate/up). Composite: the default is one
    /// `matmul` each; the CPU shares the input's quantization and, for one token, runs all the
    /// products in one parallel pass.
    fn matmul_many<const N: usize>(
        &mut self,
        ws: [&Self::Matrix; N],
        x: &Self::Tensor,
    ) -> Result<[Self::Tensor; N]> {
        default_matmul_many(self, ws, x)
    }

    // --- Attention -------------------------------------------------------------------------------

    /// Rotates the heads of every row of `x` (queries or keys) for positions `start ..`.
    fn rope(&mut self, x: &mut Self::Tensor, start: usize) -> Result<()>;

    /// Stores the keys and values of new tokens at positions `start ..` of layer `layer`.
    fn kv_append(
        &mut self,
        cache: &mut Self::KvCache,
        layer: usize,
        start: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<()>;

    /// Forgets every position from `len` on (rollback of a failed call, `truncate`).
    fn kv_truncate(&mut self, cache: &mut Self::KvCache, len: usize);

    /// Causal grouped-query attention of the queries `q` (rows at positions `start ..`) over layer
    /// `layer`'s cache, which already holds their own keys and values: `[rows, n_heads * head_dim]`.
    fn attention(
        &mut self,
        cache: &Self::KvCache,
        layer: usize,
        start: usize,
        q: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    // --- Feed-forward ----------------------------------------------------------------------------

    /// A SwiGLU FFN `down(silu(gate x) * up x)` (a dense layer, or shared experts). Composite.
    fn ffn(&mut self, w: &FfnWeights<Self>, x: &Self::Tensor) -> Result<Self::Tensor>
    where
        Self: Sized,
    {
        default_ffn(self, w, x)
    }

    // --- Mixture of experts ----------------------------------------------------------------------

    /// Router top-k: from router logits (`[tokens, n_experts]`), each token's `top_k` experts and
    /// their weights as `gating` says (Mixtral: softmax, top 2, renormalized).
    fn route(&mut self, logits: &Self::Tensor, top_k: usize, gating: Gating) -> Result<Self::Routes>;

    /// The routes on the host, per token (for router traces).
    fn routes_to_host(&mut self, routes: &Self::Routes) -> Result<Vec<Route>>;

    /// Routes from the host, per token (replayed routing).
    fn routes_from_host(&mut self, per_token: &[Route]) -> Result<Self::Routes>;

    /// For every (token, expert) pair of `routes`, the products of the pair's expert matrices `which`
    /// with the pair's input row: a matmul with an expert id list. Outputs have one row per pair, in
    /// the routes' pair order.
    fn expert_matmul<const N: usize>(
        &mut self,
        experts: &Self::Experts,
        which: [ExpertMatrix; N],
        x: &Self::Tensor,
        input: ExpertInput,
        routes: &Self::Routes,
    ) -> Result<[Self::Tensor; N]>;

    /// Weighted scatter-add: `out[token] = Σ weight · y[pair]` over the token's pairs (`y` one row per
    /// pair, in the routes' pair order) → `[tokens, width]`.
    fn weighted_sum(&mut self, y: &Self::Tensor, routes: &Self::Routes) -> Result<Self::Tensor>;

    /// `silu(gate x) * up x` for every pair (one row each, from token rows `x`). Composite: fused
    /// where a backend can (the CPU shares the gathered rows' quantization between gate and up).
    fn expert_swiglu(
        &mut self,
        experts: &Self::Experts,
        x: &Self::Tensor,
        routes: &Self::Routes,
    ) -> Result<Self::Tensor> {
        default_expert_swiglu(self, experts, x, routes)
    }

    /// The experts of layer `layer` on the tokens `x` (`[tokens, hidden]`, normalized), mixed with
    /// the routes' weights: **the expert seam** (see the module documentation). Composite.
    fn moe(
        &mut self,
        layer: usize,
        experts: &Self::Experts,
        x: &Self::Tensor,
        routes: &Self::Routes,
    ) -> Result<Self::Tensor> {
        default_moe(self, layer, experts, x, routes)
    }

    // --- Running ---------------------------------------------------------------------------------

    /// Runs `work` (one batch through the model) where the backend's ops run best: the CPU runs it on
    /// a worker of its thread pool. The default runs it in place.
    fn scoped<R: Send>(&mut self, work: impl FnOnce(&mut Self) -> R + Send) -> R
    where
        Self: Sized,
    {
        work(self)
    }

    /// One line of backend statistics for `/stats` and `--verbose` (e.g. the expert-cache hit rate).
    fn stats_line(&self) -> Option<String> {
        None
    }

    /// Where the experts ran (a scheduler's counters).
    fn expert_stats(&self) -> Option<crate::engine::ExpertStats> {
        None
    }

    /// Called with the residual stream `x` after each layer and the weights of the layer `layer`
    /// that comes next, before its attention runs: a scheduler may route `x` with the next router to
    /// start that layer's expert work early. The default does nothing.
    fn moe_lookahead(&mut self, layer: usize, next: &Layer<Self>, x: &Self::Tensor) -> Result<()>
    where
        Self: Sized,
    {
        let _ = (layer, next, x);
        Ok(())
    }
}

/// Makes the backend's handles for a model's host weights: what a backend does at load.
pub trait Prepare<'w>: Backend {
    fn matrix(&mut self, m: &Matrix<'w>) -> Result<Self::Matrix>;
    fn vector(&mut self, v: &[f32]) -> Result<Self::Vector>;
    /// The experts of layer `layer` (a device backend decides here which ones it uploads).
    fn experts(&mut self, layer: usize, experts: &[ExpertWeights<'w>]) -> Result<Self::Experts>;
}

/// [`Backend::matmul_many`] as one `matmul` per matrix.
pub fn default_matmul_many<B: Backend + ?Sized, const N: usize>(
    b: &mut B,
    ws: [&B::Matrix; N],
    x: &B::Tensor,
) -> Result<[B::Tensor; N]> {
    let mut out = Vec::with_capacity(N);
    for w in ws {
        out.push(b.matmul(w, x)?);
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!("N products")))
}

/// [`Backend::ffn`]: gate and up together, SiLU, down.
pub fn default_ffn<B: Backend>(b: &mut B, w: &FfnWeights<B>, x: &B::Tensor) -> Result<B::Tensor> {
    let [mut gate, up] = b.matmul_many([&w.gate, &w.up], x)?;
    b.swiglu(&mut gate, &up)?;
    b.matmul(&w.down, &gate)
}

/// [`Backend::expert_swiglu`]: the gate and up products of every pair, then SiLU.
pub fn default_expert_swiglu<B: Backend + ?Sized>(
    b: &mut B,
    experts: &B::Experts,
    x: &B::Tensor,
    routes: &B::Routes,
) -> Result<B::Tensor> {
    let [mut gate, up] =
        b.expert_matmul(experts, [ExpertMatrix::Gate, ExpertMatrix::Up], x, ExpertInput::Tokens, routes)?;
    b.swiglu(&mut gate, &up)?;
    Ok(gate)
}

/// [`Backend::moe`], as llama.cpp's `build_moe_ffn` composes it: gate/up/SiLU per pair, down per
/// pair, then the weighted sum per token.
pub fn default_moe<B: Backend + ?Sized>(
    b: &mut B,
    _layer: usize,
    experts: &B::Experts,
    x: &B::Tensor,
    routes: &B::Routes,
) -> Result<B::Tensor> {
    let h = b.expert_swiglu(experts, x, routes)?;
    let [y] = b.expert_matmul(experts, [ExpertMatrix::Down], &h, ExpertInput::Pairs, routes)?;
    b.weighted_sum(&y, routes)
}
