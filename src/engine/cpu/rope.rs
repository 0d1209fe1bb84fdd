//! Rotary position embedding in the GGUF layout: llama.cpp's converter permuted the q/k rows so that
//! RoPE rotates ADJACENT pairs (2i, 2i+1) within each head, by the angle `pos · theta^(-2i/head_dim)`.

/// The per-pair frequencies of one model.
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32) -> Rope {
        let inv_freq =
            (0..head_dim / 2).map(|i| (theta as f64).powf(-2.0 * i as f64 / head_dim as f64)).collect();
        Rope { inv_freq }
    }

    /// Rotates every head of one token's vector (`[n_heads * head_dim]`) for absolute position `pos`.
    /// Angles are computed in f64: at positions in the tens of thousands an f32 angle is off by ~1e-3 rad.
    pub fn apply(&self, v: &mut [f32], pos: usize) {
        let head_dim = 2 * self.inv_freq.len();
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let angle = pos as f64 * f;
                (angle.cos() as f32, angle.sin() as f32)
            })
            .unzip();
        for head in v.chunks_exact_mut(head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract() - 0.5)
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn position_zero_is_identity() {
        let rope = Rope::new(16, 1e6);
        let v = pseudo_random(32, 1);
        let mut r = v.clone();
        rope.apply(&mut r, 0);
        assert_eq!(r, v);
    }

    #[test]
    fn rotation_preserves_the_norm_of_each_pair() {
        let rope = Rope::new(16, 1e4);
        let v = pseudo_random(32, 2);
        let mut r = v.clone();
        rope.apply(&mut r, 1234);
        assert_ne!(r, v);
        for (a, b) in v.chunks(2).zip(r.chunks(2)) {
            assert!((dot(a, a) - dot(b, b)).abs() < 1e-6);
        }
    }

    #[test]
    fn first_pair_rotates_by_the_position_in_radians() {
        let rope = Rope::new(8, 1e6);
        let mut v = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        rope.apply(&mut v, 3);
        assert!((v[0] - 3f32.cos()).abs() < 1e-6 && (v[1] - 3f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn scores_depend_only_on_relative_position() {
        let rope = Rope::new(32, 1e6);
        let (q, k) = (pseudo_random(32, 3), pseudo_random(32, 4));
        let score = |m: usize, n: usize| {
            let (mut qm, mut kn) = (q.clone(), k.clone());
            rope.apply(&mut qm, m);
            rope.apply(&mut kn, n);
            dot(&qm, &kn)
        };
        let base = score(7, 2);
        for (m, n) in [(5, 0), (105, 100), (4005, 4000)] {
            assert!((score(m, n) - base).abs() < 1e-4, "({m},{n}): {} vs {base}", score(m, n));
        }
        assert!((score(9, 2) - base).abs() > 1e-3, "a different distance must change the score");
    }
}
