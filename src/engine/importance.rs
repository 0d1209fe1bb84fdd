//! Collecting an importance matrix (`mixtral-q imatrix`): the CPU backend, wrapped so that every
//! product of a layer's weight matrix with activations also adds the squares of its input rows to
//! that matrix's entry, as llama-imatrix collects them:
//! - q, k, v (the normalized hidden state), the attention output projection (the attention's
//!   result), the router (the normalized hidden state): every token's row;
//! - each expert's gate and up (the normalized hidden state) and down (its SwiGLU output): only the
//!   rows of the tokens routed to that expert, counted per expert.
//!
//! The output head and the embeddings are left out, as llama-imatrix leaves them out by default.
//! Matrices are told apart by where their bytes lie in the mapped file, so the model code and the
//! CPU backend are the ones every other command runs.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;

use super::cpu::{CpuBackend, CpuTensor, Routes};
use super::transformer::{Backend, ExpertInput, ExpertMatrix, Prepare, Route, Transformer, Weights};
use crate::format::imatrix::{Entry, ImportanceMatrix};
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix, Model};

/// The CPU engine that collects an importance matrix while it runs.
pub type CollectingEngine<'a> = Transformer<Collecting<'a>>;

/// Makes an engine over `model` (KV cache of `ctx` tokens) that collects as it runs; read the
/// statistics with [`collected`].
pub fn collecting_engine(model: &Model, ctx: usize) -> Result<CollectingEngine<'_>> {
    let names = model
        .file
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("blk."))
        .map(|t| (model.file.tensor_data(t).as_ptr() as usize, t.name.clone()))
        .collect();
    let mut backend = Collecting { cpu: CpuBackend::new(&model.config), names, entries: BTreeMap::new() };
    let weights = Weights::prepare(&mut backend, &model.weights()?, &model.config)?;
    Transformer::with_weights(backend, weights, model.config.clone(), ctx)
}

/// What `engine` collected so far, as an importance matrix (datasets and chunks for the caller to
/// fill in).
pub fn collected(engine: &CollectingEngine<'_>) -> ImportanceMatrix {
    ImportanceMatrix { entries: engine.backend().entries.clone(), ..Default::default() }
}

/// The CPU backend, adding each weight matrix's input squares to its entry.
pub struct Collecting<'a> {
    cpu: CpuBackend<'a>,
    /// Layer tensors by the address of their bytes in the mapping.
    names: HashMap<usize, String>,
    entries: BTreeMap<String, Entry>,
}

impl Collecting<'_> {
    /// The tensor whose bytes start where `m`'s do (an expert tensor's first matrix starts it).
    fn name_of(&self, m: &Matrix<'_>) -> Option<String> {
        self.names.get(&(m.data.as_ptr() as usize)).cloned()
    }

    /// Adds `rows` (the inputs of matrix `mat` of `n_mat` in each tensor of `names`: q, k and v, or an
    /// expert's gate and up, read the same rows) to their entries, squaring each row once.
    fn add<'r>(
        &mut self,
        names: &[String],
        mat: usize,
        n_mat: usize,
        cols: usize,
        rows: impl Iterator<Item = &'r [f32]>,
    ) {
        let (mut squares, mut n) = (vec![0f64; cols], 0);
        for row in rows {
            for (s, &v) in squares.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
            n += 1;
        }
        for name in names {
            let e = self.entries.entry(name.clone()).or_insert_with(|| Entry::new(n_mat, cols));
            for (s, q) in e.sums[mat * cols..(mat + 1) * cols].iter_mut().zip(&squares) {
                *s += q;
            }
            e.counts[mat] += n;
        }
    }

    /// Adds the rows of `x` to the entries of the layer matrices among `ws` (which all read `x`).
    fn record_dense(&mut self, ws: &[&Matrix<'_>], x: &CpuTensor) {
        let names: Vec<String> = ws.iter().filter_map(|w| self.name_of(w)).collect();
        if !names.is_empty() {
            self.add(&names, 0, 1, x.width, x.data.chunks_exact(x.width));
        }
    }

    /// Adds each pair's input row to its expert's matrices `which` (which all read the same rows).
    fn record_experts(
        &mut self,
        experts: &[ExpertWeights<'_>],
        which: &[ExpertMatrix],
        x: &CpuTensor,
        input: ExpertInput,
        routes: &Routes,
    ) {
        let Some(first) = experts.first() else { return };
        let names: Vec<String> = which
            .iter()
            .filter_map(|w| {
                self.name_of(&match w {
                    ExpertMatrix::Gate => first.gate,
                    ExpertMatrix::Up => first.up,
                    ExpertMatrix::Down => first.down,
                })
            })
            .collect();
        if names.is_empty() {
            return;
        }
        for (e, range) in routes.groups() {
            let rows = range.clone().map(|p| match input {
                ExpertInput::Tokens => x.row(routes.pairs()[p].0),
                ExpertInput::Pairs => x.row(p),
            });
            self.add(&names, *e, experts.len(), x.width, rows);
        }
    }
}

impl<'a> Prepare<'a> for Collecting<'a> {
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

/// Every op is the CPU backend's; the products record their inputs first. The composite `moe` is
/// the default composition over these ops, so that the expert products pass through them.
impl<'a> Backend for Collecting<'a> {
    type Tensor = CpuTensor;
    type Matrix = Matrix<'a>;
    type Vector = Vec<f32>;
    type Experts = Vec<ExpertWeights<'a>>;
    type Routes = Routes;
    type KvCache = <CpuBackend<'a> as Backend>::KvCache;

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
        self.record_dense(&[w], x);
        self.cpu.matmul(w, x)
    }

    fn matmul_many<const N: usize>(&mut self, ws: [&Matrix<'a>; N], x: &CpuTensor) -> Result<[CpuTensor; N]> {
        self.record_dense(&ws, x);
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
        experts: &Vec<ExpertWeights<'a>>,
        which: [ExpertMatrix; N],
        x: &CpuTensor,
        input: ExpertInput,
        routes: &Routes,
    ) -> Result<[CpuTensor; N]> {
        self.record_experts(experts, &which, x, input, routes);
        self.cpu.expert_matmul(experts, which, x, input, routes)
    }

    fn weighted_sum(&mut self, y: &CpuTensor, routes: &Routes) -> Result<CpuTensor> {
        self.cpu.weighted_sum(y, routes)
    }

    fn expert_swiglu(
        &mut self,
        experts: &Vec<ExpertWeights<'a>>,
        x: &CpuTensor,
        routes: &Routes,
    ) -> Result<CpuTensor> {
        self.record_experts(experts, &[ExpertMatrix::Gate, ExpertMatrix::Up], x, ExpertInput::Tokens, routes);
        self.cpu.expert_swiglu(experts, x, routes)
    }

    fn scoped<R: Send>(&mut self, work: impl FnOnce(&mut Self) -> R + Send) -> R {
        // As the CPU backend does: on a worker of the thread pool.
        rayon::scope(|_| work(self))
    }

    fn stats_line(&self) -> Option<String> {
        self.cpu.stats_line()
    }
}
