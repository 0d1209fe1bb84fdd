//! Kernels against each other and against an f64 dot of dequantized weights.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::*;
use crate::format::codec;

/// Every type the engines compute with.
const TYPES: [GgmlType; GgmlType::COMPUTABLE.len()] = crate::model::weights::SUPPORTED_TYPES;

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Random blocks: random bytes for the quantized values and scales, sane f16 block scales.
fn random_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let n = rows * cols;
    let mut w = vec![0u8; rows * ty.bytes_for(cols).unwrap()];
    rng.fill_bytes(&mut w);
    let bb = ty.block_bytes();
    use GgmlType::*;
    for b in w.chunks_exact_mut(bb) {
        match ty {
            F32 => b.copy_from_slice(&rng.random_range(-1f32..1.0).to_le_bytes()),
            F16 => b.copy_from_slice(&f16_bytes(rng.random_range(-1f32..1.0))),
            BF16 => b.copy_from_slice(&((rng.random_range(-1f32..1.0).to_bits() >> 16) as u16).to_le_bytes()),
            Q4_0 | Q5_0 | Q8_0 | Q6_K | Q3_K => {
                let at = match ty {
                    Q6_K => 208,
                    Q3_K => 108,
                    _ => 0,
                };
                b[at..at + 2].copy_from_slice(&f16_bytes(rng.random_range(0.001f32..0.01)));
            }
            Q4_1 | Q5_1 | Q4_K | Q5_K => {
                b[..2].copy_from_slice(&f16_bytes(rng.random_range(0.001f32..0.01)));
                b[2..4].copy_from_slice(&f16_bytes(rng.random_range(-0.01f32..0.01)));
            }
            Q2_K => {
                b[80..82].copy_from_slice(&f16_bytes(rng.random_range(0.001f32..0.01)));
                b[82..84].copy_from_slice(&f16_bytes(rng.random_range(-0.01f32..0.01)));
            }
            _ => unreachable!("no test weights for {ty}"),
        }
    }
    assert_eq!(w.len() / bb * ty.block_len(), n);
    w
}

/// One row dequantized by the codec (written independently of these kernels, after ggml's formulas).
fn dequantize(ty: GgmlType, row: &[u8]) -> Vec<f64> {
    let n = row.len() / ty.block_bytes() * ty.block_len();
    codec::dequantize_to_vec(ty, row, n).unwrap().into_iter().map(f64::from).collect()
}

fn random_x(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2f32..2.0)).collect()
}

/// Widths to test per type: K-quant rows are whole 256-blocks (4096 and 14336 are Mixtral's), 32-block
/// types also get widths like the tiny model's FFN (224) that are not multiples of 256.
fn widths(ty: GgmlType) -> &'static [usize] {
    match ty.block_len() {
        256 => &[256, 4096, 14336],
        32 => &[32, 96, 160, 4096],
        _ => &[100, 4096], // 100: exercises the SIMD tail
    }
}

/// The values the kernels actually multiply: dequantized activations.
fn dequantized_x(x: &QuantizedActivations) -> Vec<f64> {
    match &x.blocks {
        Activations::Q8K(v) => v.iter().flat_map(|b| b.qs.map(|q| b.d as f64 * q as f64)).collect(),
        Activations::Q8_0(v) => v.iter().flat_map(|b| b.qs.map(|q| b.d as f64 * q as f64)).collect(),
        Activations::F32(v) => v.iter().map(|&v| v as f64).collect(),
    }
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

fn abs_dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| (a * b).abs()).sum()
}

/// Scalar kernels against f64 dots of dequantized weights with the original f32 activations. Bound: the
/// activation quantization moves each x_i by at most d_b/2 (d_b = max|x| / 127 of its block b), so the dot
/// moves by at most Σ_b d_b/2 · Σ_{i∈b} |w_i|; f32 accumulation adds a relative 1e-5 of Σ|w_i x_i|.
#[test]
fn scalar_matches_dequantized_f64_dot_within_quantization_bound() {
    let mut rng = StdRng::seed_from_u64(1);
    for ty in TYPES {
        for &cols in widths(ty) {
            let rows = 3;
            let w = random_weights(ty, rows, cols, &mut rng);
            let x = random_x(cols, &mut rng);
            let qx = QuantizedActivations::new(ty, &x).unwrap();
            let mut out = vec![0f32; rows];
            matmul_at(SimdLevel::Scalar, ty, &w, rows, cols, std::slice::from_ref(&qx), &mut out).unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let act_block = match qx.kind() {
                ActivationKind::Q8K => 256,
                ActivationKind::Q8_0 => 32,
                ActivationKind::F32 => 1,
            };
            for (r, row) in w.chunks_exact(w.len() / rows).enumerate() {
                let wd = dequantize(ty, row);
                let exact = dot64(&wd, &x64);
                let quant_err: f64 = if act_block == 1 {
                    0.0
                } else {
                    wd.chunks(act_block)
                        .zip(x.chunks(act_block))
                        .map(|(w, x)| {
                            let d = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                            d / 2.0 * w.iter().map(|v| v.abs()).sum::<f64>()
                        })
                        .sum()
                };
                let bound = quant_err + 1e-5 * abs_dot64(&wd, &x64);
                let err = (out[r] as f64 - exact).abs();
                assert!(
                    err <= bound,
                    "{ty} cols {cols} row {r}: {} vs {exact}, error {err} > bound {bound}",
                    out[r]
                );
                // The bound is not vacuous: the result is far closer to the truth than to zero.
                assert!(bound < 0.2 * abs_dot64(&wd, &x64), "{ty}: bound {bound} too loose to mean anything");
            }
        }
    }
}

/// Every SIMD level against the scalar kernels on the same quantized activations.
#[test]
fn every_simd_level_matches_scalar() {
    let mut rng = StdRng::seed_from_u64(2);
    let levels = SimdLevel::available();
    eprintln!("testing levels {levels:?}");
    for ty in TYPES {
        for &cols in widths(ty) {
            let (rows, n_tok) = (5, 11); // full tiles (4 and 8 tokens) and partial ones
            let w = random_weights(ty, rows, cols, &mut rng);
            let xs: Vec<_> = (0..n_tok)
                .map(|_| QuantizedActivations::new(ty, &random_x(cols, &mut rng)).unwrap())
                .collect();
            let mut want = vec![0f32; rows * n_tok];
            matmul_at(SimdLevel::Scalar, ty, &w, rows, cols, &xs, &mut want).unwrap();
            for &level in &levels[1..] {
                let mut got = vec![0f32; rows * n_tok];
                matmul_at(level, ty, &w, rows, cols, &xs, &mut got).unwrap();
                for (t, x) in xs.iter().enumerate() {
                    let x64 = dequantized_x(x);
                    for (r, row) in w.chunks_exact(w.len() / rows).enumerate() {
                        let scale = abs_dot64(&dequantize(ty, row), &x64);
                        let (g, s) = (got[t * rows + r], want[t * rows + r]);
                        assert!(
                            ((g - s) as f64).abs() <= 1e-5 * scale,
                            "{ty} {level:?} cols {cols} row {r} token {t}: {g} vs scalar {s} (scale {scale})"
                        );
                    }
                }
            }
        }
    }
}

/// Batched products equal one matvec per token, at every level, including the parallel path: exactly
/// where the same kernels run, within float rounding where a many-token kernel takes over (Q4_K
/// to Q6_K at the AVX-512 level sum in another order).
#[test]
fn matmul_equals_matvec_per_token() {
    let mut rng = StdRng::seed_from_u64(3);
    for (ty, rows, cols) in [
        (GgmlType::Q4_K, 2001, 256),
        (GgmlType::Q4_K, 37, 4096),
        (GgmlType::Q5_K, 300, 512),
        (GgmlType::Q6_K, 300, 512),
        (GgmlType::Q8_0, 37, 160),
        (GgmlType::F16, 9, 96),
    ] {
        let w = random_weights(ty, rows, cols, &mut rng);
        let xs: Vec<_> =
            (0..7).map(|_| QuantizedActivations::new(ty, &random_x(cols, &mut rng)).unwrap()).collect();
        for level in SimdLevel::available() {
            let mut batched = vec![0f32; rows * xs.len()];
            matmul_at(level, ty, &w, rows, cols, &xs, &mut batched).unwrap();
            for (t, x) in xs.iter().enumerate() {
                let mut single = vec![0f32; rows];
                matmul_at(level, ty, &w, rows, cols, std::slice::from_ref(x), &mut single).unwrap();
                let batched = &batched[t * rows..(t + 1) * rows];
                if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
                    && level == SimdLevel::Avx512
                {
                    let x64 = dequantized_x(x);
                    for (r, row) in w.chunks_exact(w.len() / rows).enumerate() {
                        let scale = abs_dot64(&dequantize(ty, row), &x64);
                        let (b, s) = (batched[r], single[r]);
                        assert!(((b - s) as f64).abs() <= 1e-5 * scale, "{ty} token {t} row {r}: {b} vs {s}");
                    }
                } else {
                    assert_eq!(batched, &single[..], "{ty} {level:?} token {t}");
                }
            }
        }
    }
}

#[test]
fn public_entry_points_use_the_active_level() {
    let mut rng = StdRng::seed_from_u64(4);
    let (ty, rows, cols) = (GgmlType::Q6_K, 3, 512);
    let w = random_weights(ty, rows, cols, &mut rng);
    let x = QuantizedActivations::new(ty, &random_x(cols, &mut rng)).unwrap();
    let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
    matvec(ty, &w, rows, cols, &x, &mut a).unwrap();
    matmul(ty, &w, rows, cols, std::slice::from_ref(&x), &mut b).unwrap();
    assert_eq!(a, b);
    assert!(["scalar", "avx2", "avx512"].contains(&simd_level()));
}

/// Products sharing one parallel pass give exactly what each gives alone, and any bad one is an error.
#[test]
fn matvec_many_equals_separate_matvecs() {
    let mut rng = StdRng::seed_from_u64(7);
    let shapes = [
        (GgmlType::Q4_K, 2001, 256),
        (GgmlType::Q8_0, 37, 160),
        (GgmlType::F16, 9, 96),
        (GgmlType::Q6_K, 300, 512),
    ];
    let ws: Vec<Vec<u8>> =
        shapes.iter().map(|&(ty, rows, cols)| random_weights(ty, rows, cols, &mut rng)).collect();
    let xs: Vec<QuantizedActivations> = shapes
        .iter()
        .map(|&(ty, _, cols)| QuantizedActivations::new(ty, &random_x(cols, &mut rng)).unwrap())
        .collect();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, rows, _)| vec![0f32; rows]).collect();
    let mut products: Vec<MatVec> = shapes
        .iter()
        .zip(&ws)
        .zip(&xs)
        .zip(&mut outs)
        .map(|(((&(ty, rows, cols), w), x), out)| MatVec { ty, w, rows, cols, x, out })
        .collect();
    matvec_many(&mut products).unwrap();
    for (((&(ty, rows, cols), w), x), got) in shapes.iter().zip(&ws).zip(&xs).zip(&outs) {
        let mut want = vec![0f32; rows];
        matvec(ty, w, rows, cols, x, &mut want).unwrap();
        assert_eq!(got, &want, "{ty}");
    }
    let (ty, rows, cols) = shapes[0];
    let mut short = vec![0f32; rows - 1];
    let bad = MatVec { ty, w: &ws[0], rows, cols, x: &xs[0], out: &mut short };
    assert!(matvec_many(&mut [bad]).is_err(), "output length");
}

#[test]
fn wrong_sizes_and_types_are_errors() {
    let mut rng = StdRng::seed_from_u64(5);
    let ty = GgmlType::Q4_K;
    let w = random_weights(ty, 2, 512, &mut rng);
    let x = QuantizedActivations::new(ty, &random_x(512, &mut rng)).unwrap();
    let mut out = vec![0f32; 2];
    assert!(matvec(ty, &w, 2, 512, &x, &mut out).is_ok());
    assert!(matvec(ty, &w[1..], 2, 512, &x, &mut out).is_err(), "short weights");
    assert!(matvec(ty, &w, 3, 512, &x, &mut [0f32; 3]).is_err(), "rows beyond the weights");
    assert!(matvec(ty, &w, 2, 512, &x, &mut [0f32; 3]).is_err(), "output length");
    assert!(matvec(ty, &w, 4, 256, &x, &mut [0f32; 4]).is_err(), "activation length");
    assert!(matvec(ty, &w, 1, 1000, &x, &mut [0f32; 1]).is_err(), "partial block");
    assert!(matvec(ty, &w, usize::MAX, 512, &x, &mut out).is_err(), "overflowing size");
    let x6 = QuantizedActivations::new(GgmlType::Q6_K, &random_x(512, &mut rng)).unwrap();
    assert!(matvec(ty, &w, 2, 512, &x6, &mut out).is_ok(), "Q6_K activations are Q8_K like Q4_K's");
    let x8 = QuantizedActivations::new(GgmlType::Q8_0, &random_x(512, &mut rng)).unwrap();
    assert!(matvec(ty, &w, 2, 512, &x8, &mut out).is_err(), "Q8_0 activations for Q4_K weights");
    assert!(matmul(ty, &w, 2, 512, &[x.clone(), x8], &mut [0f32; 4]).is_err(), "one bad token");
    assert!(QuantizedActivations::new(ty, &[0.0; 100]).is_err(), "partial activation block");
    // Q8_1 is an activation format only: no kernel takes it as weights.
    assert!(QuantizedActivations::new(GgmlType::Q8_1, &[0.0; 256]).is_err(), "unsupported type");
    assert!(matvec(GgmlType::Q8_1, &w, 2, 256, &x, &mut out).is_err(), "unsupported type");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn word_wise_k4_scale_unpacking_matches_the_reference() {
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..1000 {
        let mut q = [0u8; 12];
        rng.fill_bytes(&mut q);
        let (sc, m) = x86::k4_scales_mins(&q);
        for j in 0..8 {
            assert_eq!((sc[j], m[j]), codec::get_scale_min_k4(j, &q), "{q:?} sub-block {j}");
        }
    }
}
