//! Shared pieces of the quantizers: ggml's rounding and the per-group scale searches of
//! `ggml-quants.c` (`make_qkx2_quants`, `make_qx_quants`), re-derived here.
//!
//! Every quantizer evaluates candidate encodings by the squared error of what a decoder would
//! reconstruct, after rounding its scales through f16 exactly as they will be stored. The reference
//! encoding is always among the candidates, so the encoding kept is never worse than llama.cpp's.

use half::f16;

/// ggml's `nearest_int`: round half to even (float-to-int casts saturate, so NaN gives 0, not a panic).
pub(super) fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// `x` as it reads back after being stored as f16.
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

/// Fits `x ≈ scale·q − min` with integer `q` in 0..=nmax and `min ≥ 0`, minimizing the
/// `w`-weighted squared error over a grid of inverse scales, each refined by weighted least squares
/// (llama.cpp's `make_qkx2_quants`, same steps in the same order). Writes the levels to `q` and
/// returns `(scale, min)`.
pub(super) fn fit_affine(x: &[f32], w: &[f32], nmax: i32, grid: Grid, q: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        q.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        q[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += w[i] * diff * diff;
    }
    let mut trial = [0u8; 32];
    let trial = &mut trial[..n];
    for step in 0..=grid.nstep {
        iscale = (grid.rmin + grid.rdelta * step as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = l as u8;
            let l = l as f32;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0;
            for i in 0..n {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                error += w[i] * diff * diff;
            }
            if error < best_error {
                q.copy_from_slice(trial);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Fits `x ≈ scale·(q − nmax)` with integer `q` in 0..2·nmax, minimizing the `w`-weighted squared
/// error over 19 inverse scales around `−nmax / max` (llama.cpp's `make_qx_quants` with explicit
/// weights). The scale is signed: the value of largest magnitude maps to level 0 (−nmax), which uses
/// the extra negative level. Writes the levels to `q` and returns the scale.
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

/// Levels `q` (stored as `l + nmax`, `l` in −nmax..nmax) for `x ≈ d·l`; returns the squared error.
fn requantize_symmetric(x: &[f32], d: f32, nmax: i32, q: &mut [u8]) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0;
    for (qi, &v) in q.iter_mut().zip(x) {
        let l = nearest_int(v * id).clamp(-nmax, nmax - 1);
        *qi = (l + nmax) as u8;
        let diff = d * l as f32 - v;
        err += diff * diff;
    }
    err
}

/// Q4_0 / Q5_0: `x ≈ d·(q − nmax)`, `q` in 0..2·nmax, `d` stored as f16. Candidates: ggml's reference
/// (`d = max / −nmax`), and for each inverse scale `make_qx_quants` tries (unit weights), the
/// least-squares scale of its levels; each is re-rounded at its f16 scale and the one with the
/// smallest squared error is kept. Writes the levels to `q` and returns `d`.
pub(super) fn quantize_symmetric(x: &[f32; 32], nmax: i32, q: &mut [u8; 32]) -> f16 {
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
    for (qi, &v) in q.iter_mut().zip(x) {
        let l = ((v * id + nmax as f32 + 0.5) as i32).clamp(0, 2 * nmax - 1);
        *qi = l as u8;
        let diff = best_d * (l - nmax) as f32 - v;
        best_err += diff * diff;
    }
    if amax < 1e-15 {
        return f16::from_f32(best_d);
    }
    let mut trial = [0u8; 32];
    for k in -9..=9 {
        let iscale = -(nmax as f32 + 0.1 * k as f32) / max;
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            sumlx += v * l;
            suml2 += l * l;
        }
        if suml2 == 0.0 {
            continue;
        }
        let d = through_f16(sumlx / suml2);
        let err = requantize_symmetric(x, d, nmax, &mut trial);
        if err < best_err {
            (best_err, best_d) = (err, d);
            q.copy_from_slice(&trial);
        }
    }
    f16::from_f32(best_d)
}

/// Levels `q` in 0..=nmax for `x ≈ d·q + m`; returns the squared error.
fn requantize_affine(x: &[f32], d: f32, m: f32, nmax: i32, q: &mut [u8]) -> f32 {
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0.0;
    for (qi, &v) in q.iter_mut().zip(x) {
        let l = nearest_int((v - m) * id).clamp(0, nmax);
        *qi = l as u8;
        let diff = d * l as f32 + m - v;
        err += diff * diff;
    }
    err
}

/// Q4_1 / Q5_1: `x ≈ d·q + m`, `q` in 0..=nmax, `d` and `m` stored as f16. Candidates: ggml's
/// reference (`d = (max − min) / nmax`, `m = min`), the unit-weight `fit_affine` search, and the
/// least-squares (d, m) of the better one's levels; each is re-rounded at its f16 (d, m) and the
/// one with the smallest squared error is kept. Writes the levels to `q` and returns `(d, m)`.
pub(super) fn quantize_affine(x: &[f32; 32], nmax: i32, q: &mut [u8; 32]) -> (f16, f16) {
    let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
    let max = x.iter().fold(-f32::MAX, |a, &v| a.max(v));
    // The reference, rounding as ggml does: floor((x − min)/d + 0.5).
    let d_ref = (max - min) / nmax as f32;
    let id = if d_ref != 0.0 { 1.0 / d_ref } else { 0.0 };
    let (d, m) = (through_f16(d_ref), through_f16(min));
    let mut err = 0.0;
    for (qi, &v) in q.iter_mut().zip(x) {
        let l = (((v - min) * id + 0.5) as i32).clamp(0, nmax);
        *qi = l as u8;
        let diff = d * l as f32 + m - v;
        err += diff * diff;
    }
    let mut best = (err, d, m);
    let mut trial = [0u8; 32];
    let mut consider = |d: f32, m: f32, q: &mut [u8; 32], best: &mut (f32, f32, f32)| {
        let (d, m) = (through_f16(d), through_f16(m));
        let err = requantize_affine(x, d, m, nmax, &mut trial);
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
    let (scale, neg_min) = fit_affine(x, &[1.0; 32], nmax, grid, &mut levels);
    consider(scale, -neg_min, q, &mut best);
    if let Some((d, m)) = lsq_affine(x, q) {
        consider(d, m, q, &mut best);
    }
    (f16::from_f32(best.1), f16::from_f32(best.2))
}

/// Least-squares `(d, m)` for `x ≈ d·q + m`, or `None` when all levels are equal.
fn lsq_affine(x: &[f32], q: &[u8]) -> Option<(f32, f32)> {
    let n = x.len() as f64;
    let (mut sq, mut sq2, mut sx, mut sxq) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&v, &l) in x.iter().zip(q) {
        let (v, l) = (v as f64, l as f64);
        sq += l;
        sq2 += l * l;
        sx += v;
        sxq += v * l;
    }
    let det = n * sq2 - sq * sq;
    (det > 0.0).then(|| (((n * sxq - sx * sq) / det) as f32, ((sq2 * sx - sq * sxq) / det) as f32))
}
