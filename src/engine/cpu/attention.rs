//! Causal grouped-query attention over the KV cache.

use rayon::prelude::*;

use super::dot::vector::{axpy, dot};
use super::kv_cache::HeadCache;
use crate::model::ModelConfig;

/// `q` holds the (rotated) queries of `n` new tokens at positions `start .. start + n`
/// (`[n, n_heads * head_dim]`); `heads[g]` the keys and values of KV head g for every cached position up
/// to `start + n` (`[start + n, head_dim]` each). Token t sees positions `0 ..= start + t`; query head h
/// reads KV head `h / (n_heads / n_kv_heads)`. Writes `[n, n_heads * head_dim]` into `out`.
/// One rayon task per (token, KV head): the query heads sharing a KV head are handled together, so
/// each cached key and value is read once per group instead of once per query head.
pub fn causal_attention(cfg: &ModelConfig, q: &[f32], heads: &[HeadCache], start: usize, out: &mut [f32]) {
    let hd = cfg.head_dim;
    let group = cfg.n_heads / cfg.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Query heads of one group are adjacent, so a chunk of `group * hd` values is one (token, KV head).
    out.par_chunks_mut(group * hd).zip(q.par_chunks(group * hd)).enumerate().for_each(|(i, (o, qg))| {
        let (t, kv) = (i / cfg.n_kv_heads, &heads[i % cfg.n_kv_heads]);
        let seen = start + t + 1;
        // scores[j * seen + p]: query head j of the group against position p.
        let mut scores = vec![0.0; group * seen];
        for (p, k) in kv.keys.chunks_exact(hd).take(seen).enumerate() {
            for (j, qh) in qg.chunks_exact(hd).enumerate() {
                scores[j * seen + p] = dot(qh, k) * scale;
            }
        }
        for s in scores.chunks_exact_mut(seen) {
            softmax(s);
        }
        o.fill(0.0);
        for (p, v) in kv.values.chunks_exact(hd).take(seen).enumerate() {
            for (j, oh) in o.chunks_exact_mut(hd).enumerate() {
                axpy(oh, scores[j * seen + p], v);
            }
        }
    });
}

/// In place, subtracting the maximum first so that large logits do not overflow.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::testing::pseudo_random;

    fn cfg(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            n_heads,
            n_kv_heads,
            head_dim,
            hidden_size: n_heads * head_dim,
            ..ModelConfig::mixtral_8x7b(1)
        }
    }

    /// `[position, kv_dim]` keys and values as the cache holds them, one buffer per KV head.
    fn by_head(cfg: &ModelConfig, k: &[f32], v: &[f32]) -> Vec<HeadCache> {
        let mut cache = super::super::kv_cache::KvCache::new(1, cfg.n_kv_heads, cfg.head_dim);
        cache.append(0, 0, k, v);
        cache.heads(0).iter().map(|h| HeadCache { keys: h.keys.clone(), values: h.values.clone() }).collect()
    }

    /// The textbook version: f64, explicit loops, full score matrix with a causal mask.
    fn naive(cfg: &ModelConfig, q: &[f32], k: &[f32], v: &[f32], start: usize, n: usize) -> Vec<f64> {
        let (hd, qd, kvd) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let mut out = vec![0.0f64; n * qd];
        for t in 0..n {
            for h in 0..cfg.n_heads {
                let g = h * cfg.n_kv_heads / cfg.n_heads;
                let total = start + n;
                let mut s = vec![f64::NEG_INFINITY; total];
                for (p, sp) in s.iter_mut().enumerate().take(start + t + 1) {
                    *sp = (0..hd)
                        .map(|d| q[t * qd + h * hd + d] as f64 * k[p * kvd + g * hd + d] as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt();
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (p, sp) in s.iter().enumerate() {
                    let w = (sp - m).exp() / z;
                    for d in 0..hd {
                        out[t * qd + h * hd + d] += w * v[p * kvd + g * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_grouped_query_attention() {
        // head_dim 40: two full 16-lane chunks and a remainder in `dot`.
        let cfg = cfg(4, 2, 40);
        let (start, n) = (5, 3);
        let q: Vec<f32> = pseudo_random(n * cfg.q_dim(), 1).iter().map(|x| x * 3.0).collect();
        let k = pseudo_random((start + n) * cfg.kv_dim(), 2);
        let v = pseudo_random((start + n) * cfg.kv_dim(), 3);
        let mut out = vec![0.0; n * cfg.q_dim()];
        causal_attention(&cfg, &q, &by_head(&cfg, &k, &v), start, &mut out);
        let want = naive(&cfg, &q, &k, &v, start, n);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
    }

    #[test]
    fn first_token_returns_its_own_value() {
        let cfg = cfg(2, 1, 4);
        let q = pseudo_random(cfg.q_dim(), 4);
        let k = pseudo_random(cfg.kv_dim(), 5);
        let v = pseudo_random(cfg.kv_dim(), 6);
        let mut out = vec![0.0; cfg.q_dim()];
        causal_attention(&cfg, &q, &by_head(&cfg, &k, &v), 0, &mut out);
        assert_eq!(&out[..4], &v[..]);
        assert_eq!(&out[4..], &v[..]);
    }

    #[test]
    fn softmax_survives_large_logits() {
        let mut x = [1000.0f32, 1000.0, -1000.0];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);
    }
}
