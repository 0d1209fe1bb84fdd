//! [`CudaBackend`]: the transformer's ops on a CUDA device (or the tests' emulator of one). Tensors
//! are f32 device buffers from a [`Pool`], weights are uploaded at load as the placement plan decides,
//! the KV cache is f16.
//!
//! Where it differs from the default compositions of the ops:
//! - `matmul` picks the matrix-vector kernel for one row and the tensor-core kernel for more.
//! - Routes of one token stay on the device: its k experts run in one launch per matrix
//!   (`matvec_experts` reads the ids and an address table on the device), so decode with every
//!   expert resident never waits on the host inside a layer.
//! - Routes of a batch are read back once per layer and grouped by expert: per expert, the products
//!   read only its tokens' rows (a gather list), and each expert's weights are read once per batch.
//! - `moe` runs each expert the plan left in host memory where the cost model ([`Misses`]) says:
//!   on the host (the CPU backend's kernels on the mapped weights; the token rows go down, the sum
//!   comes back) while the GPU's resident experts run, or copied into a VRAM slot ([`ExpertCache`]);
//!   a batch with missing experts runs expert by expert, because a batch may use more experts than
//!   there are slots. `moe_lookahead` starts a decode step's copies one layer early.

use std::ops::Range;

use anyhow::{bail, ensure, Context, Result};

use super::device::{BufView, BufViewMut, DeviceBuffer};
use super::expert_cache::ExpertCache;
use super::ops::{AttentionArgs, AttentionScratch, Gpu, WeightView, ATT_MAX_SPLITS};
use super::pool::{Pool, Pooled};
use super::{CudaOptions, DeviceInfo};
use crate::engine::cpu::{CpuBackend, CpuTensor, Routes};
use crate::engine::hybrid::{ExpertCosts, MissChoice, Misses};
use crate::engine::transformer::backend::default_moe;
use crate::engine::transformer::{
    self, Backend, ExpertInput, ExpertMatrix, Ffn, Layer, Prepare, Route, Transformer, Weights,
    DEFAULT_MAX_BATCH,
};
use crate::engine::ExpertStats;
use crate::format::GgmlType;
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix, Model};
use crate::model::ModelConfig;
use crate::placement::{self, ExpertLayout, ModelSizes, Plan};

/// The CUDA engine: the transformer on the CUDA backend.
pub type CudaEngine<'a> = Transformer<CudaBackend<'a>>;

impl<'a> CudaEngine<'a> {
    /// Uploads `model` to GPU `opts.device` as the placement plan for `opts.vram_budget` decides
    /// (print [`CudaEngine::plan`] to show it), with an f16 KV cache of `ctx` tokens.
    pub fn new(model: &'a Model, ctx: usize, opts: &CudaOptions) -> Result<CudaEngine<'a>> {
        Self::placed(Gpu::new(opts.device)?, model, ctx, opts)
    }

    /// The engine on `gpu` (any [`super::Device`]: a GPU, or the tests' emulator); `vram_budget` and
    /// `misses` as in [`CudaOptions`].
    pub fn on(
        gpu: Gpu,
        model: &'a Model,
        ctx: usize,
        vram_budget: Option<u64>,
        misses: MissChoice,
    ) -> Result<CudaEngine<'a>> {
        Self::placed(gpu, model, ctx, &CudaOptions { vram_budget, misses, ..Default::default() })
    }

    fn placed(gpu: Gpu, model: &'a Model, ctx: usize, opts: &CudaOptions) -> Result<CudaEngine<'a>> {
        let cfg = &model.config;
        transformer::check_context(cfg, ctx)?;
        let host = model.weights()?;
        let mut backend = CudaBackend::new(gpu, &host, cfg, ctx, opts)?;
        let weights = Weights::prepare(&mut backend, &host, cfg)?;
        let engine = Transformer::with_weights(backend, weights, cfg.clone(), ctx)?;
        engine.backend().gpu.sync()?;
        Ok(engine)
    }

    pub fn plan(&self) -> &Plan {
        &self.backend().plan
    }

    /// Where missing experts run, with the cost model's figures when it decides.
    pub fn misses(&self) -> &Misses {
        &self.backend().misses
    }

    pub fn device(&self) -> &DeviceInfo {
        &self.backend().gpu.info
    }
}

/// Device memory of the activations of a batch of `batch` tokens (the plan's "buffers"): the
/// residual stream and its norm, q/k/v and attention output, router logits, the expert products of
/// every (token, expert) pair, the logits, the attention scratch. An estimate of the pool's peak.
pub fn activation_bytes(cfg: &ModelConfig, batch: usize) -> u64 {
    let (b, pairs) = (batch, batch.max(1) * cfg.n_experts_used);
    let per_token =
        4 * cfg.hidden_size + 2 * cfg.q_dim() + 2 * cfg.kv_dim() + cfg.n_experts + 1 + cfg.vocab_size;
    let per_pair = 2 * cfg.ffn_size + cfg.hidden_size + 4;
    4 * (b * per_token + pairs * per_pair) as u64
        + AttentionScratch::bytes(b.max(ATT_MAX_SPLITS), cfg.n_heads, cfg.head_dim)
}

/// Activations `[rows, width]` on the device.
pub struct CudaTensor {
    buf: Pooled<f32>,
    rows: usize,
    width: usize,
}

impl CudaTensor {
    fn view(&self) -> BufView<'_, f32> {
        self.buf.view()
    }

    fn view_mut(&mut self) -> BufViewMut<'_, f32> {
        self.buf.view_mut()
    }

    fn values(&self) -> usize {
        self.rows * self.width
    }
}

/// A weight matrix uploaded to VRAM.
pub struct CudaMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    buf: DeviceBuffer<u8>,
}

impl CudaMatrix {
    fn view(&self) -> WeightView<'_> {
        WeightView { ty: self.ty, rows: self.rows, cols: self.cols, data: self.buf.slice(..) }
    }
}

/// Type and shape of the gate, up and down matrices (the order of [`ExpertMatrix`]), shared by all
/// experts of a layer.
#[derive(Clone, Copy, PartialEq)]
struct ExpertShape {
    kinds: [(GgmlType, usize, usize); 3],
}

impl ExpertShape {
    fn of(e: &ExpertWeights) -> ExpertShape {
        ExpertShape { kinds: [e.gate, e.up, e.down].map(|m| (m.ty, m.rows, m.cols)) }
    }
}

fn kind(m: ExpertMatrix) -> usize {
    match m {
        ExpertMatrix::Gate => 0,
        ExpertMatrix::Up => 1,
        ExpertMatrix::Down => 2,
    }
}

/// The experts of one layer: the resident ones' buffers, and the host weights of all of them (the
/// source of copies into cache slots).
pub struct CudaExperts<'w> {
    layer: usize,
    shape: ExpertShape,
    layouts: Vec<ExpertLayout>,
    resident: Vec<Option<DeviceBuffer<u8>>>,
    host: Vec<ExpertWeights<'w>>,
}

impl CudaExperts<'_> {
    fn all_resident(&self) -> bool {
        self.resident.iter().all(Option::is_some)
    }

    /// Matrix `k` of expert `e`, whose bytes are in `buf` (its resident buffer or a cache slot).
    fn matrix<'b>(&self, buf: &'b DeviceBuffer<u8>, e: usize, k: usize) -> WeightView<'b> {
        let (ty, rows, cols) = self.shape.kinds[k];
        let off = self.layouts[e].offsets[k];
        let len = rows * ty.bytes_for(cols).unwrap_or(0);
        WeightView { ty, rows, cols, data: buf.slice(off..off + len) }
    }
}

/// A device table of a layer's expert matrix addresses (`[gate, up, down][expert]`) that the
/// one-token expert kernels index with the router's ids; entries of experts in cache slots change as
/// slots are reused.
struct ExpertTable {
    host: Vec<u64>,
    device: DeviceBuffer<u64>,
}

impl ExpertTable {
    fn view(&self, k: usize) -> BufView<'_, u64> {
        let n = self.host.len() / 3;
        self.device.slice(k * n..(k + 1) * n)
    }
}

/// The router's choice for a batch of `tokens` tokens: ids and weights `[tokens, k]` on the device;
/// for more than one token also grouped by expert (then the "pair order" of the expert ops is expert
/// by expert, tokens ascending; for one token, its k choices in order).
pub struct CudaRoutes {
    tokens: usize,
    k: usize,
    ids: Pooled<i32>,
    weights: Pooled<f32>,
    grouped: Option<Grouped>,
}

struct Grouped {
    /// The routes as read back, grouped as the CPU backend groups them.
    host: Routes,
    /// Per pair (in the host's pair order): its token and weight.
    pair_tokens: Pooled<i32>,
    pair_weights: Pooled<f32>,
}

/// The keys and values of every layer, f16.
pub struct CudaKvCache {
    layers: Vec<(DeviceBuffer<u16>, DeviceBuffer<u16>)>,
}

/// The ops on one device for one model.
pub struct CudaBackend<'w> {
    gpu: Gpu,
    cfg: ModelConfig,
    plan: Plan,
    ctx: usize,
    pool: Pool,
    inv_freq: DeviceBuffer<f64>,
    attention: AttentionScratch,
    /// (token, chunk) pairs per head that `attention` has room for.
    attention_splits: usize,
    /// Per layer, filled as [`Prepare::experts`] uploads them.
    tables: Vec<ExpertTable>,
    cache: Option<ExpertCache>,
    /// The layer whose missing experts the last fetch copied into slots, with (expert, slot) each.
    fetched: Option<(usize, Vec<(usize, usize)>)>,
    /// Where missing experts run; the host's ops for those that run there.
    misses: Misses,
    cpu: CpuBackend<'w>,
    stats: ExpertStats,
    /// The layer the last lookahead predicted, with the experts it predicted.
    predicted: Option<(usize, Vec<usize>)>,
    _weights: std::marker::PhantomData<ExpertWeights<'w>>,
}

impl<'w> CudaBackend<'w> {
    /// The backend on `gpu` for a model with weights `host` and a KV cache of `ctx` tokens: plans what
    /// lives in VRAM for `opts.vram_budget` (default: free VRAM minus a reserve) and `opts.gpu_layers`
    /// (`-ngl`), allocates the expert slots and, when some experts stay in host memory, measures what
    /// a miss costs on the host and over the bus (for `opts.misses`). The weights are uploaded by
    /// [`Prepare`].
    pub fn new(
        gpu: Gpu,
        host: &crate::model::weights::ModelWeights<'w>,
        cfg: &ModelConfig,
        ctx: usize,
        opts: &CudaOptions,
    ) -> Result<CudaBackend<'w>> {
        let scratch = activation_bytes(cfg, DEFAULT_MAX_BATCH);
        let sizes = ModelSizes::of(host, cfg, ctx, scratch);
        let budget = opts.vram_budget.unwrap_or_else(|| placement::default_budget(gpu.info.free_bytes));
        let plan = Plan::with_priority(&sizes, budget, opts.gpu_layers, opts.hot_experts.as_deref())?;
        let inv_freq: Vec<f64> = (0..cfg.head_dim / 2)
            .map(|i| (cfg.rope_theta as f64).powf(-2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        let device = gpu.info.name.clone();
        let mut cache = match plan.n_slots {
            0 => None,
            n => Some(ExpertCache::new(&gpu, n, plan.slot_bytes as usize, cfg.n_experts_used)?),
        };
        let misses = match (opts.misses, &mut cache) {
            (MissChoice::Copy, _) | (MissChoice::Auto, None) => Misses::Copy,
            (MissChoice::Host, _) => Misses::Host,
            (MissChoice::Auto, Some(cache)) => {
                let copy = cache.measure_copy(&gpu).context("timing a copy of an expert to the GPU")?;
                let expert = host.layers.iter().flat_map(|l| l.experts.first()).next();
                let expert = expert.context("a model with expert slots but no experts")?;
                let (ty, rows, cols) = (expert.gate.ty, expert.gate.rows, expert.gate.cols);
                let read =
                    cache.measure_read(&gpu, ty, rows, cols).context("timing an expert kernel on the GPU")?;
                let costs = ExpertCosts::measure(cfg, expert, copy)?;
                Misses::Cost(ExpertCosts { device_read_bytes_per_s: Some(read), ..costs })
            }
        };
        let attention_splits = ATT_MAX_SPLITS;
        Ok(CudaBackend {
            pool: Pool::new(gpu.device().clone(), scratch),
            inv_freq: gpu.upload(&inv_freq).with_context(|| format!("uploading RoPE's table to {device}"))?,
            attention: AttentionScratch::new(&gpu, attention_splits, cfg.n_heads, cfg.head_dim)
                .with_context(|| format!("allocating the attention scratch on {device}"))?,
            attention_splits,
            tables: Vec::new(),
            cache,
            fetched: None,
            misses,
            cpu: CpuBackend::new(cfg),
            stats: ExpertStats::default(),
            predicted: None,
            cfg: cfg.clone(),
            plan,
            ctx,
            gpu,
            _weights: Default::default(),
        })
    }

    fn tensor(&self, rows: usize, width: usize) -> Result<CudaTensor> {
        Ok(CudaTensor { buf: self.pool.take(rows * width)?, rows, width })
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<CudaTensor> {
        Ok(CudaTensor { buf: self.pool.zeros(rows * width)?, rows, width })
    }

    fn upload_matrix(&self, m: &Matrix) -> Result<CudaMatrix> {
        let buf = self.gpu.upload(m.data).with_context(|| {
            format!(
                "uploading a {}x{} {} matrix ({} bytes) to {}",
                m.rows,
                m.cols,
                m.ty,
                m.data.len(),
                self.gpu.info.name
            )
        })?;
        Ok(CudaMatrix { ty: m.ty, rows: m.rows, cols: m.cols, buf })
    }

    /// Copies those of experts `ids` that are not resident into cache slots and points the layer's
    /// table at them; they stay usable until the next fetch. A `prefetch` (the lookahead's) leaves
    /// the compute stream free until the next fetch.
    fn fetch(&mut self, experts: &CudaExperts<'w>, ids: &[usize]) -> Result<()> {
        self.fetch_with(experts, ids, false)
    }

    fn fetch_with(&mut self, experts: &CudaExperts<'w>, ids: &[usize], prefetch: bool) -> Result<()> {
        let l = experts.layer;
        let missing: Vec<usize> = ids.iter().copied().filter(|&e| experts.resident[e].is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let cache = self.cache.as_mut().context("experts outside VRAM but no expert cache")?;
        let before = cache.copies();
        let slots = cache.fetch(&self.gpu, l, &missing, &experts.host, prefetch)?;
        let after = cache.copies();
        self.stats.copies += after.0 - before.0;
        self.stats.bytes_copied += after.1 - before.1;
        let table = &mut self.tables[l];
        let n = experts.resident.len();
        for (&e, &slot) in missing.iter().zip(&slots) {
            let base = cache.slot(slot).address();
            for k in 0..3 {
                table.host[k * n + e] = base + experts.layouts[e].offsets[k] as u64;
            }
        }
        self.gpu.copy_htod(&table.host, &mut table.device.view_mut())?;
        self.fetched = Some((l, missing.into_iter().zip(slots).collect()));
        Ok(())
    }

    /// The buffer holding expert `e`: its own, or the slot the last fetch copied it into.
    fn expert_buffer<'b>(&'b self, experts: &'b CudaExperts, e: usize) -> Result<&'b DeviceBuffer<u8>> {
        if let Some(buf) = &experts.resident[e] {
            return Ok(buf);
        }
        let slot = match &self.fetched {
            Some((l, slots)) if *l == experts.layer => slots.iter().find(|(x, _)| *x == e).map(|s| s.1),
            _ => None,
        };
        match (slot, &self.cache) {
            (Some(slot), Some(cache)) => Ok(cache.slot(slot)),
            _ => bail!("expert {e} of layer {} is not in VRAM (fetch it first)", experts.layer),
        }
    }

    /// The expert products of one group of pairs (expert `e`, pairs `first .. first + m`) into the
    /// pair rows of `out`.
    #[allow(clippy::too_many_arguments)]
    fn group_product(
        &self,
        experts: &CudaExperts,
        which: ExpertMatrix,
        x: &CudaTensor,
        input: ExpertInput,
        grouped: &Grouped,
        (e, pairs): (usize, &Range<usize>),
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (first, m) = (pairs.start, pairs.len());
        let buf = self.expert_buffer(experts, e)?;
        let w = experts.matrix(buf, e, kind(which));
        let width = out.width;
        let mut y = out.view_mut();
        let mut y = y.slice_mut(first * width..(first + m) * width);
        match input {
            ExpertInput::Tokens => {
                let tokens = grouped.pair_tokens.view().slice(first..first + m);
                self.gpu.matmul(&w, &x.view(), Some(&tokens), m, &mut y)
            }
            ExpertInput::Pairs => {
                let rows = x.view().slice(first * x.width..(first + m) * x.width);
                self.product(&w, &rows, m, &mut y)
            }
        }
    }

    /// Routes `ids` / `weights` (`[tokens, k]` on the device) read back and grouped by expert, as the
    /// CPU backend groups them (so both backends share one pair order).
    fn routes_on_host(
        &self,
        ids: &Pooled<i32>,
        weights: &Pooled<f32>,
        k: usize,
        n_experts: usize,
    ) -> Result<Routes> {
        let host_ids = self.gpu.download(&ids.view())?;
        let host_weights = self.gpu.download(&weights.view())?;
        let per_token: Vec<Route> = host_ids
            .chunks_exact(k)
            .zip(host_weights.chunks_exact(k))
            .map(|(i, w)| i.iter().map(|&e| e as usize).zip(w.iter().copied()).collect())
            .collect();
        ensure!(
            per_token.iter().flatten().all(|&(e, _)| e < n_experts),
            "the router produced an expert id out of range"
        );
        Ok(Routes::new(per_token, n_experts))
    }

    /// Host routes with each pair's token and weight uploaded (what the grouped kernels read).
    fn grouped(&self, host: Routes) -> Result<Grouped> {
        let tokens: Vec<i32> = host.pairs().iter().map(|&(t, _)| t as i32).collect();
        let pair_weights: Vec<f32> = host.pairs().iter().map(|&(_, w)| w).collect();
        let mut pair_tokens = self.pool.take::<i32>(tokens.len())?;
        self.gpu.copy_htod(&tokens, &mut pair_tokens.view_mut())?;
        let mut dev_weights = self.pool.take::<f32>(pair_weights.len())?;
        self.gpu.copy_htod(&pair_weights, &mut dev_weights.view_mut())?;
        Ok(Grouped { host, pair_tokens, pair_weights: dev_weights })
    }

    /// The experts of `g` that `on_device` keeps, expert by expert (each fetched into a slot when not
    /// resident: a batch may use more experts than there are slots), scatter-added into `out`.
    fn moe_on_device(
        &mut self,
        experts: &CudaExperts<'w>,
        x: &CudaTensor,
        g: &Grouped,
        on_device: impl Fn(usize) -> bool,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (h, f) = (self.cfg.hidden_size, experts.shape.kinds[0].1);
        for (e, pairs) in g.host.groups() {
            let (e, first, m) = (*e, pairs.start, pairs.len());
            if !on_device(e) {
                continue;
            }
            self.fetch(experts, &[e])?;
            self.stats.device += 1;
            let buf = self.expert_buffer(experts, e)?;
            let tokens = g.pair_tokens.view().slice(first..first + m);
            let (mut gate, mut up, mut y) = (self.tensor(m, f)?, self.tensor(m, f)?, self.tensor(m, h)?);
            let gpu = &self.gpu;
            if g.host.n_tokens() == 1 {
                // Decode: the matrix-vector kernel on the token's row.
                let t = g.host.pairs()[first].0;
                let row = x.view().slice(t * h..(t + 1) * h);
                gpu.matvec(&experts.matrix(buf, e, 0), &row, &mut gate.view_mut())?;
                gpu.matvec(&experts.matrix(buf, e, 1), &row, &mut up.view_mut())?;
            } else {
                gpu.matmul(&experts.matrix(buf, e, 0), &x.view(), Some(&tokens), m, &mut gate.view_mut())?;
                gpu.matmul(&experts.matrix(buf, e, 1), &x.view(), Some(&tokens), m, &mut up.view_mut())?;
            }
            gpu.swiglu(&mut gate.view_mut(), &up.view(), m * f)?;
            self.product(&experts.matrix(buf, e, 2), &gate.view(), m, &mut y.view_mut())?;
            let weights = g.pair_weights.view().slice(first..first + m);
            self.gpu.scatter_add(&mut out.view_mut(), &y.view(), &tokens, &weights, m, h)?;
        }
        Ok(())
    }

    /// `y = x W^T` for `n` rows: the matrix-vector kernel for one row, the tensor-core kernel otherwise.
    fn product(&self, w: &WeightView, x: &BufView<f32>, n: usize, y: &mut BufViewMut<f32>) -> Result<()> {
        if n == 1 {
            self.gpu.matvec(w, x, y)
        } else {
            self.gpu.matmul(w, x, None, n, y)
        }
    }
}

impl<'w> Prepare<'w> for CudaBackend<'w> {
    fn matrix(&mut self, m: &Matrix<'w>) -> Result<CudaMatrix> {
        self.upload_matrix(m)
    }

    fn vector(&mut self, v: &[f32]) -> Result<DeviceBuffer<f32>> {
        self.gpu.upload(v).with_context(|| format!("uploading {} values to {}", v.len(), self.gpu.info.name))
    }

    fn experts(&mut self, layer: usize, experts: &[ExpertWeights<'w>]) -> Result<CudaExperts<'w>> {
        ensure!(layer == self.tables.len(), "layer {layer}'s experts prepared out of order");
        let first = experts.first().context("a layer without experts")?;
        let shape = ExpertShape::of(first);
        ensure!(
            experts.iter().all(|e| ExpertShape::of(e) == shape),
            "the experts of layer {layer} differ in type or shape; the CUDA backend needs them alike"
        );
        let n = experts.len();
        let resident = self.plan.resident.get(layer).context("a layer the plan does not know")?;
        let layouts: Vec<ExpertLayout> = experts.iter().map(ExpertLayout::of).collect();
        let mut table = vec![0u64; 3 * n];
        let mut bufs = Vec::with_capacity(n);
        for (e, (expert, layout)) in experts.iter().zip(&layouts).enumerate() {
            if !resident[e] {
                bufs.push(None);
                continue;
            }
            let mut buf = self.gpu.alloc_zeros::<u8>(layout.bytes).with_context(|| {
                format!("allocating expert {e} of layer {layer} ({} bytes)", layout.bytes)
            })?;
            for (m, off) in [expert.gate, expert.up, expert.down].iter().zip(layout.offsets) {
                self.gpu.copy_htod(m.data, &mut buf.slice_mut(off..off + m.data.len()))?;
            }
            for (k, off) in layout.offsets.iter().enumerate() {
                table[k * n + e] = buf.address() + *off as u64;
            }
            bufs.push(Some(buf));
        }
        let device = self.gpu.upload(&table)?;
        self.tables.push(ExpertTable { host: table, device });
        Ok(CudaExperts { layer, shape, layouts, resident: bufs, host: experts.to_vec() })
    }
}

impl<'w> Backend for CudaBackend<'w> {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type Vector = DeviceBuffer<f32>;
    type Experts = CudaExperts<'w>;
    type Routes = CudaRoutes;
    type KvCache = CudaKvCache;

    fn kv_cache(&mut self, capacity: usize) -> Result<CudaKvCache> {
        ensure!(capacity <= self.ctx, "a KV cache of {capacity} tokens; the plan has room for {}", self.ctx);
        let len = capacity * self.cfg.kv_dim();
        let layers = (0..self.cfg.n_layers)
            .map(|l| {
                let alloc = || {
                    self.gpu.alloc_zeros::<u16>(len).with_context(|| {
                        format!(
                            "allocating the KV cache of layer {l} ({} bytes) on {}",
                            2 * 2 * len,
                            self.gpu.info.name
                        )
                    })
                };
                Ok((alloc()?, alloc()?))
            })
            .collect::<Result<_>>()?;
        Ok(CudaKvCache { layers })
    }

    fn embed(&mut self, table: &CudaMatrix, tokens: &[u32]) -> Result<CudaTensor> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let mut dev_ids = self.pool.take::<i32>(ids.len())?;
        self.gpu.copy_htod(&ids, &mut dev_ids.view_mut())?;
        let mut x = self.tensor(tokens.len(), table.cols)?;
        self.gpu.embed(&table.view(), &dev_ids.view(), tokens.len(), &mut x.view_mut())?;
        Ok(x)
    }

    fn rows(&mut self, x: &CudaTensor, first: usize, count: usize) -> Result<CudaTensor> {
        ensure!(first + count <= x.rows, "rows {first}..{} of a {}-row tensor", first + count, x.rows);
        // No device-to-device copy in the device layer: zeros plus the rows.
        let mut out = self.zeros(count, x.width)?;
        let rows = x.view().slice(first * x.width..(first + count) * x.width);
        self.gpu.add(&mut out.view_mut(), &rows, count * x.width)?;
        Ok(out)
    }

    fn to_host(&mut self, x: CudaTensor) -> Result<Vec<f32>> {
        self.gpu.download(&x.view())
    }

    fn rms_norm(&mut self, x: &CudaTensor, w: &DeviceBuffer<f32>) -> Result<CudaTensor> {
        ensure!(x.width == w.len(), "RMSNorm of {}-wide rows with {} weights", x.width, w.len());
        let mut y = self.tensor(x.rows, x.width)?;
        self.gpu.rms_norm(&x.view(), &w.view(), self.cfg.rms_norm_eps, x.rows, &mut y.view_mut())?;
        Ok(y)
    }

    fn add(&mut self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        ensure!(x.values() == y.values(), "adding {} values to {}", y.values(), x.values());
        let n = x.values();
        self.gpu.add(&mut x.view_mut(), &y.view(), n)
    }

    fn swiglu(&mut self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<()> {
        ensure!(
            gate.values() == up.values(),
            "SwiGLU of {} gate and {} up values",
            gate.values(),
            up.values()
        );
        let n = gate.values();
        self.gpu.swiglu(&mut gate.view_mut(), &up.view(), n)
    }

    fn matmul(&mut self, w: &CudaMatrix, x: &CudaTensor) -> Result<CudaTensor> {
        ensure!(x.width == w.cols, "a {}x{} matrix times {}-wide rows", w.rows, w.cols, x.width);
        let mut y = self.tensor(x.rows, w.rows)?;
        self.product(&w.view(), &x.view(), x.rows, &mut y.view_mut())?;
        Ok(y)
    }

    fn rope(&mut self, x: &mut CudaTensor, start: usize) -> Result<()> {
        let (rows, width) = (x.rows, x.width);
        self.gpu.rope(&mut x.view_mut(), rows, width, self.cfg.head_dim, start, &self.inv_freq.view())
    }

    fn kv_append(
        &mut self,
        cache: &mut CudaKvCache,
        layer: usize,
        start: usize,
        k: &CudaTensor,
        v: &CudaTensor,
    ) -> Result<()> {
        let (kc, vc) = cache.layers.get_mut(layer).context("a layer outside the KV cache")?;
        let kv_dim = self.cfg.kv_dim();
        self.gpu.kv_store(&k.view(), &v.view(), &mut kc.view_mut(), &mut vc.view_mut(), k.rows, kv_dim, start)
    }

    fn kv_truncate(&mut self, _cache: &mut CudaKvCache, _len: usize) {
        // Positions past the length are never read, and overwritten by the next append.
    }

    fn attention(
        &mut self,
        cache: &CudaKvCache,
        layer: usize,
        start: usize,
        q: &CudaTensor,
    ) -> Result<CudaTensor> {
        let cfg = &self.cfg;
        let args = AttentionArgs {
            n: q.rows,
            pos0: start,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        // A batch longer than the scratch was made for (`set_max_batch`): one (token, chunk) pair each.
        if q.rows > self.attention_splits {
            self.attention = AttentionScratch::new(&self.gpu, q.rows, cfg.n_heads, cfg.head_dim)?;
            self.attention_splits = q.rows;
        }
        let (kc, vc) = cache.layers.get(layer).context("a layer outside the KV cache")?;
        let mut out = self.tensor(q.rows, self.cfg.q_dim())?;
        self.gpu.attention(
            &args,
            &q.view(),
            &kc.view(),
            &vc.view(),
            &mut self.attention,
            &mut out.view_mut(),
        )?;
        Ok(out)
    }

    fn route(&mut self, logits: &CudaTensor, top_k: usize, gating: Gating) -> Result<CudaRoutes> {
        ensure!(gating == Gating::MIXTRAL, "the CUDA router kernel renormalizes the top-k weights (Mixtral)");
        let (n, n_experts) = (logits.rows, logits.width);
        let mut ids = self.pool.take::<i32>(n * top_k)?;
        let mut weights = self.pool.take::<f32>(n * top_k)?;
        self.gpu.route_top_k(
            &logits.view(),
            n,
            n_experts,
            top_k,
            &mut ids.view_mut(),
            &mut weights.view_mut(),
        )?;
        let grouped = match n {
            1 => None,
            _ => Some(self.grouped(self.routes_on_host(&ids, &weights, top_k, n_experts)?)?),
        };
        Ok(CudaRoutes { tokens: n, k: top_k, ids, weights, grouped })
    }

    fn routes_to_host(&mut self, routes: &CudaRoutes) -> Result<Vec<Route>> {
        if let Some(g) = &routes.grouped {
            return Ok(g.host.per_token().to_vec());
        }
        let ids = self.gpu.download(&routes.ids.view())?;
        let weights = self.gpu.download(&routes.weights.view())?;
        Ok(vec![ids.iter().map(|&e| e as usize).zip(weights).collect()])
    }

    fn routes_from_host(&mut self, per_token: &[Route]) -> Result<CudaRoutes> {
        let k = per_token.first().map_or(0, Vec::len);
        ensure!(per_token.iter().all(|r| r.len() == k), "replayed routes of different lengths");
        let ids: Vec<i32> = per_token.iter().flatten().map(|&(e, _)| e as i32).collect();
        let weights: Vec<f32> = per_token.iter().flatten().map(|&(_, w)| w).collect();
        let (mut dev_ids, mut dev_weights) =
            (self.pool.take::<i32>(ids.len())?, self.pool.take::<f32>(ids.len())?);
        self.gpu.copy_htod(&ids, &mut dev_ids.view_mut())?;
        self.gpu.copy_htod(&weights, &mut dev_weights.view_mut())?;
        let grouped = match per_token.len() {
            1 => None,
            _ => Some(self.grouped(Routes::new(per_token.to_vec(), self.cfg.n_experts))?),
        };
        Ok(CudaRoutes { tokens: per_token.len(), k, ids: dev_ids, weights: dev_weights, grouped })
    }

    fn expert_matmul<const N: usize>(
        &mut self,
        experts: &CudaExperts<'w>,
        which: [ExpertMatrix; N],
        x: &CudaTensor,
        input: ExpertInput,
        routes: &CudaRoutes,
    ) -> Result<[CudaTensor; N]> {
        let pairs = routes.tokens * routes.k;
        let mut outs = Vec::with_capacity(N);
        for w in which {
            let (ty, rows, cols) = experts.shape.kinds[kind(w)];
            ensure!(x.width == cols, "expert {w:?} matrices of {cols} columns times {}-wide rows", x.width);
            let mut out = self.tensor(pairs, rows)?;
            match &routes.grouped {
                None => {
                    let fetched = matches!(&self.fetched, Some((l, _)) if *l == experts.layer);
                    ensure!(
                        experts.all_resident() || fetched,
                        "the experts of layer {} are not all in VRAM (fetch them first)",
                        experts.layer
                    );
                    let stride = if input == ExpertInput::Pairs { x.width } else { 0 };
                    let table = self.tables[experts.layer].view(kind(w));
                    self.gpu.matvec_experts(
                        &table,
                        ty,
                        rows,
                        cols,
                        &routes.ids.view(),
                        &x.view(),
                        stride,
                        &mut out.view_mut(),
                    )?;
                }
                Some(g) => {
                    for (e, pairs) in g.host.groups() {
                        self.group_product(experts, w, x, input, g, (*e, pairs), &mut out)?;
                    }
                }
            }
            outs.push(out);
        }
        Ok(outs.try_into().unwrap_or_else(|_| unreachable!("N products")))
    }

    fn weighted_sum(&mut self, y: &CudaTensor, routes: &CudaRoutes) -> Result<CudaTensor> {
        let width = y.width;
        let mut out = self.zeros(routes.tokens, width)?;
        match &routes.grouped {
            None => self.gpu.moe_combine(
                &mut out.view_mut(),
                &y.view(),
                &routes.weights.view(),
                routes.k,
                width,
            )?,
            // One launch per expert: within one, no two rows go to the same token.
            Some(g) => {
                for (_, pairs) in g.host.groups() {
                    let (first, m) = (pairs.start, pairs.len());
                    self.gpu.scatter_add(
                        &mut out.view_mut(),
                        &y.view().slice(first * width..(first + m) * width),
                        &g.pair_tokens.view().slice(first..first + m),
                        &g.pair_weights.view().slice(first..first + m),
                        m,
                        width,
                    )?;
                }
            }
        }
        Ok(out)
    }

    fn moe(
        &mut self,
        layer: usize,
        experts: &CudaExperts<'w>,
        x: &CudaTensor,
        routes: &CudaRoutes,
    ) -> Result<CudaTensor> {
        if layer == 0 {
            self.stats.tokens += routes.tokens as u64;
        }
        if experts.all_resident() {
            self.stats.device += routes.grouped.as_ref().map_or(routes.k, |g| g.host.groups().len()) as u64;
            return default_moe(self, layer, experts, x, routes);
        }
        // Some experts are in host memory: the host reads the routes (one small read per layer).
        let mut read = match &routes.grouped {
            Some(_) => None,
            None => {
                Some(self.routes_on_host(&routes.ids, &routes.weights, routes.k, experts.resident.len())?)
            }
        };
        let host = routes.grouped.as_ref().map(|g| &g.host).or(read.as_ref()).context("routes read back")?;
        let used: Vec<usize> = host.groups().iter().map(|(e, _)| *e).collect();
        let on_host: Vec<usize> = host
            .groups()
            .iter()
            .filter(|(e, pairs)| experts.resident[*e].is_none() && self.misses.on_host(pairs.len()))
            .map(|(e, _)| *e)
            .collect();
        if let Some((l, predicted)) = self.predicted.take() {
            if l == layer {
                self.stats.lookahead_used += used.len() as u64;
                self.stats.lookahead_predicted +=
                    used.iter().filter(|e| predicted.contains(e)).count() as u64;
            }
        }
        if on_host.is_empty() && routes.grouped.is_none() {
            // One token, every expert on the device: missing ones into slots together, then the
            // resident path's one launch per matrix (bit for bit what it computes with every expert
            // resident).
            self.fetch(experts, &used)?;
            self.stats.device += used.len() as u64;
            return default_moe(self, layer, experts, x, routes);
        }
        // The host's rows first (its only wait on the device), then the device's experts are queued
        // and run while the host computes its own.
        let host_x = match on_host.is_empty() {
            true => None,
            false => Some(CpuTensor::new(self.gpu.download(&x.view())?, x.width)),
        };
        let uploaded;
        let g = match (&routes.grouped, read.take()) {
            (Some(g), _) => g,
            (None, read) => {
                uploaded = self.grouped(read.context("routes read back")?)?;
                &uploaded
            }
        };
        let mut out = self.zeros(routes.tokens, self.cfg.hidden_size)?;
        self.moe_on_device(experts, x, g, |e| !on_host.contains(&e), &mut out)?;
        if let Some(host_x) = host_x {
            let host_routes = g.host.restricted(|e| on_host.contains(&e));
            let y = self.cpu.moe(layer, &experts.host, &host_x, &host_routes)?;
            self.stats.host += on_host.len() as u64;
            let mut y_dev = self.tensor(routes.tokens, y.width)?;
            self.gpu.copy_htod(&y.data, &mut y_dev.buf.view_mut())?;
            self.add(&mut out, &y_dev)?;
        }
        Ok(out)
    }

    fn stats_line(&self) -> Option<String> {
        let experts =
            format!("{}/{} experts in VRAM", self.plan.resident_experts(), self.plan.total_experts());
        Some(match &self.cache {
            Some(c) => format!("cuda: {}, {experts}, {}; {}", self.gpu.info, c.stats(), self.stats),
            None => format!("cuda: {}, {experts}; {}", self.gpu.info, self.stats),
        })
    }

    fn expert_stats(&self) -> Option<ExpertStats> {
        Some(self.stats)
    }

    /// For a decode step whose next layer will copy its missing experts: the next router on this
    /// layer's output names them now, and their copies start on the copy stream while the next
    /// attention runs (one small read of the ids; a wrong guess costs a copy, never a result:
    /// `moe` fetches the true routes' experts).
    fn moe_lookahead(&mut self, layer: usize, next: &Layer<Self>, x: &CudaTensor) -> Result<()> {
        let Ffn::Moe(moe) = &next.ffn else { return Ok(()) };
        if x.rows != 1 || moe.experts.all_resident() || self.misses.on_host(1) {
            return Ok(());
        }
        let xn = self.rms_norm(x, &next.ffn_norm)?;
        let logits = self.matmul(&moe.router, &xn)?;
        let guess = self.route(&logits, moe.top_k, moe.gating)?;
        let ids: Vec<usize> = self.gpu.download(&guess.ids.view())?.into_iter().map(|e| e as usize).collect();
        ensure!(
            ids.iter().all(|&e| e < moe.experts.resident.len()),
            "the router produced an expert id out of range"
        );
        self.fetch_with(&moe.experts, &ids, true)?;
        self.predicted = Some((layer, ids));
        Ok(())
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
    fn activation_bytes_at_mixtral_size() {
        let cfg = ModelConfig::mixtral_8x7b(32);
        let mib = activation_bytes(&cfg, DEFAULT_MAX_BATCH) as f64 / (1 << 20) as f64;
        // Dominated by the logits of 512 tokens (62.5 MiB) and the gate/up products of 1024 pairs (112 MiB).
        assert!(mib > 150.0 && mib < 300.0, "{mib} MiB");
        let one = activation_bytes(&cfg, 1);
        assert!(one < 8 << 20, "{one}");
    }
}
