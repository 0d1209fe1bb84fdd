//! The sparse mixture of experts: the router picks the top-k experts per token, each expert is a
//! SwiGLU FFN `w2(silu(w1 x) * (w3 x))`, and the outputs are mixed with the renormalized router weights.

use anyhow::Result;
use rayon::prelude::*;

use super::attention::softmax;
use super::{matvecs, Input};
use crate::model::weights::{ExpertWeights, LayerWeights, Matrix};

/// One token's chosen experts with their weights (summing to 1), highest weight first.
pub type Route = Vec<(usize, f32)>;

/// Softmax over all router logits, the `k` largest probabilities, renormalized to sum 1
/// (= a softmax over the k largest logits). Ties go to the lower expert id.
pub fn route(logits: &[f32], k: usize) -> Route {
    let mut probs = logits.to_vec();
    softmax(&mut probs);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    let total: f32 = order.iter().map(|&e| probs[e]).sum();
    order.into_iter().map(|e| (e, probs[e] / total)).collect()
}

/// Routes every token of `xs` (`[n, hidden]`, already normalized) with the layer's router.
pub fn route_tokens(layer: &LayerWeights, xs: &[f32], k: usize) -> Result<Vec<Route>> {
    let n_experts = layer.router.rows;
    let mut logits = vec![0.0; xs.len() / layer.router.cols * n_experts];
    Input::new(xs).matmul(&layer.router, &mut logits)?;
    Ok(logits.chunks_exact(n_experts).map(|l| route(l, k)).collect())
}

/// Returns `Σ_e weight_e · expert_e(x)` for every token (`[n, hidden]`). Tokens are grouped by expert,
/// so each chosen expert's weights are read once per batch, not once per token.
pub fn mix_experts(experts: &[ExpertWeights], xs: &[f32], routes: &[Route]) -> Result<Vec<f32>> {
    if let [route] = routes {
        return mix_experts_one_token(experts, xs, route);
    }
    let hidden = xs.len() / routes.len().max(1);
    let mut out = vec![0.0; xs.len()];
    for (e, expert) in experts.iter().enumerate() {
        let users: Vec<(usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(t, r)| r.iter().find(|(id, _)| *id == e).map(|&(_, w)| (t, w)))
            .collect();
        if users.is_empty() {
            continue;
        }
        let rows: Vec<f32> = users.iter().flat_map(|&(t, _)| &xs[t * hidden..][..hidden]).copied().collect();
        let y = expert_ffn(expert, &rows)?;
        for (&(t, w), yt) in users.iter().zip(y.chunks_exact(hidden)) {
            for (o, &v) in out[t * hidden..][..hidden].iter_mut().zip(yt) {
                *o += w * v;
            }
        }
    }
    Ok(out)
}

/// [`mix_experts`] for one token (decode): the gate and up products of all chosen experts in one
/// parallel pass, their down products in another.
fn mix_experts_one_token(experts: &[ExpertWeights], x: &[f32], route: &Route) -> Result<Vec<f32>> {
    // In expert order, as the batched path adds them: the same sums in the same order.
    let mut route = route.clone();
    route.sort_by_key(|&(e, _)| e);
    let chosen: Vec<&ExpertWeights> = route.iter().map(|&(e, _)| &experts[e]).collect();
    let gate_up: Vec<(&[f32], &Matrix)> = chosen.iter().flat_map(|e| [(x, &e.gate), (x, &e.up)]).collect();
    let hs: Vec<Vec<f32>> = matvecs(&gate_up)?
        .chunks_exact(2)
        .map(|gu| gu[0].iter().zip(&gu[1]).map(|(&g, &u)| silu(g) * u).collect())
        .collect();
    let down: Vec<(&[f32], &Matrix)> = hs.iter().zip(&chosen).map(|(h, e)| (&h[..], &e.down)).collect();
    let mut out = vec![0.0; x.len()];
    for (y, &(_, weight)) in matvecs(&down)?.iter().zip(&route) {
        for (o, &v) in out.iter_mut().zip(y) {
            *o += weight * v;
        }
    }
    Ok(out)
}

/// SwiGLU for a batch of rows `[m, hidden]` → `[m, hidden]`.
fn expert_ffn(expert: &ExpertWeights, xs: &[f32]) -> Result<Vec<f32>> {
    let m = xs.len() / expert.gate.cols;
    let mut gate = vec![0.0; m * expert.gate.rows];
    let mut up = vec![0.0; m * expert.up.rows];
    let mut input = Input::new(xs);
    input.matmul(&expert.gate, &mut gate)?;
    input.matmul(&expert.up, &mut up)?;
    gate.par_chunks_mut(expert.gate.rows).zip(up.par_chunks(expert.up.rows)).for_each(|(g, u)| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = silu(*g) * u;
        }
    });
    let mut out = vec![0.0; m * expert.down.rows];
    Input::new(&gate).matmul(&expert.down, &mut out)?;
    Ok(out)
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_renormalized_and_ordered() {
        let logits = [0.1f32, 2.0, -1.0, 1.5, 0.3];
        let r = route(&logits, 2);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        // Softmax over the two chosen logits.
        let w1 = 1.0 / (1.0 + (1.5f32 - 2.0).exp());
        assert!((r[0].1 - w1).abs() < 1e-6 && (r[1].1 - (1.0 - w1)).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_id_and_k_equal_n_keeps_all() {
        let r = route(&[1.0, 3.0, 3.0, 0.0], 1);
        assert_eq!(r, vec![(1, 1.0)]);
        let all = route(&[0.5, -0.5, 0.0], 3);
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 2, 1]);
        assert!((all.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.7310586).abs() < 1e-6);
        assert!(silu(-30.0).abs() < 1e-10);
    }
}
