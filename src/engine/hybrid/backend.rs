//! [`HybridBackend`]: the CPU backend for every op except the experts, which it splits between a
//! [`StandIn`] device (the experts resident in its slots) and the host, running both at once.
//!
//! Per MoE layer: the layer's experts in use are looked up in the residency [`Policy`] (a hit runs
//! on the device; a miss is copied into a slot or run on the host, as the policy decides); the
//! device's pairs are sent first, the host computes its own pairs meanwhile, and then every pair's
//! output is put back in the CPU backend's pair order and summed with the CPU's `weighted_sum`. Each
//! expert's rows go through the same kernels (batch size included) as on the CPU, so the output is
//! bit-for-bit the CPU engine's.

use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};

use super::policy::{Access, Key, Policy};
use super::standin::{ExpertCopy, Job, StandIn};
use crate::engine::cpu::{CpuBackend, CpuTensor, Routes};
use crate::engine::transformer::{Backend, ExpertInput, ExpertMatrix, Prepare, Route, Transformer, Weights};
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix, Model};

/// Counters for `stats_line`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HybridStats {
    /// (layer, expert) groups run on the device / on the host.
    pub device: usize,
    pub host: usize,
    /// Experts copied into a slot, and their bytes.
    pub copies: usize,
    pub bytes_copied: usize,
}

/// The CPU backend with a stand-in device for resident experts.
pub struct HybridBackend<'a> {
    cpu: CpuBackend<'a>,
    device: StandIn,
    policy: Box<dyn Policy + Send>,
    n_experts: usize,
    stats: HybridStats,
    /// What the stand-in's slots hold (a policy may count an expert resident before it was ever
    /// copied: static-popular starts full).
    loaded: Vec<Key>,
    /// A copy of `stats` after every layer, for [`StatsHandle`].
    shared: Arc<Mutex<HybridStats>>,
}

/// The hybrid engine.
pub type HybridEngine<'a> = Transformer<HybridBackend<'a>>;

impl<'a> HybridBackend<'a> {
    /// `policy` decides residency over `slots` stand-in slots (the policy must have that capacity).
    pub fn new(model: &Model, slots: usize, policy: Box<dyn Policy + Send>) -> Result<HybridBackend<'a>> {
        Ok(HybridBackend {
            cpu: CpuBackend::new(&model.config),
            device: StandIn::new(&model.config, slots)?,
            policy,
            n_experts: model.config.n_experts,
            stats: HybridStats::default(),
            loaded: Vec::new(),
            shared: Arc::default(),
        })
    }

    pub fn stats(&self) -> HybridStats {
        self.stats
    }

    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.shared.clone())
    }
}

/// A view of a backend's counters that outlives handing the backend to a [`Transformer`].
#[derive(Clone)]
pub struct StatsHandle(Arc<Mutex<HybridStats>>);

impl StatsHandle {
    pub fn get(&self) -> HybridStats {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A hybrid engine over `model` with `slots` stand-in slots managed by `policy`.
pub fn hybrid_engine<'a>(
    model: &'a Model,
    ctx: usize,
    slots: usize,
    policy: Box<dyn Policy + Send>,
) -> Result<(HybridEngine<'a>, StatsHandle)> {
    let mut backend = HybridBackend::new(model, slots, policy)?;
    let stats = backend.stats_handle();
    let weights = Weights::prepare(&mut backend, &model.weights()?, &model.config)?;
    Ok((Transformer::with_weights(backend, weights, model.config.clone(), ctx)?, stats))
}

/// The pair order of the CPU's `Routes` (expert ascending, tokens ascending): (token, expert).
fn pair_order(per_token: &[Route], n_experts: usize) -> Vec<(usize, usize)> {
    let mut order = Vec::new();
    for e in 0..n_experts {
        for (t, r) in per_token.iter().enumerate() {
            if r.iter().any(|&(id, _)| id == e) {
                order.push((t, e));
            }
        }
    }
    order
}

/// `per_token` restricted to expert `e`, renamed expert 0 (one route per token, maybe empty).
fn only(per_token: &[Route], e: usize) -> Vec<Route> {
    per_token.iter().map(|r| r.iter().filter(|p| p.0 == e).map(|&(_, w)| (0, w)).collect()).collect()
}

impl<'a> Prepare<'a> for HybridBackend<'a> {
    fn matrix(&mut self, m: &Matrix<'a>) -> Result<Matrix<'a>> {
        self.cpu.matrix(m)
    }

    fn vector(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        self.cpu.vector(v)
    }

    fn experts(&mut self, layer: usize, experts: &[ExpertWeights<'a>]) -> Result<Vec<ExpertWeights<'a>>> {
        self.cpu.experts(layer, experts)
    }
}

type Cpu<'a> = CpuBackend<'a>;

impl<'a> Backend for HybridBackend<'a> {
    type Tensor = CpuTensor;
    type Matrix = Matrix<'a>;
    type Vector = Vec<f32>;
    type Experts = Vec<ExpertWeights<'a>>;
    type Routes = Routes;
    type KvCache = <Cpu<'a> as Backend>::KvCache;

    fn kv_cache(&mut self, capacity: usize) -> Result<Self::KvCache> {
        self.cpu.kv_cache(capacity)
    }
    fn embed(&mut self, table: &Matrix<'a>, tokens: &[u32]) -> Result<CpuTensor> {
        self.cpu.embed(table, tokens)
    }
    fn rows(&mut self, x: &CpuTensor, first: usize, count: usize) -> Result<CpuTensor> {
        self.cpu.rows(x, first, count)
    }
    fn to_host(&mut self, x: CpuTensor) -> Result<Vec<f32>> {
        self.cpu.to_host(x)
    }
    fn rms_norm(&mut self, x: &CpuTensor, w: &Vec<f32>) -> Result<CpuTensor> {
        self.cpu.rms_norm(x, w)
    }
    fn add(&mut self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        self.cpu.add(x, y)
    }
    fn swiglu(&mut self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<()> {
        self.cpu.swiglu(gate, up)
    }
    fn matmul(&mut self, w: &Matrix<'a>, x: &CpuTensor) -> Result<CpuTensor> {
        self.cpu.matmul(w, x)
    }
    fn matmul_many<const N: usize>(&mut self, ws: [&Matrix<'a>; N], x: &CpuTensor) -> Result<[CpuTensor; N]> {
        self.cpu.matmul_many(ws, x)
    }
    fn rope(&mut self, x: &mut CpuTensor, start: usize) -> Result<()> {
        self.cpu.rope(x, start)
    }
    fn kv_append(
        &mut self,
        cache: &mut Self::KvCache,
        layer: usize,
        start: usize,
        k: &CpuTensor,
        v: &CpuTensor,
    ) -> Result<()> {
        self.cpu.kv_append(cache, layer, start, k, v)
    }
    fn kv_truncate(&mut self, cache: &mut Self::KvCache, len: usize) {
        self.cpu.kv_truncate(cache, len)
    }
    fn attention(
        &mut self,
        cache: &Self::KvCache,
        layer: usize,
        start: usize,
        q: &CpuTensor,
    ) -> Result<CpuTensor> {
        self.cpu.attention(cache, layer, start, q)
    }
    fn route(&mut self, logits: &CpuTensor, top_k: usize, gating: Gating) -> Result<Routes> {
        self.cpu.route(logits, top_k, gating)
    }
    fn routes_to_host(&mut self, routes: &Routes) -> Result<Vec<Route>> {
        self.cpu.routes_to_host(routes)
    }
    fn expert_matmul<const N: usize>(
        &mut self,
        experts: &Self::Experts,
        which: [ExpertMatrix; N],
        x: &CpuTensor,
        input: ExpertInput,
        routes: &Routes,
    ) -> Result<[CpuTensor; N]> {
        self.cpu.expert_matmul(experts, which, x, input, routes)
    }
    fn weighted_sum(&mut self, y: &CpuTensor, routes: &Routes) -> Result<CpuTensor> {
        self.cpu.weighted_sum(y, routes)
    }
    fn expert_swiglu(
        &mut self,
        experts: &Self::Experts,
        x: &CpuTensor,
        routes: &Routes,
    ) -> Result<CpuTensor> {
        self.cpu.expert_swiglu(experts, x, routes)
    }

    fn moe(
        &mut self,
        layer: usize,
        experts: &Self::Experts,
        x: &CpuTensor,
        routes: &Routes,
    ) -> Result<CpuTensor> {
        let per_token = routes.per_token();
        let order = pair_order(per_token, self.n_experts);
        let mut used: Vec<usize> = order.iter().map(|&(_, e)| e).collect();
        used.dedup();
        // Ask the policy about every expert first: a load may evict an expert this same layer uses
        // (fewer slots than experts in use), and only what is resident at the end runs on the device.
        let decisions: Vec<(usize, Access)> =
            used.iter().map(|&e| (e, self.policy.access((layer, e)))).collect();
        let resident = self.policy.resident();
        let (mut on_device, mut on_host) = (Vec::new(), Vec::new());
        for (e, access) in decisions {
            let key: Key = (layer, e);
            if access == Access::Host || !resident.contains(&key) {
                on_host.push(e);
                continue;
            }
            if access == Access::Load || !self.loaded.contains(&key) {
                let expert = experts.get(e).with_context(|| format!("layer {layer} has no expert {e}"))?;
                let copy = ExpertCopy::of(expert);
                self.stats.copies += 1;
                self.stats.bytes_copied += copy.bytes();
                self.device.load(key, copy, resident.clone())?;
                self.loaded.retain(|k| resident.contains(k));
                self.loaded.push(key);
            }
            on_device.push(e);
        }
        self.policy.end_step();
        self.stats.device += on_device.len();
        self.stats.host += on_host.len();
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = self.stats;

        // The device's pairs first, so that they run while the host computes its own.
        let jobs =
            on_device.iter().map(|&e| Job { key: (layer, e), per_token: only(per_token, e) }).collect();
        let pending = self.device.run(Arc::new(x.clone()), jobs)?;
        let mut outputs: Vec<(usize, CpuTensor)> = Vec::with_capacity(used.len());
        for &e in &on_host {
            let sub = Routes::new(only(per_token, e), 1);
            let one = std::slice::from_ref(
                experts.get(e).with_context(|| format!("layer {layer} has no expert {e}"))?,
            );
            let h = self.cpu.expert_swiglu(&one.to_vec(), x, &sub)?;
            let [y] =
                self.cpu.expert_matmul(&one.to_vec(), [ExpertMatrix::Down], &h, ExpertInput::Pairs, &sub)?;
            outputs.push((e, y));
        }
        let device_out = pending.recv().context("the stand-in device dropped a layer's work")??;
        ensure!(
            device_out.len() == on_device.len(),
            "the stand-in device answered {} of {} jobs",
            device_out.len(),
            on_device.len()
        );
        outputs.extend(on_device.iter().copied().zip(device_out));
        outputs.sort_by_key(|(e, _)| *e);

        // Every expert's rows, in expert order = the CPU's pair order.
        let width = outputs.first().map_or(x.width, |(_, y)| y.width);
        let mut data = Vec::with_capacity(order.len() * width);
        for (_, y) in &outputs {
            data.extend_from_slice(&y.data);
        }
        ensure!(data.len() == order.len() * width, "expert outputs do not cover the layer's pairs");
        self.cpu.weighted_sum(&CpuTensor::new(data, width), routes)
    }

    fn scoped<R: Send>(&mut self, work: impl FnOnce(&mut Self) -> R + Send) -> R {
        // As the CPU backend: on a worker of the thread pool.
        rayon::scope(|_| work(self))
    }

    fn stats_line(&self) -> Option<String> {
        let s = self.stats;
        let total = s.device + s.host;
        let rate =
            if total == 0 { 0.0 } else { 100.0 * (s.device - s.copies.min(s.device)) as f64 / total as f64 };
        Some(format!(
            "hybrid ({} slots): experts on device {}, on host {}, copied {} ({} bytes), hit rate {rate:.1}%",
            self.device.capacity(),
            s.device,
            s.host,
            s.copies,
            s.bytes_copied
        ))
    }
}
