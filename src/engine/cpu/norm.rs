//! RMSNorm: `x * w / sqrt(mean(x²) + eps)`, applied to each token's row.

/// Normalizes every row of `xs` (`[n, w.len()]`) into a new buffer.
pub fn rms_norm_rows(xs: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; xs.len()];
    for (x, o) in xs.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        rms_norm(x, w, eps, o);
    }
    out
}

/// One row. The mean of squares is accumulated in f64: it costs nothing here and keeps long rows exact.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let scale = (1.0 / (mean_sq + eps as f64).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 0.5, 2.0, -1.0];
        let eps = 1e-5;
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0 + eps as f64).sqrt();
        let out = rms_norm_rows(&x, &w, eps);
        for i in 0..4 {
            let expected = x[i] as f64 / rms * w[i] as f64;
            assert!((out[i] as f64 - expected).abs() < 1e-6, "{i}: {} vs {expected}", out[i]);
        }
    }

    #[test]
    fn rows_are_normalized_independently_and_scale_invariant() {
        let w = [1.0f32; 3];
        let out = rms_norm_rows(&[1.0, 2.0, 3.0, 10.0, 20.0, 30.0], &w, 0.0);
        for i in 0..3 {
            assert!((out[i] - out[3 + i]).abs() < 1e-6);
        }
        let mean_sq: f32 = out[..3].iter().map(|v| v * v).sum::<f32>() / 3.0;
        assert!((mean_sq - 1.0).abs() < 1e-6);
    }
}
