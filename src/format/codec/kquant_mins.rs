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
//! re-rounded against those. It then alternates two refinements while they lower the squared
//! error: the least-squares (d, dmin) for the fixed integer scales and levels, and, per sub-block,
//! the best of the neighbouring 6-bit (sc, m) pairs (levels re-rounded for each).

use half::f16;

use super::search::{fit_affine, nearest_int, through_f16, Grid};
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

impl Encoding {
    fn total_err(&self) -> f32 {
        self.err.iter().sum()
    }
}

/// Rounds sub-block `x` to levels for scale `d·sc` and min `dmin·m` (as the decoder forms them);
/// returns the squared error of the reconstruction.
fn requantize(x: &[f32], d: f32, dmin: f32, sc: u8, m: u8, nmax: i32, q: &mut [u8]) -> f32 {
    let ds = d * sc as f32;
    let dm = dmin * m as f32;
    let mut err = 0.0;
    if ds == 0.0 {
        q.fill(0);
        for &v in x {
            err += (v + dm) * (v + dm);
        }
        return err;
    }
    for (qi, &v) in q.iter_mut().zip(x) {
        let l = nearest_int((v + dm) / ds).clamp(0, nmax);
        *qi = l as u8;
        let diff = ds * l as f32 - dm - v;
        err += diff * diff;
    }
    err
}

impl Encoding {
    fn new(x: &[f32; QK_K], d: f32, dmin: f32, sc: [u8; 8], m: [u8; 8], nmax: i32) -> Encoding {
        let mut e = Encoding { d, dmin, sc, m, q: [0; QK_K], err: [0.0; 8] };
        for j in 0..8 {
            let r = 32 * j..32 * j + 32;
            e.err[j] = requantize(&x[r.clone()], d, dmin, sc[j], m[j], nmax, &mut e.q[r]);
        }
        e
    }

    /// Least-squares (d, dmin) for the current integer scales, mins and levels, rounded through f16.
    fn refit_super_scales(&self, x: &[f32; QK_K]) -> (f32, f32) {
        // Minimize Σ (d·a − dmin·b − x)² with a = sc·q, b = m.
        let (mut saa, mut sab, mut sbb, mut sax, mut sbx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for j in 0..8 {
            let b = self.m[j] as f64;
            let (mut sa, mut sa2, mut sx, mut sxa) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for i in 32 * j..32 * j + 32 {
                let a = (self.sc[j] as u32 * self.q[i] as u32) as f64;
                let xi = x[i] as f64;
                sa += a;
                sa2 += a * a;
                sx += xi;
                sxa += xi * a;
            }
            saa += sa2;
            sab += sa * b;
            sbb += 32.0 * b * b;
            sax += sxa;
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
        for j in 0..8 {
            let r = 32 * j..32 * j + 32;
            let (sc0, m0) = (self.sc[j] as i32, self.m[j] as i32);
            for sc in (sc0 - 1).max(0)..=(sc0 + 1).min(63) {
                for m in (m0 - 1).max(0)..=(m0 + 1).min(63) {
                    if (sc, m) == (sc0, m0) {
                        continue;
                    }
                    let err =
                        requantize(&x[r.clone()], self.d, self.dmin, sc as u8, m as u8, nmax, &mut trial);
                    if err < self.err[j] {
                        self.err[j] = err;
                        self.sc[j] = sc as u8;
                        self.m[j] = m as u8;
                        self.q[r.clone()].copy_from_slice(&trial);
                    }
                }
            }
        }
    }
}

/// Quantizes one super-block with levels in 0..=nmax, searching sub-block scales on `grid`.
pub(super) fn quantize_with_mins(x: &[f32; QK_K], nmax: i32, grid: Grid) -> MinsQuant {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut levels = [0u8; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
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

    let mut best = Encoding::new(x, d, dmin, sc, m, nmax);
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
        if !(err < best_err) {
            break;
        }
        best_err = err;
        best = cur.clone();
    }
    MinsQuant {
        d: f16::from_f32(best.d),
        dmin: f16::from_f32(best.dmin),
        scales: pack_scales_mins(&best.sc, &best.m),
        q: best.q,
    }
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
