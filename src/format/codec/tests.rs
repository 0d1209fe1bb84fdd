//! Round-trip error bounds for every type, edge-case rows, and the quality comparison against
//! reimplementations of llama.cpp's reference quantizers.

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::kquant_mins::pack_scales_mins;
use super::search::{fit_affine, fit_q3, fit_symmetric, nearest_int, Grid, Metric};
use super::*;

/// Every type `quantize` encodes.
fn quantizable() -> impl Iterator<Item = GgmlType> {
    GgmlType::ALL.into_iter().filter(|&t| can_quantize(t))
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller; 1 - u keeps the logarithm finite.
    let u: f32 = 1.0 - rng.random::<f32>();
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn gaussian_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| gaussian(&mut rng)).collect()
}

/// Student-t with 3 degrees of freedom: heavy tails, like the outliers of real weight matrices.
fn heavy_tailed_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z = gaussian(&mut rng);
            let chi2: f32 = (0..3).map(|_| gaussian(&mut rng).powi(2)).sum();
            z / (chi2 / 3.0).sqrt()
        })
        .collect()
}

fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
    let num: f64 = x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let bytes = quantize_to_vec(ty, x).unwrap();
    assert_eq!(bytes.len(), ty.bytes_for(x.len()).unwrap());
    dequantize_to_vec(ty, &bytes, x.len()).unwrap()
}

/// Relative RMSE bounds on N(0, 1) data, about 10% above what each type measures (regression guards).
fn gaussian_bound(ty: GgmlType) -> f64 {
    use GgmlType::*;
    match ty {
        F32 => 0.0,
        F16 => 2.5e-4,
        BF16 => 1.8e-3,
        Q8_0 => 0.006,
        Q8_K => 0.0087,
        Q6_K => 0.0195,
        Q5_K | Q5_1 => 0.038,
        Q5_0 => 0.045,
        Q4_K | Q4_1 => 0.075,
        Q4_0 => 0.092,
        Q3_K => 0.16,
        Q2_K => 0.29,
        _ => panic!("no error bound for {ty}"),
    }
}

#[test]
fn round_trip_error_is_bounded_for_every_type() {
    let x = gaussian_vec(8 * QK_K, 1);
    for ty in quantizable() {
        let e = rel_rmse(&x, &round_trip(ty, &x));
        println!("{ty}: relative RMSE {e:.5} on N(0,1)");
        assert!(e <= gaussian_bound(ty), "{ty}: relative RMSE {e} > {}", gaussian_bound(ty));
    }
}

#[test]
fn edge_case_rows_decode_finite_and_close() {
    let n = 2 * QK_K;
    let g = gaussian_vec(n, 2);
    let rows: Vec<(&str, Vec<f32>, f64)> = vec![
        ("zeros", vec![0.0; n], 0.0),
        ("constant", vec![0.75; n], 0.01),
        ("negative constant", vec![-3.0; n], 0.01),
        ("negative only", g.iter().map(|v| -v.abs() - 0.1).collect(), 0.12),
        ("positive only", g.iter().map(|v| v.abs() + 0.1).collect(), 0.12),
        ("huge", g.iter().map(|v| v * 2000.0).collect(), 0.12),
        ("tiny", g.iter().map(|v| v * 0.01).collect(), 0.12),
        ("one outlier", g.iter().enumerate().map(|(i, v)| if i == 77 { 500.0 } else { *v }).collect(), 0.12),
    ];
    for ty in quantizable() {
        for (name, x, bound) in &rows {
            let y = round_trip(ty, x);
            assert!(y.iter().all(|v| v.is_finite()), "{ty} {name}: non-finite output");
            if x.iter().all(|&v| v == 0.0) {
                assert!(y.iter().all(|&v| v == 0.0), "{ty} {name}: zeros must decode to zeros");
                continue;
            }
            // Rows as spread as a Gaussian one may lose as much as the type does on N(0, 1) (the
            // 2- and 3-bit types lose more than 0.12 there).
            let bound = if *bound >= 0.12 { bound.max(gaussian_bound(ty)) } else { *bound };
            let e = rel_rmse(x, &y);
            assert!(e <= bound, "{ty} {name}: relative RMSE {e} > {bound}");
        }
    }
}

#[test]
fn wrong_lengths_are_errors() {
    for ty in GgmlType::ALL {
        let n = 2 * ty.block_len();
        let bytes = ty.bytes_for(n).unwrap();
        let mut out = vec![0f32; n];
        assert!(dequantize(ty, &vec![0u8; bytes + 1], &mut out).is_err(), "{ty}");
        assert!(dequantize(ty, &vec![0u8; bytes - 1], &mut out).is_err(), "{ty}");
        assert!(dequantize(ty, &vec![0u8; bytes], &mut out).is_ok(), "{ty}");
        if ty.block_len() > 1 {
            assert!(dequantize_to_vec(ty, &vec![0u8; bytes], n + 1).is_err(), "{ty}");
            assert!(quantize_to_vec(ty, &vec![0.0; n - 1]).is_err(), "{ty}");
        }
        let mut dst = vec![0u8; bytes + 2];
        if can_quantize(ty) {
            assert!(quantize(ty, &vec![0.0; n], &mut dst).is_err(), "{ty}");
            assert!(quantize(ty, &vec![0.0; n], &mut dst[..bytes]).is_ok(), "{ty}");
        } else {
            assert!(quantize(ty, &vec![0.0; n], &mut dst[..bytes]).is_err(), "{ty}");
        }
    }
}

#[test]
fn non_finite_inputs_do_not_panic() {
    let mut x = gaussian_vec(QK_K, 3);
    x[5] = f32::NAN;
    x[9] = f32::INFINITY;
    x[10] = f32::NEG_INFINITY;
    for ty in quantizable() {
        let _ = round_trip(ty, &x);
    }
}

// ---- llama.cpp's reference quantizers, re-derived (ggml-quants.c, `quantize_row_*_ref`) ----

/// `quantize_row_q4_K_ref` (nmax 15) / `quantize_row_q5_K_ref` (nmax 31), returned decoded.
fn reference_mins_kquant(x: &[f32], nmax: i32, grid: Grid) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xb in x.chunks_exact(QK_K) {
        let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
        let mut levels = [0u8; 32];
        for j in 0..8 {
            let xs: &[f32; 32] = xb[32 * j..32 * j + 32].try_into().unwrap();
            let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
            let w = xs.map(|v| av_x + v.abs());
            (scales[j], mins[j]) = fit_affine(xs, &w, nmax, grid, Metric::Squared, &mut levels);
        }
        let max_scale = scales.iter().fold(0f32, |a, &s| a.max(s));
        let max_min = mins.iter().fold(0f32, |a, &m| a.max(m));
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let sc = scales.map(|s| nearest_int(inv_scale * s).min(63) as u8);
        let m = mins.map(|v| nearest_int(inv_min * v).min(63) as u8);
        // Round trip the packed scales, as the reference reads them back with get_scale_min_k4.
        let packed = pack_scales_mins(&sc, &m);
        let d = f16::from_f32(max_scale / 63.0).to_f32();
        let dmin = f16::from_f32(max_min / 63.0).to_f32();
        for j in 0..8 {
            let (sc, m) = get_scale_min_k4(j, &packed);
            let (ds, dm) = (d * sc as f32, dmin * m as f32);
            for &v in &xb[32 * j..32 * j + 32] {
                let l = if ds == 0.0 { 0 } else { nearest_int((v + dm) / ds).clamp(0, nmax) };
                out.push(ds * l as f32 - dm);
            }
        }
    }
    out
}

/// `quantize_row_q2_K_ref`, returned decoded.
fn reference_q2_k(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    let grid = Grid { rmin: -0.5, rdelta: 0.1, nstep: 15 };
    for xb in x.chunks_exact(QK_K) {
        let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
        let mut levels = [0u8; 16];
        for j in 0..16 {
            let xs: &[f32; 16] = xb[16 * j..16 * j + 16].try_into().unwrap();
            let w = xs.map(f32::abs);
            (scales[j], mins[j]) = fit_affine(xs, &w, 3, grid, Metric::Absolute, &mut levels);
        }
        let max_scale = scales.iter().fold(0f32, |a, &s| a.max(s));
        let max_min = mins.iter().fold(0f32, |a, &m| a.max(m));
        let (sc, d) = if max_scale > 0.0 {
            (scales.map(|s| nearest_int(15.0 / max_scale * s)), f16::from_f32(max_scale / 15.0).to_f32())
        } else {
            ([0; 16], 0.0)
        };
        let (m, dmin) = if max_min > 0.0 {
            (mins.map(|v| nearest_int(15.0 / max_min * v)), f16::from_f32(max_min / 15.0).to_f32())
        } else {
            ([0; 16], 0.0)
        };
        for j in 0..16 {
            let (ds, dm) = (d * sc[j] as f32, dmin * m[j] as f32);
            for &v in &xb[16 * j..16 * j + 16] {
                let l = if ds == 0.0 { 0 } else { nearest_int((v + dm) / ds).clamp(0, 3) };
                out.push(ds * l as f32 - dm);
            }
        }
    }
    out
}

/// `quantize_row_q3_K_ref`, returned decoded.
fn reference_q3_k(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xb in x.chunks_exact(QK_K) {
        let scales: [f32; 16] = std::array::from_fn(|j| fit_q3(&xb[16 * j..16 * j + 16], 4));
        let max_scale = scales.iter().fold(0f32, |a, &s| if s.abs() > a.abs() { s } else { a });
        if max_scale == 0.0 {
            out.extend(std::iter::repeat_n(0.0, QK_K));
            continue;
        }
        let iscale = -32.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale).to_f32();
        for j in 0..16 {
            let ds = d * nearest_int(iscale * scales[j]).clamp(-32, 31) as f32;
            for &v in &xb[16 * j..16 * j + 16] {
                let l = if ds == 0.0 { 0 } else { nearest_int(v / ds).clamp(-4, 3) };
                out.push(ds * l as f32);
            }
        }
    }
    out
}

/// `quantize_row_q6_K_ref`, returned decoded.
fn reference_q6_k(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xb in x.chunks_exact(QK_K) {
        let mut scales = [0f32; 16];
        let mut levels = [0u8; 16];
        for s in 0..16 {
            let xs = &xb[16 * s..16 * s + 16];
            let w: Vec<f32> = xs.iter().map(|v| v * v).collect();
            scales[s] = fit_symmetric(xs, &w, 32, &mut levels);
        }
        let max_scale = scales.iter().fold(0f32, |a, &s| if s.abs() > a.abs() { s } else { a });
        if max_scale.abs() < 1e-15 {
            out.extend(std::iter::repeat_n(0.0, QK_K));
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale).to_f32();
        for s in 0..16 {
            let ds = d * nearest_int(iscale * scales[s]).min(127) as f32;
            for &v in &xb[16 * s..16 * s + 16] {
                let l = if ds == 0.0 { 0 } else { nearest_int(v / ds).clamp(-32, 31) };
                out.push(ds * l as f32);
            }
        }
    }
    out
}

/// `quantize_row_q4_0_ref` (nmax 8) / `quantize_row_q5_0_ref` (nmax 16), returned decoded.
fn reference_symmetric(x: &[f32], nmax: i32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xb in x.chunks_exact(32) {
        let max = xb.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        let d = max / -(nmax as f32);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d).to_f32();
        for &v in xb {
            let q = ((v * id + nmax as f32 + 0.5) as i32).min(2 * nmax - 1);
            out.push((q - nmax) as f32 * d16);
        }
    }
    out
}

/// `quantize_row_q4_1_ref` (nmax 15) / `quantize_row_q5_1_ref` (nmax 31), returned decoded.
fn reference_affine(x: &[f32], nmax: i32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xb in x.chunks_exact(32) {
        let min = xb.iter().fold(f32::MAX, |a, &v| a.min(v));
        let max = xb.iter().fold(-f32::MAX, |a, &v| a.max(v));
        let d = (max - min) / nmax as f32;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (d16, m16) = (f16::from_f32(d).to_f32(), f16::from_f32(min).to_f32());
        for &v in xb {
            let q = (((v - min) * id + 0.5) as i32).min(nmax);
            out.push(q as f32 * d16 + m16);
        }
    }
    out
}

/// `quantize_row_q8_0_ref`, returned decoded.
fn reference_q8_0(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xb in x.chunks_exact(32) {
        let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d).to_f32();
        out.extend(xb.iter().map(|v| (v * id).round() * d16));
    }
    out
}

fn reference(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    use GgmlType::*;
    match ty {
        Q4_0 => reference_symmetric(x, 8),
        Q5_0 => reference_symmetric(x, 16),
        Q4_1 => reference_affine(x, 15),
        Q5_1 => reference_affine(x, 31),
        Q8_0 => reference_q8_0(x),
        Q4_K => reference_mins_kquant(x, 15, Grid { rmin: -1.0, rdelta: 0.1, nstep: 20 }),
        Q5_K => reference_mins_kquant(x, 31, Grid { rmin: -0.5, rdelta: 0.1, nstep: 15 }),
        Q6_K => reference_q6_k(x),
        Q3_K => reference_q3_k(x),
        Q2_K => reference_q2_k(x),
        _ => panic!("no reference quantizer for {ty}"),
    }
}

#[test]
fn quantizers_beat_llama_cpp_reference() {
    use GgmlType::*;
    let n = 64 * QK_K;
    let data = [("N(0,1)", gaussian_vec(n, 10)), ("Student-t(3)", heavy_tailed_vec(n, 11))];
    for (name, x) in &data {
        for ty in [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0] {
            let ours = rel_rmse(x, &round_trip(ty, x));
            let theirs = rel_rmse(x, &reference(ty, x));
            println!("{ty} on {name}: relative RMSE ours {ours:.5}, llama.cpp reference {theirs:.5}");
            assert!(ours <= theirs, "{ty} on {name}: ours {ours} > reference {theirs}");
        }
    }
}

/// Σ imp·(y − x)² over rows of `imp.len()` values.
fn weighted_error(x: &[f32], y: &[f32], imp: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .enumerate()
        .map(|(i, (&a, &b))| imp[i % imp.len()] as f64 * (a as f64 - b as f64).powi(2))
        .sum()
}

#[test]
fn importance_weights_lower_the_weighted_error() {
    const COLS: usize = 1024;
    let x = gaussian_vec(8 * COLS, 5);
    // Column importances over two orders of magnitude, as activations' mean squares spread in models.
    let mut rng = StdRng::seed_from_u64(6);
    let imp: Vec<f32> = (0..COLS).map(|_| (rng.random::<f32>() * 5.0).exp()).collect();
    for ty in quantizable().filter(|t| t.block_len() > 1 && *t != GgmlType::Q8_K) {
        let plain = round_trip(ty, &x);
        let mut bytes = vec![0u8; ty.bytes_for(x.len()).unwrap()];
        quantize_weighted(ty, &x, &imp, &mut bytes).unwrap();
        let weighted = dequantize_to_vec(ty, &bytes, x.len()).unwrap();
        if ty == GgmlType::Q8_0 {
            assert_eq!(weighted, plain, "Q8_0 ignores the importance");
            continue;
        }
        let ratio = weighted_error(&x, &weighted, &imp) / weighted_error(&x, &plain, &imp);
        println!("{ty}: importance-weighted error {ratio:.3} of the plain encoding's");
        assert!(ratio < 0.9, "{ty}: weighted error ratio {ratio}");
    }
}

#[test]
fn bad_importance_is_an_error() {
    let x = gaussian_vec(2 * QK_K, 7);
    let mut out = vec![0u8; GgmlType::Q4_K.bytes_for(x.len()).unwrap()];
    for imp in [vec![1.0; 100], vec![1.0; 3 * QK_K], vec![], vec![-1.0; QK_K], vec![f32::NAN; QK_K]] {
        assert!(quantize_weighted(GgmlType::Q4_K, &x, &imp, &mut out).is_err(), "{} values", imp.len());
    }
    // Zero importance (a column never active) is allowed and still gives finite values.
    quantize_weighted(GgmlType::Q4_K, &x, &[0.0; QK_K], &mut out).unwrap();
    assert!(dequantize_to_vec(GgmlType::Q4_K, &out, x.len()).unwrap().iter().all(|v| v.is_finite()));
}
