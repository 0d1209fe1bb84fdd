//! Activations quantized to 8 bits per value, so that dot products with quantized weights run on integers.
//!
//! The blocks are ours, not ggml's byte layouts: they never reach a file, so they keep `d` as f32 and carry
//! the sums that the kernels need for the weights' offsets and minimums.

/// 256 activations for K-quant weights: `x ≈ d * qs[i]`, `bsums[g]` = sum of `qs` over the 16 values of
/// group `g` (K-quant minimums and Q6_K's offset of 32 act on 16- and 32-value groups).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

/// 32 activations for 32-block weights: `x ≈ d * qs[i]`; `sum = d * Σ qs` (for Q4_1/Q5_1 minimums).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f32,
    pub sum: f32,
    pub qs: [i8; 32],
}

/// Symmetric 8-bit quantization of one block: `d = max|x| / 127`, `q = round(x / d)`. The error per value
/// is at most `d / 2`.
fn quantize_block(x: &[f32], qs: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in qs.iter_mut().zip(x) {
        *q = round_to_even(v * id).clamp(-127.0, 127.0) as i8;
    }
    d
}

/// `v` rounded to the nearest integer, ties to even (as llama.cpp's `nearest_int`), for |v| < 2^22:
/// adding 1.5 * 2^23 leaves no fraction bits. Plain arithmetic the compiler vectorizes, where
/// `f32::round` is a call into libm per value on baseline x86-64.
fn round_to_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// `x.len()` must be a multiple of 256.
pub fn quantize_q8k(x: &[f32]) -> Vec<BlockQ8K> {
    x.chunks_exact(256)
        .map(|x| {
            let mut b = BlockQ8K { d: 0.0, qs: [0; 256], bsums: [0; 16] };
            b.d = quantize_block(x, &mut b.qs);
            for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = q.iter().map(|&v| v as i16).sum();
            }
            b
        })
        .collect()
}

/// `x.len()` must be a multiple of 32.
pub fn quantize_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    x.chunks_exact(32)
        .map(|x| {
            let mut b = BlockQ8_0 { d: 0.0, sum: 0.0, qs: [0; 32] };
            b.d = quantize_block(x, &mut b.qs);
            b.sum = b.d * b.qs.iter().map(|&v| v as i32).sum::<i32>() as f32;
            b
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for b in quantize_q8k(&x).iter().zip(x.chunks_exact(256)) {
            let (b, x) = b;
            for (q, v) in b.qs.iter().zip(x) {
                assert!((b.d * *q as f32 - v).abs() <= b.d * 0.5 * (1.0 + 1e-5));
            }
            let total: i32 = b.qs.iter().map(|&q| q as i32).sum();
            assert_eq!(b.bsums.iter().map(|&s| s as i32).sum::<i32>(), total);
        }
        for (b, x) in quantize_q8_0(&x).iter().zip(x.chunks_exact(32)) {
            for (q, v) in b.qs.iter().zip(x) {
                assert!((b.d * *q as f32 - v).abs() <= b.d * 0.5 * (1.0 + 1e-5));
            }
        }
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let b = &quantize_q8_0(&[0.0; 32])[0];
        assert_eq!((b.d, b.sum), (0.0, 0.0));
        assert!(b.qs.iter().all(|&q| q == 0));
    }
}
