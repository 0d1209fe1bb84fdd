//! `CudaEngine`: the forward pass on the GPU, the same math as `engine::cpu::CpuEngine`.
//!
//! Per layer: `h = x + Attn(RMSNorm(x))`, `out = h + MoE(RMSNorm(h))`; the router takes a softmax over
//! all experts, keeps the top k and renormalizes; experts are SwiGLU FFNs. Activations are f32 (f16
//! inside the tensor-core tiles of prompt processing), the KV cache f16. Decode (one token) uses the
//! matrix-vector kernels and routes on the device: when every expert of a layer is in VRAM the host
//! never waits inside a layer. Prompts use the matrix-matrix kernels with tokens grouped by expert,
//! which needs the routes on the host (one wait per layer).

use anyhow::{bail, ensure, Context, Result};

use super::device::{BufView, BufViewMut, DeviceBuffer};
use super::expert_cache::ExpertCache;
use super::ops::{AttentionArgs, AttentionScratch, Gpu, WeightView, ATT_MAX_SPLITS};
use super::{CudaOptions, DeviceInfo};
use crate::engine::Engine;
use crate::engine::RouterTrace;
use crate::format::GgmlType;
use crate::model::weights::{ExpertWeights, Matrix, Model, ModelWeights};
use crate::model::ModelConfig;
use crate::placement::{self, ExpertLayout, ModelSizes, Plan};

/// Longest batch of tokens sent through the layers at once (as the CPU engine).
pub const MAX_BATCH: usize = 512;

/// A weight matrix uploaded to VRAM.
struct DeviceMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    buf: DeviceBuffer<u8>,
}

impl DeviceMatrix {
    fn upload(gpu: &Gpu, m: &Matrix) -> Result<DeviceMatrix> {
        Ok(DeviceMatrix { ty: m.ty, rows: m.rows, cols: m.cols, buf: gpu.upload(m.data)? })
    }

    fn view(&self) -> WeightView<'_> {
        WeightView { ty: self.ty, rows: self.rows, cols: self.cols, data: self.buf.slice(..) }
    }
}

/// Type and shape of the gate, up and down matrices, shared by all experts of a layer.
#[derive(Clone, Copy, PartialEq)]
struct ExpertShape {
    kinds: [(GgmlType, usize, usize); 3],
}

impl ExpertShape {
    fn of(e: &ExpertWeights) -> ExpertShape {
        ExpertShape { kinds: [e.gate, e.up, e.down].map(|m| (m.ty, m.rows, m.cols)) }
    }
}

/// The experts of one layer: the resident ones' buffers, and a device table of every expert's matrix
/// addresses (`[gate, up, down][expert]`) that the expert-batched kernels index with the router's ids.
struct LayerExperts {
    shape: ExpertShape,
    layouts: Vec<ExpertLayout>,
    resident: Vec<Option<DeviceBuffer<u8>>>,
    /// Host copy of `table`; entries of experts in cache slots change as slots are reused.
    host_table: Vec<u64>,
    table: DeviceBuffer<u64>,
}

impl LayerExperts {
    fn upload(gpu: &Gpu, experts: &[ExpertWeights], resident: &[bool], layer: usize) -> Result<LayerExperts> {
        let shape = ExpertShape::of(&experts[0]);
        let n = experts.len();
        ensure!(
            experts.iter().all(|e| ExpertShape::of(e) == shape),
            "the experts of layer {layer} differ in type or shape; the CUDA engine needs them alike"
        );
        let layouts: Vec<ExpertLayout> = experts.iter().map(ExpertLayout::of).collect();
        let mut host_table = vec![0u64; 3 * n];
        let mut bufs = Vec::with_capacity(n);
        for (e, (expert, layout)) in experts.iter().zip(&layouts).enumerate() {
            if !resident[e] {
                bufs.push(None);
                continue;
            }
            let mut buf = gpu.alloc_zeros::<u8>(layout.bytes).with_context(|| {
                format!("allocating expert {e} of layer {layer} ({} bytes)", layout.bytes)
            })?;
            for (m, off) in [expert.gate, expert.up, expert.down].iter().zip(layout.offsets) {
                gpu.copy_htod(m.data, &mut buf.slice_mut(off..off + m.data.len()))?;
            }
            let base = buf.address();
            for k in 0..3 {
                host_table[k * n + e] = base + layout.offsets[k] as u64;
            }
            bufs.push(Some(buf));
        }
        let table = gpu.upload(&host_table)?;
        Ok(LayerExperts { shape, layouts, resident: bufs, host_table, table })
    }

    fn all_resident(&self) -> bool {
        self.resident.iter().all(Option::is_some)
    }

    fn n(&self) -> usize {
        self.resident.len()
    }

    /// Table of matrix kind `k` (0 gate, 1 up, 2 down).
    fn table(&self, k: usize) -> BufView<'_, u64> {
        self.table.slice(k * self.n()..(k + 1) * self.n())
    }

    /// Matrix `k` of expert `e`, whose bytes are in `buf` (its resident buffer or a cache slot).
    fn matrix<'b>(&self, buf: &'b DeviceBuffer<u8>, e: usize, k: usize) -> WeightView<'b> {
        let (ty, rows, cols) = self.shape.kinds[k];
        let off = self.layouts[e].offsets[k];
        let len = rows * ty.bytes_for(cols).unwrap_or(0);
        WeightView { ty, rows, cols, data: buf.slice(off..off + len) }
    }
}

struct DeviceLayer {
    attn_norm: DeviceBuffer<f32>,
    q: DeviceMatrix,
    k: DeviceMatrix,
    v: DeviceMatrix,
    o: DeviceMatrix,
    ffn_norm: DeviceBuffer<f32>,
    router: DeviceMatrix,
    experts: LayerExperts,
    k_cache: DeviceBuffer<u16>,
    v_cache: DeviceBuffer<u16>,
}

/// Activation buffers for batches of up to `MAX_BATCH` tokens.
struct Buffers {
    x: DeviceBuffer<f32>,
    xn: DeviceBuffer<f32>,
    q: DeviceBuffer<f32>,
    k: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
    att: DeviceBuffer<f32>,
    tmp: DeviceBuffer<f32>,
    gate: DeviceBuffer<f32>,
    up: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    router_logits: DeviceBuffer<f32>,
    ids: DeviceBuffer<i32>,
    route_weights: DeviceBuffer<f32>,
    tokens: DeviceBuffer<i32>,
    gather: DeviceBuffer<i32>,
    gather_weights: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
    attention: AttentionScratch,
}

/// Element counts of [`Buffers`] (f32/i32, 4 bytes each), shared by allocation and the placement plan.
struct BufferSizes {
    batch: usize,
    /// Rows of the expert buffers: the batch, or the k experts of one decoded token.
    expert_rows: usize,
    attention_splits: usize,
}

impl BufferSizes {
    fn new(cfg: &ModelConfig, batch: usize) -> BufferSizes {
        BufferSizes {
            batch,
            expert_rows: batch.max(cfg.n_experts_used),
            attention_splits: batch.max(ATT_MAX_SPLITS),
        }
    }

    fn bytes(&self, cfg: &ModelConfig) -> u64 {
        let (b, routes) = (self.batch, self.batch * cfg.n_experts_used);
        let per_token =
            3 * cfg.hidden_size + 2 * cfg.q_dim() + 2 * cfg.kv_dim() + cfg.n_experts + 1 + cfg.vocab_size;
        let experts = self.expert_rows * (2 * cfg.ffn_size + cfg.hidden_size);
        let values = b * per_token + experts + 4 * routes;
        4 * values as u64 + AttentionScratch::bytes(self.attention_splits, cfg.n_heads, cfg.head_dim)
    }
}

impl Buffers {
    fn new(gpu: &Gpu, cfg: &ModelConfig, s: &BufferSizes) -> Result<Buffers> {
        let (b, routes) = (s.batch, s.batch * cfg.n_experts_used);
        Ok(Buffers {
            x: gpu.alloc_zeros(b * cfg.hidden_size)?,
            xn: gpu.alloc_zeros(b * cfg.hidden_size)?,
            q: gpu.alloc_zeros(b * cfg.q_dim())?,
            k: gpu.alloc_zeros(b * cfg.kv_dim())?,
            v: gpu.alloc_zeros(b * cfg.kv_dim())?,
            att: gpu.alloc_zeros(b * cfg.q_dim())?,
            tmp: gpu.alloc_zeros(b * cfg.hidden_size)?,
            gate: gpu.alloc_zeros(s.expert_rows * cfg.ffn_size)?,
            up: gpu.alloc_zeros(s.expert_rows * cfg.ffn_size)?,
            y: gpu.alloc_zeros(s.expert_rows * cfg.hidden_size)?,
            router_logits: gpu.alloc_zeros(b * cfg.n_experts)?,
            ids: gpu.alloc_zeros(routes)?,
            route_weights: gpu.alloc_zeros(routes)?,
            tokens: gpu.alloc_zeros(b)?,
            gather: gpu.alloc_zeros(routes)?,
            gather_weights: gpu.alloc_zeros(routes)?,
            logits: gpu.alloc_zeros(b * cfg.vocab_size)?,
            attention: AttentionScratch::new(gpu, s.attention_splits, cfg.n_heads, cfg.head_dim)?,
        })
    }
}

/// Which logits a batch returns.
#[derive(Clone, Copy)]
enum Logits {
    None,
    Last,
    All,
}

pub struct CudaEngine<'a> {
    gpu: Gpu,
    cfg: ModelConfig,
    plan: Plan,
    /// Host weights: the source of experts copied into cache slots on demand.
    host: ModelWeights<'a>,
    token_embd: DeviceMatrix,
    layers: Vec<DeviceLayer>,
    output_norm: DeviceBuffer<f32>,
    output: DeviceMatrix,
    inv_freq: DeviceBuffer<f64>,
    buf: Buffers,
    cache: Option<ExpertCache>,
    ctx: usize,
    /// Tokens in the KV cache.
    pos: usize,
    /// `Some` while tracing: the router's choices, one entry per forward call (as the CPU engine's).
    router_trace: Option<Vec<RouterTrace>>,
    /// The choices of the forward call in progress, `[layer][token]`.
    current_trace: RouterTrace,
}

impl<'a> CudaEngine<'a> {
    /// Uploads `model` to GPU `opts.device` as the placement plan for `opts.vram_budget` decides
    /// (print [`CudaEngine::plan`] to show it), with an f16 KV cache of `ctx` tokens.
    pub fn new(model: &'a Model, ctx: usize, opts: &CudaOptions) -> Result<CudaEngine<'a>> {
        Self::placed(Gpu::new(opts.device)?, model, ctx, opts.vram_budget, opts.gpu_layers)
    }

    /// The engine on `gpu` (any [`super::Device`]: a GPU, or the tests' emulator); `vram_budget` as in
    /// [`CudaOptions`].
    pub fn on(gpu: Gpu, model: &'a Model, ctx: usize, vram_budget: Option<u64>) -> Result<CudaEngine<'a>> {
        Self::placed(gpu, model, ctx, vram_budget, None)
    }

    /// [`CudaEngine::on`] with `gpu_layers` as in [`CudaOptions`] (`-ngl`).
    fn placed(
        gpu: Gpu,
        model: &'a Model,
        ctx: usize,
        vram_budget: Option<u64>,
        gpu_layers: Option<usize>,
    ) -> Result<CudaEngine<'a>> {
        let cfg = model.config.clone();
        ensure!(ctx > 0, "the context size must be at least 1 token");
        ensure!(
            ctx <= cfg.context_length,
            "context size {ctx} exceeds the model's context length {}",
            cfg.context_length
        );
        let host = model.weights()?;
        let sizes = BufferSizes::new(&cfg, MAX_BATCH);
        let model_sizes = ModelSizes::of(&host, &cfg, ctx, sizes.bytes(&cfg));
        let budget = vram_budget.unwrap_or_else(|| placement::default_budget(gpu.info.free_bytes));
        let plan = Plan::with_gpu_layers(&model_sizes, budget, gpu_layers)?;
        let device = &gpu.info.name;
        let upload = |m: &Matrix, what: &str| {
            DeviceMatrix::upload(&gpu, m)
                .with_context(|| format!("uploading {what} ({} bytes) to {device}", m.data.len()))
        };
        let kv_len = ctx * cfg.kv_dim();
        let layers = host
            .layers
            .iter()
            .enumerate()
            .map(|(l, w)| {
                let norm = |v: &[f32]| {
                    gpu.upload(v).with_context(|| format!("uploading the norms of layer {l} to {device}"))
                };
                let attention = |m: &Matrix| upload(m, &format!("the attention weights of layer {l}"));
                let kv_cache = || {
                    gpu.alloc_zeros(kv_len).with_context(|| {
                        format!("allocating the KV cache of layer {l} ({} bytes) on {device}", 2 * 2 * kv_len)
                    })
                };
                Ok(DeviceLayer {
                    attn_norm: norm(&w.attn_norm)?,
                    q: attention(&w.attn_q)?,
                    k: attention(&w.attn_k)?,
                    v: attention(&w.attn_v)?,
                    o: attention(&w.attn_output)?,
                    ffn_norm: norm(&w.ffn_norm)?,
                    router: upload(&w.router, &format!("the router of layer {l}"))?,
                    experts: LayerExperts::upload(&gpu, &w.experts, &plan.resident[l], l)?,
                    k_cache: kv_cache()?,
                    v_cache: kv_cache()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let inv_freq: Vec<f64> = (0..cfg.head_dim / 2)
            .map(|i| (cfg.rope_theta as f64).powf(-2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        let cache = match plan.n_slots {
            0 => None,
            n => Some(ExpertCache::new(&gpu, n, plan.slot_bytes as usize, cfg.n_experts_used)?),
        };
        let engine = CudaEngine {
            token_embd: upload(&host.token_embd, "the token embeddings")?,
            output_norm: gpu
                .upload(&host.output_norm)
                .with_context(|| format!("uploading the norms to {device}"))?,
            output: upload(&host.output, "the output head")?,
            inv_freq: gpu.upload(&inv_freq)?,
            buf: Buffers::new(&gpu, &cfg, &sizes).with_context(|| {
                format!("allocating the activation buffers ({} bytes) on {device}", sizes.bytes(&cfg))
            })?,
            layers,
            cache,
            host,
            plan,
            cfg,
            ctx,
            pos: 0,
            router_trace: None,
            current_trace: Vec::new(),
            gpu,
        };
        engine.gpu.sync()?;
        Ok(engine)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn device(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// One batch through every layer at positions `pos ..`; returns the logits `want` asks for.
    fn run(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        let n = tokens.len();
        let (h, pos0) = (self.cfg.hidden_size, self.pos);
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        self.gpu.copy_htod(&ids, &mut self.buf.tokens.slice_mut(..n))?;
        self.gpu.embed(
            &self.token_embd.view(),
            &self.buf.tokens.slice(..n),
            n,
            &mut self.buf.x.slice_mut(..n * h),
        )?;
        for l in 0..self.layers.len() {
            self.attention_block(l, n, pos0).with_context(|| format!("layer {l} attention"))?;
            self.moe_block(l, n).with_context(|| format!("layer {l} experts"))?;
        }
        let (rows, first) = match want {
            Logits::None => {
                self.gpu.sync()?;
                return Ok(Vec::new());
            }
            Logits::Last => (1, n - 1),
            Logits::All => (n, 0),
        };
        let (gpu, b) = (&self.gpu, &mut self.buf);
        gpu.rms_norm(
            &b.x.slice(first * h..n * h),
            &self.output_norm.view(),
            self.cfg.rms_norm_eps,
            rows,
            &mut b.xn.slice_mut(..rows * h),
        )?;
        let vocab = self.cfg.vocab_size;
        product(
            gpu,
            &self.output.view(),
            &b.xn.slice(..rows * h),
            rows,
            &mut b.logits.slice_mut(..rows * vocab),
        )?;
        let logits = gpu.download(&b.logits.slice(..rows * vocab))?;
        Ok(logits)
    }

    /// `x += Attn(RMSNorm(x))` for layer `l`, appending the new keys and values to its cache.
    fn attention_block(&mut self, l: usize, n: usize, pos0: usize) -> Result<()> {
        let cfg = &self.cfg;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let (gpu, b, layer) = (&self.gpu, &mut self.buf, &mut self.layers[l]);
        gpu.rms_norm(
            &b.x.slice(..n * h),
            &layer.attn_norm.view(),
            cfg.rms_norm_eps,
            n,
            &mut b.xn.slice_mut(..n * h),
        )?;
        let xn = b.xn.slice(..n * h);
        product(gpu, &layer.q.view(), &xn, n, &mut b.q.slice_mut(..n * qd))?;
        product(gpu, &layer.k.view(), &xn, n, &mut b.k.slice_mut(..n * kvd))?;
        product(gpu, &layer.v.view(), &xn, n, &mut b.v.slice_mut(..n * kvd))?;
        gpu.rope(&mut b.q.slice_mut(..n * qd), n, qd, cfg.head_dim, pos0, &self.inv_freq.view())?;
        gpu.rope(&mut b.k.slice_mut(..n * kvd), n, kvd, cfg.head_dim, pos0, &self.inv_freq.view())?;
        gpu.kv_store(
            &b.k.slice(..n * kvd),
            &b.v.slice(..n * kvd),
            &mut layer.k_cache.slice_mut(..),
            &mut layer.v_cache.slice_mut(..),
            n,
            kvd,
            pos0,
        )?;
        let args = AttentionArgs {
            n,
            pos0,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        gpu.attention(
            &args,
            &b.q.slice(..n * qd),
            &layer.k_cache.slice(..),
            &layer.v_cache.slice(..),
            &mut b.attention,
            &mut b.att.slice_mut(..n * qd),
        )?;
        product(gpu, &layer.o.view(), &b.att.slice(..n * qd), n, &mut b.tmp.slice_mut(..n * h))?;
        gpu.add(&mut b.x.slice_mut(..n * h), &b.tmp.slice(..n * h), n * h)
    }

    /// `x += MoE(RMSNorm(x))` for layer `l`.
    fn moe_block(&mut self, l: usize, n: usize) -> Result<()> {
        let cfg = &self.cfg;
        let (h, k, ne) = (cfg.hidden_size, cfg.n_experts_used, cfg.n_experts);
        {
            let (gpu, b, layer) = (&self.gpu, &mut self.buf, &self.layers[l]);
            gpu.rms_norm(
                &b.x.slice(..n * h),
                &layer.ffn_norm.view(),
                cfg.rms_norm_eps,
                n,
                &mut b.xn.slice_mut(..n * h),
            )?;
            product(
                gpu,
                &layer.router.view(),
                &b.xn.slice(..n * h),
                n,
                &mut b.router_logits.slice_mut(..n * ne),
            )?;
            gpu.route_top_k(
                &b.router_logits.slice(..n * ne),
                n,
                ne,
                k,
                &mut b.ids.slice_mut(..n * k),
                &mut b.route_weights.slice_mut(..n * k),
            )?;
            if self.router_trace.is_some() {
                let ids = gpu.download(&b.ids.slice(..n * k))?;
                let choices = ids.chunks_exact(k).map(|c| c.iter().map(|&e| e as usize).collect());
                self.current_trace[l].extend(choices);
            }
        }
        if n == 1 {
            self.moe_decode(l)
        } else {
            self.moe_prompt(l, n)
        }
    }

    /// One token: the k selected experts in one launch per matrix, ids read on the device. Experts not
    /// in VRAM are fetched into cache slots first (the host reads the ids: one wait).
    fn moe_decode(&mut self, l: usize) -> Result<()> {
        let cfg = &self.cfg;
        let (h, k, f) = (cfg.hidden_size, cfg.n_experts_used, cfg.ffn_size);
        if !self.layers[l].experts.all_resident() {
            let ids: Vec<usize> =
                self.gpu.download(&self.buf.ids.slice(..k))?.into_iter().map(|e| e as usize).collect();
            self.fetch_into_table(l, &ids)?;
        }
        let (gpu, b, ex) = (&self.gpu, &mut self.buf, &self.layers[l].experts);
        let ids = b.ids.slice(..k);
        let [(gt, gr, gc), (ut, ur, uc), (dt, dr, dc)] = ex.shape.kinds;
        gpu.matvec_experts(
            &ex.table(0),
            gt,
            gr,
            gc,
            &ids,
            &b.xn.slice(..h),
            0,
            &mut b.gate.slice_mut(..k * f),
        )?;
        gpu.matvec_experts(
            &ex.table(1),
            ut,
            ur,
            uc,
            &ids,
            &b.xn.slice(..h),
            0,
            &mut b.up.slice_mut(..k * f),
        )?;
        gpu.swiglu(&mut b.gate.slice_mut(..k * f), &b.up.slice(..k * f), k * f)?;
        gpu.matvec_experts(
            &ex.table(2),
            dt,
            dr,
            dc,
            &ids,
            &b.gate.slice(..k * f),
            f,
            &mut b.y.slice_mut(..k * h),
        )?;
        gpu.moe_combine(&mut b.x.slice_mut(..h), &b.y.slice(..k * h), &b.route_weights.slice(..k), k, h)
    }

    /// Copies experts `ids` of layer `l` into cache slots where they are not resident and points the
    /// layer's device table at them.
    fn fetch_into_table(&mut self, l: usize, ids: &[usize]) -> Result<()> {
        let missing: Vec<usize> =
            ids.iter().copied().filter(|&e| self.layers[l].experts.resident[e].is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let cache = self.cache.as_mut().context("experts outside VRAM but no expert cache")?;
        let slots = cache.fetch(&self.gpu, l, &missing, &self.host.layers[l].experts)?;
        let ex = &mut self.layers[l].experts;
        let n = ex.n();
        for (&e, &slot) in missing.iter().zip(&slots) {
            let base = cache.slot(slot).address();
            for kind in 0..3 {
                ex.host_table[kind * n + e] = base + ex.layouts[e].offsets[kind] as u64;
            }
        }
        self.gpu.copy_htod(&ex.host_table, &mut ex.table.view_mut())?;
        Ok(())
    }

    /// A batch: tokens grouped by expert on the host, then per used expert the three products over its
    /// tokens only and a weighted scatter back into `x`.
    fn moe_prompt(&mut self, l: usize, n: usize) -> Result<()> {
        let cfg = &self.cfg;
        let (h, k, f) = (cfg.hidden_size, cfg.n_experts_used, cfg.ffn_size);
        let ids = self.gpu.download(&self.buf.ids.slice(..n * k))?;
        let weights = self.gpu.download(&self.buf.route_weights.slice(..n * k))?;
        // groups[e] = (offset into the gather list, number of tokens).
        let mut gather = Vec::with_capacity(n * k);
        let mut gather_weights = Vec::with_capacity(n * k);
        let mut groups = Vec::new();
        for e in 0..cfg.n_experts {
            let start = gather.len();
            for (i, (&id, &w)) in ids.iter().zip(&weights).enumerate() {
                if id as usize == e {
                    gather.push((i / k) as i32);
                    gather_weights.push(w);
                }
            }
            if gather.len() > start {
                groups.push((e, start, gather.len() - start));
            }
        }
        ensure!(gather.len() == n * k, "router produced an expert id out of range");
        self.gpu.copy_htod(&gather, &mut self.buf.gather.slice_mut(..n * k))?;
        self.gpu.copy_htod(&gather_weights, &mut self.buf.gather_weights.slice_mut(..n * k))?;
        for (e, start, m) in groups {
            let slot = match self.layers[l].experts.resident[e] {
                Some(_) => None,
                None => {
                    let cache = self.cache.as_mut().context("experts outside VRAM but no expert cache")?;
                    Some(cache.fetch(&self.gpu, l, &[e], &self.host.layers[l].experts)?[0])
                }
            };
            let ex = &self.layers[l].experts;
            let buf = match (slot, &ex.resident[e]) {
                (Some(s), _) => self.cache.as_ref().map(|c| c.slot(s)),
                (None, r) => r.as_ref(),
            };
            let buf = buf.context("expert buffer missing")?;
            let (gpu, b) = (&self.gpu, &mut self.buf);
            let tokens = b.gather.slice(start..start + m);
            let xn = b.xn.slice(..n * h);
            gpu.matmul(&ex.matrix(buf, e, 0), &xn, Some(&tokens), m, &mut b.gate.slice_mut(..m * f))?;
            gpu.matmul(&ex.matrix(buf, e, 1), &xn, Some(&tokens), m, &mut b.up.slice_mut(..m * f))?;
            gpu.swiglu(&mut b.gate.slice_mut(..m * f), &b.up.slice(..m * f), m * f)?;
            gpu.matmul(&ex.matrix(buf, e, 2), &b.gate.slice(..m * f), None, m, &mut b.y.slice_mut(..m * h))?;
            gpu.scatter_add(
                &mut b.x.slice_mut(..n * h),
                &b.y.slice(..m * h),
                &tokens,
                &b.gather_weights.slice(start..start + m),
                m,
                h,
            )?;
        }
        Ok(())
    }
}

/// `y = x W^T` for `n` rows: the matrix-vector kernel for one token, the tensor-core kernel otherwise.
fn product(gpu: &Gpu, w: &WeightView, x: &BufView<f32>, n: usize, y: &mut BufViewMut<f32>) -> Result<()> {
    if n == 1 {
        gpu.matvec(w, x, y)
    } else {
        gpu.matmul(w, x, None, n, y)
    }
}

impl Engine for CudaEngine<'_> {
    /// While tracing, each layer waits for the device to read the router's choices.
    fn set_router_trace(&mut self, on: bool) -> Result<()> {
        self.router_trace = on.then(Vec::new);
        Ok(())
    }

    fn take_router_trace(&mut self) -> Vec<RouterTrace> {
        self.router_trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {bad} is outside the vocabulary of {} tokens", self.cfg.vocab_size);
        }
        let start = self.pos;
        ensure!(
            start + tokens.len() <= self.ctx,
            "{} new tokens after {start} do not fit in the context of {} tokens",
            tokens.len(),
            self.ctx
        );
        let mut logits = Vec::new();
        self.current_trace = vec![Vec::new(); self.cfg.n_layers];
        let n_batches = tokens.len().div_ceil(MAX_BATCH);
        for (i, batch) in tokens.chunks(MAX_BATCH).enumerate() {
            let want = match (all_logits, i + 1 == n_batches) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            match self.run(batch, want) {
                Ok(batch_logits) => {
                    logits.extend(batch_logits);
                    self.pos += batch.len();
                }
                Err(e) => {
                    self.pos = start;
                    return Err(e);
                }
            }
        }
        if let Some(traces) = &mut self.router_trace {
            traces.push(std::mem::take(&mut self.current_trace));
        }
        Ok(logits)
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn context_size(&self) -> usize {
        self.ctx
    }

    fn truncate(&mut self, n: usize) {
        self.pos = self.pos.min(n);
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn stats_line(&self) -> Option<String> {
        let experts =
            format!("{}/{} experts in VRAM", self.plan.resident_experts(), self.plan.total_experts());
        Some(match &self.cache {
            Some(c) => format!("cuda: {}, {experts}, {}", self.gpu.info, c.stats()),
            None => format!("cuda: {}, {experts}", self.gpu.info),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<CudaEngine<'static>>();
    }

    #[test]
    fn buffer_bytes_at_mixtral_size() {
        let cfg = ModelConfig::mixtral_8x7b(32);
        let mib = BufferSizes::new(&cfg, MAX_BATCH).bytes(&cfg) as f64 / (1 << 20) as f64;
        // Dominated by the logits of 512 tokens (62.5 MiB) and two [512, 14336] expert buffers (56 MiB).
        assert!(mib > 150.0 && mib < 250.0, "{mib} MiB");
        let one = BufferSizes::new(&cfg, 1).bytes(&cfg);
        assert!(one < 8 << 20, "{one}");
    }
}
