//! The mixture of experts on the CPU: routing ([`route`], [`Routes`]) and the expert products.
//!
//! A batch's (token, expert) pairs are grouped by expert, so that each chosen expert's weights are read
//! once per batch, not once per token: per expert, its tokens' rows are gathered and quantized once for
//! its gate and up products. One token (decode) instead runs the products of all its experts in one
//! parallel pass. Outputs are summed in expert order either way, so prompt and decode add the same
//! terms in the same order.

use std::borrow::Cow;
use std::ops::Range;

use anyhow::{ensure, Result};

use super::attention::softmax;
use super::products::{matvecs, Input};
use super::{swiglu_in_place, CpuTensor};
use crate::engine::transformer::{ExpertInput, ExpertMatrix, Route};
use crate::model::spec::Gating;
use crate::model::weights::{ExpertWeights, Matrix};

/// Softmax over all router logits, the `k` largest probabilities, renormalized to sum 1 when `gating`
/// says so (= a softmax over the k largest logits). Ties go to the lower expert id.
pub fn route(logits: &[f32], k: usize, gating: Gating) -> Route {
    let mut probs = logits.to_vec();
    softmax(&mut probs);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    let Gating::Softmax { renormalize } = gating;
    let total: f32 = if renormalize { order.iter().map(|&e| probs[e]).sum() } else { 1.0 };
    order.into_iter().map(|e| (e, probs[e] / total)).collect()
}

/// A batch's routes: per token, and as (token, weight) pairs grouped by expert.
pub struct Routes {
    per_token: Vec<Route>,
    /// Every (token, weight) pair; the pairs of one expert are adjacent, experts in ascending order,
    /// tokens in ascending order within an expert. The "pair order" of the expert ops.
    pairs: Vec<(usize, f32)>,
    /// The experts used, each with its range of `pairs`.
    groups: Vec<(usize, Range<usize>)>,
}

impl Routes {
    /// The routes of `per_token` tokens over `n_experts` experts (ids below `n_experts`).
    pub fn new(per_token: Vec<Route>, n_experts: usize) -> Routes {
        let mut pairs = Vec::with_capacity(per_token.iter().map(Vec::len).sum());
        let mut groups = Vec::new();
        for e in 0..n_experts {
            let first = pairs.len();
            for (t, route) in per_token.iter().enumerate() {
                if let Some(&(_, w)) = route.iter().find(|(id, _)| *id == e) {
                    pairs.push((t, w));
                }
            }
            if pairs.len() > first {
                groups.push((e, first..pairs.len()));
            }
        }
        Routes { per_token, pairs, groups }
    }

    pub fn per_token(&self) -> &[Route] {
        &self.per_token
    }

    pub fn n_tokens(&self) -> usize {
        self.per_token.len()
    }

    /// Every (token, weight) pair in pair order (expert by expert, tokens ascending).
    pub fn pairs(&self) -> &[(usize, f32)] {
        &self.pairs
    }

    /// The same tokens with only the pairs of the experts `keep` accepts (a token may keep none).
    pub fn restricted(&self, keep: impl Fn(usize) -> bool) -> Routes {
        let n_experts = self.groups.last().map_or(0, |(e, _)| e + 1);
        let per_token = self.per_token.iter().map(|r| r.iter().copied().filter(|&(e, _)| keep(e)).collect());
        Routes::new(per_token.collect(), n_experts)
    }

    /// The experts used, ascending, each with its range of [`Routes::pairs`].
    pub fn groups(&self) -> &[(usize, Range<usize>)] {
        &self.groups
    }

    fn n_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Each pair's input row: its token's row of `x`, or row `p` for pair `p`.
    fn input_row<'x>(&self, x: &'x CpuTensor, input: ExpertInput, pair: usize) -> &'x [f32] {
        match input {
            ExpertInput::Tokens => x.row(self.pairs[pair].0),
            ExpertInput::Pairs => x.row(pair),
        }
    }

    /// The rows of one expert's pairs, contiguous: gathered from token rows, or a slice of pair rows.
    fn group_rows<'x>(&self, x: &'x CpuTensor, input: ExpertInput, pairs: &Range<usize>) -> Cow<'x, [f32]> {
        match input {
            ExpertInput::Tokens => {
                Cow::Owned(self.pairs[pairs.clone()].iter().flat_map(|&(t, _)| x.row(t)).copied().collect())
            }
            ExpertInput::Pairs => Cow::Borrowed(&x.data[pairs.start * x.width..pairs.end * x.width]),
        }
    }

    fn check_input(&self, x: &CpuTensor, input: ExpertInput) -> Result<()> {
        let rows = match input {
            ExpertInput::Tokens => self.n_tokens(),
            ExpertInput::Pairs => self.n_pairs(),
        };
        ensure!(x.rows() == rows, "expert input has {} rows, the routes need {rows}", x.rows());
        Ok(())
    }
}

fn matrix<'e, 'a>(expert: &'e ExpertWeights<'a>, which: ExpertMatrix) -> &'e Matrix<'a> {
    match which {
        ExpertMatrix::Gate => &expert.gate,
        ExpertMatrix::Up => &expert.up,
        ExpertMatrix::Down => &expert.down,
    }
}

/// The products `which` of every pair's expert with the pair's input row (see `Backend::expert_matmul`).
pub fn expert_matmul<const N: usize>(
    experts: &[ExpertWeights],
    which: [ExpertMatrix; N],
    x: &CpuTensor,
    input: ExpertInput,
    routes: &Routes,
) -> Result<[CpuTensor; N]> {
    routes.check_input(x, input)?;
    let width = |k: ExpertMatrix| experts.first().map_or(0, |e| matrix(e, k).rows);
    let mut outs = which.map(|k| CpuTensor::zeros(routes.n_pairs(), width(k)));
    if routes.n_tokens() == 1 {
        // Decode: every product of every chosen expert in one parallel pass.
        let mut products = Vec::with_capacity(N * routes.n_pairs());
        for (e, pairs) in &routes.groups {
            for p in pairs.clone() {
                products.extend(which.map(|k| (routes.input_row(x, input, p), matrix(&experts[*e], k))));
            }
        }
        let ys = matvecs(&products)?;
        for (i, y) in ys.into_iter().enumerate() {
            let out = &mut outs[i % N];
            out.data[i / N * out.width..][..out.width].copy_from_slice(&y);
        }
    } else {
        for (e, pairs) in &routes.groups {
            let rows = routes.group_rows(x, input, pairs);
            let mut input = Input::new(&rows);
            for (out, k) in outs.iter_mut().zip(which) {
                let w = out.width;
                input.matmul(matrix(&experts[*e], k), &mut out.data[pairs.start * w..pairs.end * w])?;
            }
        }
    }
    Ok(outs)
}

/// `silu(gate x) * up x` for every pair, gate and up sharing their input's quantization (decode: one
/// parallel pass over every expert's gate and up).
pub fn expert_swiglu(experts: &[ExpertWeights], x: &CpuTensor, routes: &Routes) -> Result<CpuTensor> {
    if routes.n_tokens() == 1 {
        let [mut gate, up] =
            expert_matmul(experts, [ExpertMatrix::Gate, ExpertMatrix::Up], x, ExpertInput::Tokens, routes)?;
        swiglu_in_place(&mut gate.data, &up.data, gate.width);
        return Ok(gate);
    }
    routes.check_input(x, ExpertInput::Tokens)?;
    let width = experts.first().map_or(0, |e| e.gate.rows);
    let mut h = CpuTensor::zeros(routes.n_pairs(), width);
    for (e, pairs) in &routes.groups {
        let rows = routes.group_rows(x, ExpertInput::Tokens, pairs);
        let (expert, m) = (&experts[*e], pairs.len());
        let gate = &mut h.data[pairs.start * width..pairs.end * width];
        let mut up = vec![0.0; m * expert.up.rows];
        let mut input = Input::new(&rows);
        input.matmul(&expert.gate, gate)?;
        input.matmul(&expert.up, &mut up)?;
        swiglu_in_place(gate, &up, width);
    }
    Ok(h)
}

/// `out[token] = Σ weight · y[pair]` over each token's pairs, in expert order.
pub fn weighted_sum(y: &CpuTensor, routes: &Routes) -> Result<CpuTensor> {
    ensure!(y.rows() == routes.n_pairs(), "{} expert outputs for {} pairs", y.rows(), routes.n_pairs());
    let mut out = CpuTensor::zeros(routes.n_tokens(), y.width);
    for (p, &(t, w)) in routes.pairs.iter().enumerate() {
        for (o, &v) in out.data[t * y.width..][..y.width].iter_mut().zip(y.row(p)) {
            *o += w * v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_renormalized_and_ordered() {
        let logits = [0.1f32, 2.0, -1.0, 1.5, 0.3];
        let r = route(&logits, 2, Gating::MIXTRAL);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        // Softmax over the two chosen logits.
        let w1 = 1.0 / (1.0 + (1.5f32 - 2.0).exp());
        assert!((r[0].1 - w1).abs() < 1e-6 && (r[1].1 - (1.0 - w1)).abs() < 1e-6);
    }

    #[test]
    fn without_renormalization_the_weights_are_the_softmax_over_all_experts() {
        let logits = [0.1f32, 2.0, -1.0, 1.5, 0.3];
        let r = route(&logits, 2, Gating::Softmax { renormalize: false });
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((r[0].1 - 2f32.exp() / z).abs() < 1e-6 && (r[1].1 - 1.5f32.exp() / z).abs() < 1e-6);
        assert!(r[0].1 + r[1].1 < 0.9);
    }

    #[test]
    fn ties_go_to_the_lower_id_and_k_equal_n_keeps_all() {
        let r = route(&[1.0, 3.0, 3.0, 0.0], 1, Gating::MIXTRAL);
        assert_eq!(r, vec![(1, 1.0)]);
        let all = route(&[0.5, -0.5, 0.0], 3, Gating::MIXTRAL);
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 2, 1]);
        assert!((all.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn pairs_are_grouped_by_expert_and_summed_back_per_token() {
        let routes =
            Routes::new(vec![vec![(2, 0.75), (0, 0.25)], vec![(0, 0.5), (1, 0.5)], vec![(2, 1.0)]], 4);
        assert_eq!(routes.pairs, vec![(0, 0.25), (1, 0.5), (1, 0.5), (0, 0.75), (2, 1.0)]);
        assert_eq!(routes.groups, vec![(0, 0..2), (1, 2..3), (2, 3..5)]);
        // Pair p's output is the row [p, 10 p].
        let y = CpuTensor::new((0..5).flat_map(|p| [p as f32, 10.0 * p as f32]).collect(), 2);
        let out = weighted_sum(&y, &routes).unwrap();
        assert_eq!(out.data, vec![0.75 * 3.0, 7.5 * 3.0, 0.5 + 0.5 * 2.0, 5.0 + 0.5 * 20.0, 4.0, 40.0]);
    }
}
