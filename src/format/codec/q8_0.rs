//! Q8_0 (32 values in 34 bytes, `x = d·q`) and Q8_1 (36 bytes, the same plus a stored sum).

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::search::{nearest_int, through_f16};
use super::{Block, Quantize, ValueWeights};

/// Layout (ggml `block_q8_0`): bytes 0..2 `d` (f16); bytes 2..34 `qs`, value `j` as i8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// Layout (ggml `block_q8_1`): bytes 0..2 `d` (f16); bytes 2..4 `s` (f16, `d·Σq`, used by dot
/// products only); bytes 4..36 `qs`, value `j` as i8.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; 32],
}

const _: () = assert!(size_of::<BlockQ8_0>() == 34 && size_of::<BlockQ8_1>() == 36);

impl Block<32> for BlockQ8_0 {
    fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for (y, &q) in out.iter_mut().zip(&self.qs) {
            *y = q as f32 * d;
        }
    }
}

impl Block<32> for BlockQ8_1 {
    fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for (y, &q) in out.iter_mut().zip(&self.qs) {
            *y = q as f32 * d;
        }
    }
}

impl Quantize<32> for BlockQ8_0 {
    /// Measured 20% slower compiled for AVX2 (`encode_blocks`).
    const AVX2_PAYS: bool = false;
    const VALUE_WEIGHTS: ValueWeights = ValueWeights::Magnitude;
    /// As llama.cpp does, Q8_0 ignores an importance matrix: on the demo model (measured as for
    /// `ValueWeights`) our imatrix raised its KL from 0.000555 to 0.000592.
    const TAKES_IMPORTANCE: bool = false;

    #[inline(always)]
    fn quantize(x: &[f32; 32], ew: Option<&[f32; 32]>) -> Self {
        let w = &Self::VALUE_WEIGHTS.or_given(ew, x);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut best = Self { d: f16::from_f32(d), qs: x.map(|v| (v * id).round() as i8) };
        let best_err = error(x, w, &best);
        let (sxq, sqq) = x.iter().zip(&best.qs).zip(w).fold((0f32, 0f32), |(a, b), ((&v, &q), &wi)| {
            let q = q as f32;
            (a + wi * v * q, b + wi * q * q)
        });
        if sqq > 0.0 {
            let d = through_f16(sxq / sqq);
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let trial =
                Self { d: f16::from_f32(d), qs: x.map(|v| nearest_int(v * id).clamp(-127, 127) as i8) };
            if error(x, w, &trial) < best_err {
                best = trial;
            }
        }
        best
    }
}

/// The `w`-weighted squared error of `b` against `x`.
#[inline(always)]
fn error(x: &[f32; 32], w: &[f32; 32], b: &BlockQ8_0) -> f32 {
    let d = b.d.to_f32();
    x.iter().zip(&b.qs).zip(w).map(|((&v, &q), &wi)| wi * (q as f32 * d - v) * (q as f32 * d - v)).sum()
}
