//! The super-block scheme shared by Q4_K and Q5_K: 256 values in 8 sub-blocks of 32; sub-block `j`
//! has a 6-bit scale `sc[j]` and a 6-bit min `m[j]`, and its value `i` decodes as
//! `d·sc[j]·q − dmin·m[j]` (`d`, `dmin` f16; `q` in 0..=15 for Q4_K, 0..=31 for Q5_K).
//!
//! The 8 pairs are packed into 12 bytes `scales` (ggml's `get_scale_min_k4`):
//! - `j < 4`: `sc = scales[j] & 63`, `m = scales[j + 4] & 63`;
//! - `j ≥ 4`: `sc = (scales[j + 4] & 15) | (scales[j − 4] >> 6) << 4`,
//!   `m = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4`.
//!
//! So bytes 0..4 hold the low 6 bits of sc[0..4] (top 2 bits: high bits of sc[4..8]), bytes 4..8 the
//! low 6 bits of m[0..4] (top 2 bits: high bits of m[4..8]), and bytes 8..12 the low nibbles of
//! sc[4..8] (low half) and m[4..8] (high half).
//!
//! Quantization starts from llama.cpp's `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: a
//! weighted (scale, min) search per sub-block (`fit_affine`, weights `rms + |x|`), 6-bit rounding of
//! the scales and mins against `d = max scale / 63`, `dmin = max min / 63`, then the levels
//! re-rounded against those. The same start is also computed with unit weights, and the better of
//! the two is refined by alternating, while the squared error drops, the least-squares (d, dmin)
//! for the fixed integer scales and levels and, per sub-block, the best of the neighbouring 6-bit
//! (sc, m) pairs (levels re-rounded for each).

use half::f16;

use super::search::{fit_affine, lane_sum, nearest_int, round_small, through_f16, Grid};
use super::QK_K;

/// Sub-block `j`'s (scale, min) from the 12 packed bytes of a Q4_K or Q5_K block.
pub fn get_scale_min_k4(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// Inverse of `get_scale_min_k4` for all 8 sub-blocks (values must be < 64).
pub(super) fn pack_scales_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            out[j] = sc[j];
            out[j + 4] = m[j];
        } else {
            out[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            out[j - 4] |= (sc[j] >> 4) << 6;
            out[j] |= (m[j] >> 4) << 6;
        }
    }
    out
}

/// Decoded (sc, m) of all 8 sub-blocks.
pub(super) fn unpack_scales_mins(scales: &[u8; 12]) -> [(u8, u8); 8] {
    std::array::from_fn(|j| get_scale_min_k4(j, scales))
}

/// A Q4_K/Q5_K super-block before its levels are bit-packed.
pub(super) struct MinsQuant {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    /// Level of each value, in 0..=nmax.
    pub q: [u8; QK_K],
}

/// One candidate encoding; `d` and `dmin` are exactly representable in f16.
#[derive(Clone)]
struct Encoding {
    d: f32,
    dmin: f32,
    sc: [u8; 8],
    m: [u8; 8],
    q: [u8; QK_K],
    err: [f32; 8],
}

/// Rounds sub-block `x` to levels for scale `d·sc` and min `dmin·m` (as the decoder forms them);
/// returns the squared error of the reconstruction.
fn requantize(x: &[f32; 32], d: f32, dmin: f32, sc: u8, m: u8, nmax: i32, q: &mut [u8; 32]) -> f32 {
    let ds = d * sc as f32;
    let dm = dmin * m as f32;
    if ds == 0.0 {
        q.fill(0);
        return lane_sum::<32>(|i| (x[i] + dm) * (x[i] + dm));
    }
    let mut l = [0f32; 32];
    for (l, &v) in l.iter_mut().zip(x) {
        *l = round_small(((v + dm) / ds).clamp(0.0, nmax as f32));
    }
    for (qi, &l) in q.iter_mut().zip(&l) {
        *qi = l as u8;
    }
    lane_sum::<32>(|i| {
        let diff = ds * l[i] - dm - x[i];
        diff * diff
    })
}

fn sub_blocks(x: &[f32; QK_K]) -> &[[f32; 32]] {
    x.as_chunks::<32>().0
}

fn sub_levels(q: &mut [u8; QK_K]) -> &mut [[u8; 32]] {
    q.as_chunks_mut::<32>().0
}

impl Encoding {
    fn new(x: &[f32; QK_K], d: f32, dmin: f32, sc: [u8; 8], m: [u8; 8], nmax: i32) -> Encoding {
        let mut e = Encoding { d, dmin, sc, m, q: [0; QK_K], err: [0.0; 8] };
        for (j, (xs, q)) in sub_blocks(x).iter().zip(sub_levels(&mut e.q)).enumerate() {
            e.err[j] = requantize(xs, d, dmin, sc[j], m[j], nmax, q);
        }
        e
    }

    fn total_err(&self) -> f32 {
        self.err.iter().sum()
    }

    /// Least-squares (d, dmin) for the current integer scales, mins and levels, rounded through f16.
    fn refit_super_scales(&self, x: &[f32; QK_K]) -> (f32, f32) {
        // Minimize Σ (d·a − dmin·b − x)² with a = sc·q, b = m.
        let (mut saa, mut sab, mut sbb, mut sax, mut sbx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (j, xs) in sub_blocks(x).iter().enumerate() {
            let q = &self.q[32 * j..32 * j + 32];
            let (sc, b) = (self.sc[j] as f64, self.m[j] as f64);
            let sq = lane_sum::<32>(|i| q[i] as f32) as f64;
            let sq2 = lane_sum::<32>(|i| q[i] as f32 * q[i] as f32) as f64;
            let sx = lane_sum::<32>(|i| xs[i]) as f64;
            let sxq = lane_sum::<32>(|i| xs[i] * q[i] as f32) as f64;
            saa += sc * sc * sq2;
            sab += sc * sq * b;
            sbb += 32.0 * b * b;
            sax += sc * sxq;
            sbx += sx * b;
        }
        let det = saa * sbb - sab * sab;
        let (d, dmin) = if det > 1e-12 * saa * sbb {
            ((sax * sbb - sab * sbx) / det, (sab * sax - saa * sbx) / det)
        } else if saa > 0.0 {
            // No mins in use: only d matters.
            ((sax + sab * self.dmin as f64) / saa, self.dmin as f64)
        } else {
            (self.d as f64, self.dmin as f64)
        };
        (through_f16(d as f32), through_f16(dmin as f32))
    }

    /// For each sub-block, the best of the (sc, m) pairs within ±1 of the current ones.
    fn repick_sub_scales(&mut self, x: &[f32; QK_K], nmax: i32) {
        let mut trial = [0u8; 32];
        for (j, (xs, q)) in sub_blocks(x).iter().zip(sub_levels(&mut self.q)).enumerate() {
            let (sc0, m0) = (self.sc[j] as i32, self.m[j] as i32);
            for sc in (sc0 - 1).max(0)..=(sc0 + 1).min(63) {
                for m in (m0 - 1).max(0)..=(m0 + 1).min(63) {
                    if (sc, m) == (sc0, m0) {
                        continue;
                    }
                    let err = requantize(xs, self.d, self.dmin, sc as u8, m as u8, nmax, &mut trial);
                    if err < self.err[j] {
                        self.err[j] = err;
                        self.sc[j] = sc as u8;
                        self.m[j] = m as u8;
                        *q = trial;
                    }
                }
            }
        }
    }
}

/// Quantizes one super-block with levels in 0..=nmax, searching sub-block scales on `grid`.
pub(super) fn quantize_with_mins(x: &[f32; QK_K], nmax: i32, grid: Grid) -> MinsQuant {
    // The reference's search weights (rms + |x|) and unit weights (which fit the squared error we
    // measure) each win on part of the blocks; refining the better start costs half as much as
    // refining both and loses under 0.1% of error to it.
    let weighted = start_encoding(x, nmax, grid, true);
    let unweighted = start_encoding(x, nmax, grid, false);
    let better = if unweighted.total_err() < weighted.total_err() { unweighted } else { weighted };
    let best = refine(x, better, nmax);
    MinsQuant {
        d: f16::from_f32(best.d),
        dmin: f16::from_f32(best.dmin),
        scales: pack_scales_mins(&best.sc, &best.m),
        q: best.q,
    }
}

/// llama.cpp's reference choice (`quantize_row_q4_K_ref`), or the same with unit weights in the
/// sub-block search when `reference_weights` is false.
fn start_encoding(x: &[f32; QK_K], nmax: i32, grid: Grid, reference_weights: bool) -> Encoding {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [1f32; 32];
    let mut levels = [0u8; 32];
    for (j, xs) in sub_blocks(x).iter().enumerate() {
        if reference_weights {
            let av_x = (lane_sum::<32>(|i| xs[i] * xs[i]) / 32.0).sqrt();
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
        }
        (scales[j], mins[j]) = fit_affine(xs, &weights, nmax, grid, &mut levels);
    }
    let max_scale = scales.iter().fold(0f32, |a, &s| a.max(s));
    let max_min = mins.iter().fold(0f32, |a, &m| a.max(m));
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = scales.map(|s| nearest_int(inv_scale * s).clamp(0, 63) as u8);
    let m = mins.map(|v| nearest_int(inv_min * v).clamp(0, 63) as u8);
    let d = through_f16(max_scale / 63.0);
    let dmin = through_f16(max_min / 63.0);
    Encoding::new(x, d, dmin, sc, m, nmax)
}

/// Alternates the least-squares (d, dmin) and the per-sub-block (sc, m) re-pick while the squared
/// error drops (three rounds at most: later rounds gain under 0.1%).
fn refine(x: &[f32; QK_K], start: Encoding, nmax: i32) -> Encoding {
    let mut best = start;
    let mut best_err = best.total_err();
    let mut cur = best.clone();
    for _ in 0..3 {
        let (d, dmin) = cur.refit_super_scales(x);
        if !(d.is_finite() && dmin.is_finite()) {
            break;
        }
        cur = Encoding::new(x, d, dmin, cur.sc, cur.m, nmax);
        cur.repick_sub_scales(x, nmax);
        let err = cur.total_err();
        if err < best_err {
            best_err = err;
            best = cur.clone();
        } else {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips() {
        let sc = [0, 1, 17, 63, 32, 47, 5, 63];
        let m = [63, 2, 33, 0, 16, 31, 62, 1];
        let packed = pack_scales_mins(&sc, &m);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &packed), (sc[j], m[j]), "sub-block {j}");
        }
    }
}
