//! Portable reference kernels: one weight row against a few tokens' activations, integer dot products per
//! block as the SIMD kernels compute them. Every supported weight type has one here.

use super::activations::{BlockQ8K, BlockQ8_0};
use super::{block_bytes as bytes, RowKernel};
use crate::format::codec::{get_scale_min_k4, BlockQ3K};
use crate::format::GgmlType;

pub(super) fn kernel(ty: GgmlType) -> Option<RowKernel> {
    use GgmlType::*;
    Some(match ty {
        F32 => RowKernel::F32(|w, xs, out| {
            rows_f32(w, xs, out, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        F16 => RowKernel::F32(|w, xs, out| rows_f32(w, xs, out, 2, f16)),
        BF16 => RowKernel::F32(|w, xs, out| {
            rows_f32(w, xs, out, 2, |b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        }),
        Q4_0 => RowKernel::Q8_0(|w, xs, out| rows_q8_0(w, xs, out, bytes::Q4_0, dot_q4_0)),
        Q4_1 => RowKernel::Q8_0(|w, xs, out| rows_q8_0(w, xs, out, bytes::Q4_1, dot_q4_1)),
        Q5_0 => RowKernel::Q8_0(|w, xs, out| rows_q8_0(w, xs, out, bytes::Q5_0, dot_q5_0)),
        Q5_1 => RowKernel::Q8_0(|w, xs, out| rows_q8_0(w, xs, out, bytes::Q5_1, dot_q5_1)),
        Q8_0 => RowKernel::Q8_0(|w, xs, out| rows_q8_0(w, xs, out, bytes::Q8_0, dot_q8_0)),
        Q4_K => RowKernel::Q8K(|w, xs, out| rows_q8k(w, xs, out, bytes::Q4_K, dot_q4k)),
        Q5_K => RowKernel::Q8K(|w, xs, out| rows_q8k(w, xs, out, bytes::Q5_K, dot_q5k)),
        Q6_K => RowKernel::Q8K(|w, xs, out| rows_q8k(w, xs, out, bytes::Q6_K, dot_q6k)),
        Q2_K => RowKernel::Q8K(|w, xs, out| rows_q8k(w, xs, out, bytes::Q2_K, dot_q2k)),
        Q3_K => RowKernel::Q8K(|w, xs, out| rows_q8k(w, xs, out, bytes::Q3_K, dot_q3k)),
        Q8_1 | Q8_K => return None,
    })
}

pub(super) fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn rows_f32(w: &[u8], xs: &[&[f32]], out: &mut [f32], size: usize, value: impl Fn(&[u8]) -> f32) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = w.chunks_exact(size).zip(x.iter()).map(|(b, x)| value(b) * x).sum();
    }
}

fn rows_q8_0(
    w: &[u8],
    xs: &[&[BlockQ8_0]],
    out: &mut [f32],
    block_bytes: usize,
    dot: fn(&[u8], &BlockQ8_0) -> f32,
) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = w.chunks_exact(block_bytes).zip(x.iter()).map(|(b, x)| dot(b, x)).sum();
    }
}

fn rows_q8k(
    w: &[u8],
    xs: &[&[BlockQ8K]],
    out: &mut [f32],
    block_bytes: usize,
    dot: fn(&[u8], &BlockQ8K) -> f32,
) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = w.chunks_exact(block_bytes).zip(x.iter()).map(|(b, x)| dot(b, x)).sum();
    }
}

/// Σ q[i] * x[i] over 32 values given as a function of the index.
fn sum_i32(x: &[i8; 32], q: impl Fn(usize) -> i32) -> i32 {
    (0..32).map(|i| q(i) * x[i] as i32).sum()
}

/// The 4-bit value `i` (0..32) of a 32-block: byte `i % 16`, low nibble for the first half.
fn nibble(qs: &[u8], i: usize) -> i32 {
    (if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 }) as i32
}

fn dot_q4_0(b: &[u8], x: &BlockQ8_0) -> f32 {
    f16(b) * x.d * sum_i32(&x.qs, |i| nibble(&b[2..bytes::Q4_0], i) - 8) as f32
}

fn dot_q4_1(b: &[u8], x: &BlockQ8_0) -> f32 {
    f16(b) * x.d * sum_i32(&x.qs, |i| nibble(&b[4..bytes::Q4_1], i)) as f32 + f16(&b[2..]) * x.sum
}

fn q5_high(b: &[u8], i: usize) -> i32 {
    let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    ((qh >> i) & 1) as i32 * 16
}

fn dot_q5_0(b: &[u8], x: &BlockQ8_0) -> f32 {
    f16(b) * x.d * sum_i32(&x.qs, |i| nibble(&b[6..bytes::Q5_0], i) + q5_high(&b[2..6], i) - 16) as f32
}

fn dot_q5_1(b: &[u8], x: &BlockQ8_0) -> f32 {
    f16(b) * x.d * sum_i32(&x.qs, |i| nibble(&b[8..bytes::Q5_1], i) + q5_high(&b[4..8], i)) as f32
        + f16(&b[2..]) * x.sum
}

fn dot_q8_0(b: &[u8], x: &BlockQ8_0) -> f32 {
    f16(b) * x.d * sum_i32(&x.qs, |i| b[2 + i] as i8 as i32) as f32
}

/// Q4_K/Q5_K block: `w = d * sc[j] * q - dmin * m[j]` for sub-block `j` of 32 values; `q(i)` is the
/// unsigned quantized value of element `i`.
fn dot_k4_like(b: &[u8], x: &BlockQ8K, q: impl Fn(usize) -> i32) -> f32 {
    let (d, dmin) = (f16(b) * x.d, f16(&b[2..]) * x.d);
    let (mut sum_q, mut sum_m) = (0i32, 0i32);
    let scales: &[u8; 12] = b[4..16].try_into().expect("12 scale bytes");
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let s: i32 = (32 * j..32 * j + 32).map(|i| q(i) * x.qs[i] as i32).sum();
        sum_q += sc as i32 * s;
        sum_m += m as i32 * (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32);
    }
    d * sum_q as f32 - dmin * sum_m as f32
}

/// Nibble of element `i` (0..256) in K-quant packing: 64-value chunk `c` uses bytes `32c..32c+32`, low
/// nibbles for its first 32 values, high nibbles for the next 32.
fn k_nibble(qs: &[u8], i: usize) -> i32 {
    let byte = qs[32 * (i / 64) + i % 32];
    (if i % 64 < 32 { byte & 0xF } else { byte >> 4 }) as i32
}

fn dot_q4k(b: &[u8], x: &BlockQ8K) -> f32 {
    dot_k4_like(b, x, |i| k_nibble(&b[16..bytes::Q4_K], i))
}

fn dot_q5k(b: &[u8], x: &BlockQ8K) -> f32 {
    // qh[i % 32] holds the fifth bit of element i at bit i / 32.
    dot_k4_like(b, x, |i| {
        k_nibble(&b[48..bytes::Q5_K], i) | ((((b[16 + i % 32] >> (i / 32)) & 1) as i32) << 4)
    })
}

/// Q6_K: `w = d * sc[i / 16] * (q - 32)` with q 6 bits: 4 low bits in `ql`, 2 high bits in `qh`.
fn dot_q6k(b: &[u8], x: &BlockQ8K) -> f32 {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let mut sum = 0i32;
    for i in 0..256 {
        // Element i: half h (128 values), quarter k (32 values) within the half, l within the quarter.
        let (h, k, l) = (i / 128, i % 128 / 32, i % 32);
        let low = ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2)) & 0xF;
        let high = (qh[32 * h + l] >> (2 * k)) & 3;
        let q = (low | high << 4) as i32 - 32;
        sum += sc[i / 16] as i8 as i32 * q * x.qs[i] as i32;
    }
    f16(&b[208..]) * x.d * sum as f32
}

/// The 2-bit field of element `i` (0..256) in Q2_K/Q3_K packing: bits `2k..2k+2` of
/// `qs[32h + i % 32]`, h = i / 128, k = i / 32 % 4.
fn k_crumb(qs: &[u8], i: usize) -> i32 {
    ((qs[32 * (i / 128) + i % 32] >> (2 * (i / 32 % 4))) & 3) as i32
}

/// Q2_K: `w = d * sc[s] * q - dmin * m[s]` for sub-block `s = i / 16` (the 16 bsums' groups).
fn dot_q2k(b: &[u8], x: &BlockQ8K) -> f32 {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (mut sum_q, mut sum_m) = (0i32, 0i32);
    for (s, (&sm, &bsum)) in scales.iter().zip(&x.bsums).enumerate() {
        let dot: i32 = (16 * s..16 * s + 16).map(|i| k_crumb(qs, i) * x.qs[i] as i32).sum();
        sum_q += (sm & 0xF) as i32 * dot;
        sum_m += (sm >> 4) as i32 * bsum as i32;
    }
    f16(&b[80..]) * x.d * sum_q as f32 - f16(&b[82..]) * x.d * sum_m as f32
}

/// Q3_K: `w = d * sc[i / 16] * q`, q = 2 low bits from `qs` minus 4 where the `hmask` bit is clear.
fn dot_q3k(b: &[u8], x: &BlockQ8K) -> f32 {
    let block: BlockQ3K = bytemuck::pod_read_unaligned(b);
    let mut sum = 0i32;
    for s in 0..16 {
        let dot: i32 = (16 * s..16 * s + 16)
            .map(|i| {
                let high = (block.hmask[i % 32] >> (i / 32)) & 1;
                (k_crumb(&block.qs, i) - 4 * (1 - high as i32)) * x.qs[i] as i32
            })
            .sum();
        sum += block.scale(s) as i32 * dot;
    }
    block.d.to_f32() * x.d * sum as f32
}
