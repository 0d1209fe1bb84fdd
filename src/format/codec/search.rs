//! Shared pieces of the quantizers: ggml's rounding and the per-group scale searches of
//! `ggml-quants.c` (`make_qkx2_quants`, `make_qx_quants`), re-derived here.
//!
//! Every quantizer evaluates candidate encodings by the squared error of what a decoder would
//! reconstruct, after rounding its scales through f16 exactly as they will be stored. The reference
//! encoding is always among the candidates, so the encoding kept is never worse than llama.cpp's
//! (up to the summation order of `fit_affine`, which accumulates in lanes to vectorize).

use half::f16;

/// ggml's `nearest_int`: round half to even, by adding 1.5·2²³ so the FPU rounds into the low
/// mantissa bits (a libm `rint` call per value would dominate the searches). Inputs are clamped to
/// the trick's range first, so any float (NaN included) gives some integer and never a panic.
#[inline(always)]
pub(super) fn nearest_int(x: f32) -> i32 {
    let v = x.clamp(-4_194_303.0, 4_194_303.0) + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// `x` as it reads back after being stored as f16.
#[inline(always)]
pub(super) fn through_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The grid of inverse scales `make_qkx2_quants` tries: `(nmax + rmin + rdelta·k) / (max − min)`, k = 0..=nstep.
#[derive(Clone, Copy)]
pub(super) struct Grid {
    pub rmin: f32,
    pub rdelta: f32,
    pub nstep: i32,
}

/// `v` rounded half to even, for `|v| < 2²²` (the same trick as `nearest_int`, staying in floats
/// so the loops vectorize).
#[inline(always)]
pub(super) fn round_small(v: f32) -> f32 {
    (v + 12_582_912.0) - 12_582_912.0
}

/// What a `fit_affine` search minimizes: the weighted squared error, or the weighted absolute
/// error (llama.cpp's `use_mad`, which its Q2_K reference uses: only the tests' re-derivation of
/// that reference does).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Metric {
    Squared,
    #[cfg(test)]
    Absolute,
}

/// Sum of `f(i)` over `0..N`, accumulated in 8 interleaved lanes so the loop vectorizes (the
/// order differs from a sequential sum only in rounding).
#[inline(always)]
pub(super) fn lane_sum<const N: usize>(mut f: impl FnMut(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    for c in 0..N / 8 {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(8 * c + k);
        }
    }
    acc.iter().sum()
}

/// Fits `x ≈ scale·q − min` with integer `q` in 0..=nmax and `min ≥ 0`, minimizing the
/// `w`-weighted error (`metric`) over a grid of inverse scales, each refined by weighted least squares
/// (llama.cpp's `make_qkx2_quants`: the same steps, with sums accumulated in lanes). Writes the
/// levels to `q` and returns `(scale, min)`.
#[inline(always)]
pub(super) fn fit_affine<const N: usize>(
    x: &[f32; N],
    w: &[f32; N],
    nmax: i32,
    grid: Grid,
    metric: Metric,
    q: &mut [u8; N],
) -> (f32, f32) {
    let mut min = x.iter().fold(x[0], |a, &v| a.min(v));
    let max = x.iter().fold(x[0], |a, &v| a.max(v));
    let sum_w = lane_sum::<N>(|i| w[i]);
    let sum_x = lane_sum::<N>(|i| w[i] * x[i]);
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        q.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let round_levels = |iscale: f32, min: f32, q: &mut [f32; N]| {
        for (l, &v) in q.iter_mut().zip(x) {
            *l = round_small((iscale * (v - min)).clamp(0.0, nmaxf));
        }
    };
    let error = |scale: f32, min: f32, l: &[f32; N]| {
        lane_sum::<N>(|i| {
            let diff = scale * l[i] + min - x[i];
            w[i] * if metric == Metric::Squared { diff * diff } else { diff.abs() }
        })
    };
    let mut levels = [0f32; N];
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    round_levels(iscale, min, &mut levels);
    let mut best_error = error(scale, min, &levels);
    let mut trial = [0f32; N];
    for step in 0..=grid.nstep {
        iscale = (grid.rmin + grid.rdelta * step as f32 + nmaxf) / (max - min);
        round_levels(iscale, min, &mut trial);
        let sum_l = lane_sum::<N>(|i| w[i] * trial[i]);
        let sum_l2 = lane_sum::<N>(|i| w[i] * trial[i] * trial[i]);
        let sum_xl = lane_sum::<N>(|i| w[i] * trial[i] * x[i]);
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let err = error(this_scale, this_min, &trial);
            if err < best_error {
                levels = trial;
                best_error = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    for (qi, &l) in q.iter_mut().zip(&levels) {
        *qi = l as u8;
    }
    (scale, -min)
}

/// Fits `x ≈ scale·(q − nmax)` with integer `q` in 0..2·nmax, minimizing the `w`-weighted squared
/// error over 19 inverse scales around `−nmax / max` (llama.cpp's `make_qx_quants` with explicit
/// weights). The scale is signed: the value of largest magnitude maps to level 0 (−nmax), which uses
/// the extra negative level. Writes the levels to `q` and returns the scale. The encoders run it on
/// all sub-blocks at once (`lanes::fit_symmetric`); this one-sub-block form is what tests check
/// that against.
#[cfg(test)]
pub(super) fn fit_symmetric(x: &[f32], w: &[f32], nmax: i32, q: &mut [u8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        q.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (&v, &wi) in x.iter().zip(w) {
            let l = level(iscale, v) as f32;
            sumlx += wi * v * l;
            suml2 += wi * l * l;
        }
        (sumlx, suml2)
    };
    let nmaxf = nmax as f32;
    let mut best_iscale = -nmaxf / max;
    let (sumlx, suml2) = sums(best_iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for k in (-9..=9).filter(|&k| k != 0) {
        let iscale = -(nmaxf + 0.1 * k as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            best_iscale = iscale;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (level(best_iscale, v) + nmax) as u8;
    }
    scale
}

/// The scale of `x ≈ scale·l`, `l` in −nmax..nmax, by llama.cpp's `make_q3_quants` (with
/// `do_rmse`): levels from `−nmax / max`, then up to 5 passes moving single levels to where the
/// x²-weighted least-squares fit wants them, keeping each move that improves the fit.
#[inline(always)]
pub(super) fn fit_q3(x: &[f32], nmax: i32) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut levels = [0i32; 16];
    let levels = &mut levels[..x.len()];
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *l as f32;
        suml2 += w * (*l * *l) as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (l, &v) in levels.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *l as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * (*l * *l) as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *l {
                    slx += w * v * new_l as f32;
                    sl2 += w * (new_l * new_l) as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        (*l, sumlx, suml2) = (new_l, slx, sl2);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Levels `q` (stored as `l + nmax`, `l` in −nmax..nmax) for `x ≈ d·l`; returns the `w`-weighted
/// squared error.
#[inline(always)]
fn requantize_symmetric(x: &[f32], w: &[f32], d: f32, nmax: i32, q: &mut [u8]) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0;
    for ((qi, &v), &wi) in q.iter_mut().zip(x).zip(w) {
        let l = nearest_int(v * id).clamp(-nmax, nmax - 1);
        *qi = (l + nmax) as u8;
        let diff = d * l as f32 - v;
        err += wi * diff * diff;
    }
    err
}

/// Q4_0 / Q5_0: `x ≈ d·(q − nmax)`, `q` in 0..2·nmax, `d` stored as f16. Candidates: ggml's reference
/// (`d = max / −nmax`), and for each inverse scale `make_qx_quants` tries (weights `w`), the
/// weighted least-squares scale of its levels; each is re-rounded at its f16 scale and the one with
/// the smallest `w`-weighted squared error is kept. Writes the levels to `q` and returns `d`.
#[inline(always)]
pub(super) fn quantize_symmetric(x: &[f32; 32], w: &[f32; 32], nmax: i32, q: &mut [u8; 32]) -> f16 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    // The reference, rounding as ggml does: floor(x/d + nmax + 0.5), capped at 2·nmax − 1.
    let d_ref = max / -(nmax as f32);
    let id = if d_ref != 0.0 { 1.0 / d_ref } else { 0.0 };
    let mut best_d = through_f16(d_ref);
    let mut best_err = 0.0;
    for ((qi, &v), &wi) in q.iter_mut().zip(x).zip(w) {
        let l = ((v * id + nmax as f32 + 0.5) as i32).clamp(0, 2 * nmax - 1);
        *qi = l as u8;
        let diff = best_d * (l - nmax) as f32 - v;
        best_err += wi * diff * diff;
    }
    if amax < 1e-15 {
        return f16::from_f32(best_d);
    }
    let mut trial = [0u8; 32];
    for k in -9..=9 {
        let iscale = -(nmax as f32 + 0.1 * k as f32) / max;
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (&v, &wi) in x.iter().zip(w) {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            sumlx += wi * v * l;
            suml2 += wi * l * l;
        }
        if suml2 == 0.0 {
            continue;
        }
        let d = through_f16(sumlx / suml2);
        let err = requantize_symmetric(x, w, d, nmax, &mut trial);
        if err < best_err {
            (best_err, best_d) = (err, d);
            q.copy_from_slice(&trial);
        }
    }
    f16::from_f32(best_d)
}

/// Levels `q` in 0..=nmax for `x ≈ d·q + m`; returns the `w`-weighted squared error.
#[inline(always)]
fn requantize_affine(x: &[f32], w: &[f32], d: f32, m: f32, nmax: i32, q: &mut [u8]) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0;
    for ((qi, &v), &wi) in q.iter_mut().zip(x).zip(w) {
        let l = nearest_int((v - m) * id).clamp(0, nmax);
        *qi = l as u8;
        let diff = d * l as f32 + m - v;
        err += wi * diff * diff;
    }
    err
}

/// Q4_1 / Q5_1: `x ≈ d·q + m`, `q` in 0..=nmax, `d` and `m` stored as f16. Candidates: ggml's
/// reference (`d = (max − min) / nmax`, `m = min`), the `w`-weighted `fit_affine` search, and the
/// weighted least-squares (d, m) of the better one's levels; each is re-rounded at its f16 (d, m) and
/// the one with the smallest `w`-weighted squared error is kept. Writes the levels to `q` and
/// returns `(d, m)`.
#[inline(always)]
pub(super) fn quantize_affine(x: &[f32; 32], w: &[f32; 32], nmax: i32, q: &mut [u8; 32]) -> (f16, f16) {
    let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
    let max = x.iter().fold(-f32::MAX, |a, &v| a.max(v));
    // The reference, rounding as ggml does: floor((x − min)/d + 0.5).
    let d_ref = (max - min) / nmax as f32;
    let id = if d_ref != 0.0 { 1.0 / d_ref } else { 0.0 };
    let (d, m) = (through_f16(d_ref), through_f16(min));
    let mut err = 0.0;
    for ((qi, &v), &wi) in q.iter_mut().zip(x).zip(w) {
        let l = (((v - min) * id + 0.5) as i32).clamp(0, nmax);
        *qi = l as u8;
        let diff = d * l as f32 + m - v;
        err += wi * diff * diff;
    }
    let mut best = (err, d, m);
    let mut trial = [0u8; 32];
    let mut consider = |d: f32, m: f32, q: &mut [u8; 32], best: &mut (f32, f32, f32)| {
        let (d, m) = (through_f16(d), through_f16(m));
        let err = requantize_affine(x, w, d, m, nmax, &mut trial);
        if err < best.0 {
            *best = (err, d, m);
            q.copy_from_slice(&trial);
        }
    };
    let grid = if nmax == 15 {
        Grid { rmin: -1.0, rdelta: 0.1, nstep: 20 }
    } else {
        Grid { rmin: -0.5, rdelta: 0.1, nstep: 15 }
    };
    let mut levels = [0u8; 32];
    let (scale, neg_min) = fit_affine(x, w, nmax, grid, Metric::Squared, &mut levels);
    consider(scale, -neg_min, q, &mut best);
    if let Some((d, m)) = lsq_affine(x, w, q) {
        consider(d, m, q, &mut best);
    }
    (f16::from_f32(best.1), f16::from_f32(best.2))
}

/// Weighted least-squares `(d, m)` for `x ≈ d·q + m`, or `None` when all levels are equal.
#[inline(always)]
fn lsq_affine(x: &[f32], w: &[f32], q: &[u8]) -> Option<(f32, f32)> {
    let (mut sw, mut sq, mut sq2, mut sx, mut sxq) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for ((&v, &l), &wi) in x.iter().zip(q).zip(w) {
        let (v, l, wi) = (v as f64, l as f64, wi as f64);
        sw += wi;
        sq += wi * l;
        sq2 += wi * l * l;
        sx += wi * v;
        sxq += wi * v * l;
    }
    let det = sw * sq2 - sq * sq;
    (det > 0.0).then(|| (((sw * sxq - sx * sq) / det) as f32, ((sq2 * sx - sq * sxq) / det) as f32))
}

/// `w·sqrt(σ² + x²)` with σ² = 2·mean(x²) over the block: weights `w` tempered towards the values of
/// large magnitude (llama.cpp's search weights with an importance matrix `w`).
#[inline(always)]
pub(super) fn tempered<const N: usize>(x: &[f32; N], w: &[f32; N]) -> [f32; N] {
    let sigma2 = 2.0 * lane_sum::<N>(|i| x[i] * x[i]) / N as f32;
    super::array_of(|i| w[i] * (sigma2 + x[i] * x[i]).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even_and_saturates() {
        for (x, n) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.49, 3), (-7.51, -8), (0.0, 0)]
        {
            assert_eq!(nearest_int(x), n, "{x}");
        }
        assert_eq!(nearest_int(1e30), 4_194_303);
        assert_eq!(nearest_int(-1e30), -4_194_303);
        let _ = nearest_int(f32::NAN);
    }
}
