//! [`HybridBackend`]: the CPU backend for every op except the experts, which it splits between a
//! [`StandIn`] device (the experts resident in its slots) and the host, running both at once.
//!
//! Per MoE layer: the layer's experts in use are looked up in the residency [`Policy`] (a hit runs
//! on the device; a miss is copied into a slot or run on the host, as the policy decides); the
//! device's pairs are sent first, the host computes its own pairs meanwhile, and then every pair's
//! output is put back in the CPU backend's pair order and summed with the CPU's `weighted_sum`. Each
//! expert's rows go through the same kernels (batch size included) as on the CPU, so the output is
//! bit-for-bit the CPU engine's.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};

use super::policy::{Access, Key, Policy};
use super::standin::{ExpertCopy, Job, StandIn};
use crate::engine::cpu::{CpuBackend, CpuTensor, Routes};
use crate::engine::stats::ExpertStats;
use crate::engine::transformer::{
    Backend, ExpertInput, ExpertMatrix, Ffn, Layer, Prepare, Route, Transformer, Weights,
};
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix, Model};

/// What [`HybridBackend::moe_lookahead`] predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookahead {
    /// No prediction.
    Off,
    /// The next layer's router applied to this layer's output (its top-k per token).
    Router,
    /// A test hook: the experts the next router ranks lowest, never the ones it will choose.
    AlwaysWrong,
}

/// The CPU backend with a stand-in device for resident experts.
pub struct HybridBackend<'a> {
    cpu: CpuBackend<'a>,
    device: StandIn,
    policy: Box<dyn Policy + Send>,
    n_experts: usize,
    stats: ExpertStats,
    /// What the stand-in's slots hold (a policy may count an expert resident before it was ever
    /// copied: static-popular starts full).
    loaded: Vec<Key>,
    lookahead: Lookahead,
    predicted: Option<Prediction>,
}

/// The last lookahead: the layer it predicted, the experts predicted, and the policy's answer for
/// each (the access, and any copy, already made).
struct Prediction {
    layer: usize,
    experts: Vec<usize>,
    accesses: Vec<(usize, Access)>,
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
            stats: ExpertStats::default(),
            loaded: Vec::new(),
            lookahead: Lookahead::Router,
            predicted: None,
        })
    }

    pub fn set_lookahead(&mut self, lookahead: Lookahead) {
        self.lookahead = lookahead;
    }

    /// Makes the policy's decision for `key` and copies the expert into a slot when it says so
    /// (or when the policy counts it resident and the slots do not hold it yet).
    fn admit(&mut self, key: Key, expert: &ExpertWeights, access: Access) -> Result<bool> {
        let resident = self.policy.resident();
        if access == Access::Host || !resident.contains(&key) {
            return Ok(false);
        }
        if access == Access::Load || !self.loaded.contains(&key) {
            let copy = ExpertCopy::of(expert);
            self.stats.copies += 1;
            self.stats.bytes_copied += copy.bytes() as u64;
            self.device.load(key, copy, resident.clone())?;
            self.loaded.retain(|k| resident.contains(k));
            self.loaded.push(key);
        }
        Ok(true)
    }
}

/// A hybrid engine over `model` with `slots` stand-in slots managed by `policy`, predicting each
/// next layer's experts as `lookahead` says.
pub fn hybrid_engine<'a>(
    model: &'a Model,
    ctx: usize,
    slots: usize,
    policy: Box<dyn Policy + Send>,
    lookahead: Lookahead,
) -> Result<HybridEngine<'a>> {
    let mut backend = HybridBackend::new(model, slots, policy)?;
    backend.set_lookahead(lookahead);
    let weights = Weights::prepare(&mut backend, &model.weights()?, &model.config)?;
    Transformer::with_weights(backend, weights, model.config.clone(), ctx)
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
    fn routes_from_host(&mut self, per_token: &[Route]) -> Result<Routes> {
        self.cpu.routes_from_host(per_token)
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
        let used: Vec<usize> = routes.groups().iter().map(|(e, _)| *e).collect();
        if layer == 0 {
            self.stats.tokens += per_token.len() as u64;
        }
        // The lookahead's guess for this layer: its recall, and the accesses it already made.
        let mut early = Vec::new();
        if let Some(p) = self.predicted.take() {
            if p.layer == layer {
                self.stats.lookahead_used += used.len() as u64;
                self.stats.lookahead_predicted +=
                    used.iter().filter(|e| p.experts.contains(e)).count() as u64;
                early = p.accesses;
            }
        }
        // Ask the policy about every expert first: a load may evict an expert this same layer uses
        // (fewer slots than experts in use), and only what is resident at the end runs on the device.
        let decisions: Vec<(usize, Access)> = used
            .iter()
            .map(|&e| match early.iter().find(|(x, _)| *x == e) {
                // Copied already by the lookahead if it was to be.
                Some(&(_, access)) => (e, if access == Access::Load { Access::Hit } else { access }),
                None => (e, self.policy.access((layer, e))),
            })
            .collect();
        let (mut on_device, mut on_host) = (Vec::new(), Vec::new());
        for (e, access) in decisions {
            let expert = experts.get(e).with_context(|| format!("layer {layer} has no expert {e}"))?;
            if self.admit((layer, e), expert, access)? {
                on_device.push(e);
            } else {
                on_host.push(e);
            }
        }
        self.policy.end_step();
        self.stats.device += on_device.len() as u64;
        self.stats.host += on_host.len() as u64;

        // The device's pairs first, so that they run while the host computes its own.
        let jobs =
            on_device.iter().map(|&e| Job { key: (layer, e), per_token: only(per_token, e) }).collect();
        let pending = self.device.run(Arc::new(x.clone()), jobs)?;
        let mut outputs: Vec<(usize, CpuTensor)> = Vec::with_capacity(used.len());
        for &e in &on_host {
            // One expert at a time, as the CPU backend runs each expert's group.
            let sub = routes.restricted(|x| x == e);
            let h = self.cpu.expert_swiglu(experts, x, &sub)?;
            let [y] = self.cpu.expert_matmul(experts, [ExpertMatrix::Down], &h, ExpertInput::Pairs, &sub)?;
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
        let n_pairs = routes.pairs().len();
        let mut data = Vec::with_capacity(n_pairs * width);
        for (_, y) in &outputs {
            data.extend_from_slice(&y.data);
        }
        ensure!(data.len() == n_pairs * width, "expert outputs do not cover the layer's pairs");
        self.cpu.weighted_sum(&CpuTensor::new(data, width), routes)
    }

    fn scoped<R: Send>(&mut self, work: impl FnOnce(&mut Self) -> R + Send) -> R {
        // As the CPU backend: on a worker of the thread pool.
        rayon::scope(|_| work(self))
    }

    fn stats_line(&self) -> Option<String> {
        Some(format!("hybrid ({} slots, {}): {}", self.device.capacity(), self.policy.name(), self.stats))
    }

    fn expert_stats(&self) -> Option<ExpertStats> {
        Some(self.stats)
    }

    fn moe_lookahead(&mut self, layer: usize, next: &Layer<Self>, x: &CpuTensor) -> Result<()> {
        let Ffn::Moe(moe) = &next.ffn else { return Ok(()) };
        if self.lookahead == Lookahead::Off {
            return Ok(());
        }
        // The next router on this layer's output, normalized as the next layer will (its attention
        // has not run yet: that is the guess).
        let xn = self.cpu.rms_norm(x, &next.ffn_norm)?;
        let logits = self.cpu.matmul(&moe.router, &xn)?;
        let k = match self.lookahead {
            Lookahead::AlwaysWrong => self.n_experts,
            _ => moe.top_k,
        };
        let guess = self.cpu.route(&logits, k, moe.gating)?;
        let mut predicted = Vec::new();
        for route in guess.per_token() {
            let ids = route.iter().map(|&(e, _)| e);
            let ids: Vec<usize> = match self.lookahead {
                // The k lowest-ranked: never among the top k while there are 2k experts.
                Lookahead::AlwaysWrong => ids.rev().take(moe.top_k).collect(),
                _ => ids.collect(),
            };
            for e in ids {
                if !predicted.contains(&e) {
                    predicted.push(e);
                }
            }
        }
        predicted.sort_unstable();
        // Start the copies now: the stand-in copies while the host runs the next attention.
        let mut accesses = Vec::new();
        for &e in &predicted {
            let access = self.policy.access((layer, e));
            let expert = moe.experts.get(e).with_context(|| format!("layer {layer} has no expert {e}"))?;
            self.admit((layer, e), expert, access)?;
            accesses.push((e, access));
        }
        self.predicted = Some(Prediction { layer, experts: predicted, accesses });
        Ok(())
    }
}
