//! Bit-exact layout checks of the ggml block codecs on hand-made blocks: bytes are assembled here
//! from the layouts of ggml-common.h, expected values computed from ggml's dequantization formulas.

use half::f16;
use mixtral_q::format::codec::{dequantize_to_vec, get_scale_min_k4, quantize_to_vec, BlockQ8K, QK_K};
use mixtral_q::format::GgmlType;

fn h(x: f32) -> [u8; 2] {
    let v = f16::from_f32(x);
    assert_eq!(v.to_f32(), x, "{x} must be exact in f16");
    v.to_le_bytes()
}

fn decode(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.block_bytes() * ty.block_len();
    dequantize_to_vec(ty, bytes, n).unwrap()
}

#[test]
fn floats_are_little_endian_ieee() {
    assert_eq!(quantize_to_vec(GgmlType::F32, &[1.0, -2.5]).unwrap(), [0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
    assert_eq!(quantize_to_vec(GgmlType::F16, &[1.0, -2.5]).unwrap(), [0x00, 0x3c, 0x00, 0xc1]);
    assert_eq!(quantize_to_vec(GgmlType::BF16, &[1.0, -2.5]).unwrap(), [0x80, 0x3f, 0x20, 0xc0]);
    assert_eq!(decode(GgmlType::BF16, &[0x80, 0x3f, 0x20, 0xc0]), [1.0, -2.5]);
    assert_eq!(decode(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc1]), [1.0, -2.5]);
}

#[test]
fn q4_0_block() {
    // d = 0.5; byte j: value j = j (low nibble), value j + 16 = 15 − j (high nibble); x = d·(q − 8).
    let mut bytes = h(0.5).to_vec();
    bytes.extend((0..16u8).map(|j| j | (15 - j) << 4));
    let expected: Vec<f32> =
        (0..32).map(|i| if i < 16 { (i as f32 - 8.0) * 0.5 } else { (31 - i) as f32 * 0.5 - 4.0 }).collect();
    assert_eq!(decode(GgmlType::Q4_0, &bytes), expected);
    // The largest magnitude is −4 = d·(0 − 8), so the reference scale is exact and so are the bytes.
    assert_eq!(quantize_to_vec(GgmlType::Q4_0, &expected).unwrap(), bytes);
}

#[test]
fn q4_1_block() {
    // d = 0.25, m = −1.5; value j = 15 − j, value j + 16 = j; x = d·q + m.
    let mut bytes = [h(0.25), h(-1.5)].concat();
    bytes.extend((0..16u8).map(|j| (15 - j) | j << 4));
    let expected: Vec<f32> = (0..32)
        .map(|i| if i < 16 { (15 - i) as f32 * 0.25 - 1.5 } else { (i - 16) as f32 * 0.25 - 1.5 })
        .collect();
    assert_eq!(decode(GgmlType::Q4_1, &bytes), expected);
    assert_eq!(quantize_to_vec(GgmlType::Q4_1, &expected).unwrap(), bytes);
}

/// ggml's qh/qs split of 32 five-bit levels.
fn pack_q5(levels: &[u32; 32]) -> Vec<u8> {
    let qh: u32 = (0..32).map(|j| ((levels[j] >> 4) & 1) << j).sum();
    let mut out = qh.to_le_bytes().to_vec();
    out.extend((0..16).map(|j| ((levels[j] & 0xF) | (levels[j + 16] & 0xF) << 4) as u8));
    out
}

#[test]
fn q5_0_block() {
    // Levels (7j + 3) mod 32; level 0 (value −16·d, the largest magnitude) is at j = 27.
    let levels: [u32; 32] = std::array::from_fn(|j| (7 * j as u32 + 3) % 32);
    let mut bytes = h(0.125).to_vec();
    bytes.extend(pack_q5(&levels));
    // Bit 4 of value 2 (level 17) is bit 2 of qh; value 1 (level 10) has it clear.
    assert_eq!(bytes[2] & 0b110, 0b100);
    let expected: Vec<f32> = levels.iter().map(|&l| (l as f32 - 16.0) * 0.125).collect();
    assert_eq!(decode(GgmlType::Q5_0, &bytes), expected);
    assert_eq!(quantize_to_vec(GgmlType::Q5_0, &expected).unwrap(), bytes);
}

#[test]
fn q5_1_block() {
    // Levels (5j + 1) mod 32 include 0 (j = 19) and 31 (j = 6): min −4, max 11.5, d = 0.5.
    let levels: [u32; 32] = std::array::from_fn(|j| (5 * j as u32 + 1) % 32);
    let mut bytes = [h(0.5), h(-4.0)].concat();
    bytes.extend(pack_q5(&levels));
    let expected: Vec<f32> = levels.iter().map(|&l| l as f32 * 0.5 - 4.0).collect();
    assert_eq!(decode(GgmlType::Q5_1, &bytes), expected);
    assert_eq!(quantize_to_vec(GgmlType::Q5_1, &expected).unwrap(), bytes);
}

#[test]
fn q8_0_and_q8_1_blocks() {
    let qs: [i8; 32] = std::array::from_fn(|j| match j {
        0 => -127,
        31 => 127,
        _ => (j as i32 * 8 - 124) as i8,
    });
    let mut bytes = h(0.0625).to_vec();
    bytes.extend(qs.iter().map(|&q| q as u8));
    let expected: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.0625).collect();
    assert_eq!(decode(GgmlType::Q8_0, &bytes), expected);
    assert_eq!(quantize_to_vec(GgmlType::Q8_0, &expected).unwrap(), bytes);
    // Q8_1 inserts the f16 sum s after d; decoding ignores it.
    let mut q8_1 = [h(0.0625), h(123.0)].concat();
    q8_1.extend(qs.iter().map(|&q| q as u8));
    assert_eq!(decode(GgmlType::Q8_1, &q8_1), expected);
}

/// The 12 scale bytes of Q4_K/Q5_K, written from the layout `get_scale_min_k4` reads.
fn pack_k4_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut b = [0u8; 12];
    for j in 0..4 {
        b[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        b[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
        b[j + 8] = (sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4;
    }
    b
}

const K_SC: [u8; 8] = [1, 2, 3, 4, 33, 47, 63, 16];
const K_M: [u8; 8] = [0, 5, 63, 1, 32, 17, 2, 40];

fn k_expected(d: f32, dmin: f32, levels: &[u32]) -> Vec<f32> {
    (0..QK_K).map(|i| d * K_SC[i / 32] as f32 * levels[i] as f32 - dmin * K_M[i / 32] as f32).collect()
}

fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let num: f64 = x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let den: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn q4_k_block() {
    let scales = pack_k4_scales(&K_SC, &K_M);
    for j in 0..8 {
        assert_eq!(get_scale_min_k4(j, &scales), (K_SC[j], K_M[j]), "sub-block {j}");
    }
    let levels: Vec<u32> = (0..QK_K as u32).map(|i| (5 * i + i / 32) % 16).collect();
    let mut bytes = [h(0.25), h(0.125)].concat();
    bytes.extend(scales);
    for c in 0..4 {
        bytes.extend((0..32).map(|l| (levels[64 * c + l] | levels[64 * c + 32 + l] << 4) as u8));
    }
    let expected = k_expected(0.25, 0.125, &levels);
    assert_eq!(decode(GgmlType::Q4_K, &bytes), expected);
    // Re-quantizing a decoded block finds an encoding at least as close as 1/1000 of its norm.
    let again = decode(GgmlType::Q4_K, &quantize_to_vec(GgmlType::Q4_K, &expected).unwrap());
    assert!(relative_rmse(&expected, &again) < 1e-3, "{}", relative_rmse(&expected, &again));
}

#[test]
fn q5_k_block() {
    let levels: Vec<u32> = (0..QK_K as u32).map(|i| (7 * i + 3 + i / 32) % 32).collect();
    let mut bytes = [h(0.25), h(0.125)].concat();
    bytes.extend(pack_k4_scales(&K_SC, &K_M));
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for c in 0..4 {
        for l in 0..32 {
            let (lo, hi) = (levels[64 * c + l], levels[64 * c + 32 + l]);
            qs[32 * c + l] = ((lo & 0xF) | (hi & 0xF) << 4) as u8;
            qh[l] |= ((lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1)) as u8;
        }
    }
    bytes.extend(qh);
    bytes.extend(qs);
    let expected = k_expected(0.25, 0.125, &levels);
    assert_eq!(decode(GgmlType::Q5_K, &bytes), expected);
    let again = decode(GgmlType::Q5_K, &quantize_to_vec(GgmlType::Q5_K, &expected).unwrap());
    assert!(relative_rmse(&expected, &again) < 1e-3, "{}", relative_rmse(&expected, &again));
}

#[test]
fn q6_k_block() {
    let d = 0.03125;
    let sc: [i8; 16] = [-128, 127, -1, 1, 64, -64, 3, 100, -100, 17, 0, 5, -7, 90, 33, -33];
    // Each sub-block starts with level 0 (−32·d·sc, its largest magnitude), so the reference
    // quantizer recovers the scales exactly.
    let levels: Vec<u32> =
        (0..QK_K as u32).map(|i| if i % 16 == 0 { 0 } else { (11 * i + 7) % 64 }).collect();
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    // ggml's quantize_row_q6_K_ref packing: per 128 values, ql gets values l and l+64 (l < 32) in
    // bytes 0..32 and values l+32 and l+96 in bytes 32..64; qh byte l gets the top 2 bits of
    // values l, l+32, l+64, l+96 in bit pairs 0, 2, 4, 6.
    for half in 0..2 {
        let (q, ql, qh) = (&levels[128 * half..], &mut ql[64 * half..], &mut qh[32 * half..]);
        for l in 0..32 {
            ql[l] = ((q[l] & 0xF) | (q[l + 64] & 0xF) << 4) as u8;
            ql[l + 32] = ((q[l + 32] & 0xF) | (q[l + 96] & 0xF) << 4) as u8;
            qh[l] = (q[l] >> 4 | (q[l + 32] >> 4) << 2 | (q[l + 64] >> 4) << 4 | (q[l + 96] >> 4) << 6) as u8;
        }
    }
    let mut bytes = [ql.as_slice(), &qh, bytemuck::cast_slice(&sc)].concat();
    bytes.extend(h(d));
    let expected: Vec<f32> = (0..QK_K).map(|i| d * sc[i / 16] as f32 * (levels[i] as f32 - 32.0)).collect();
    assert_eq!(decode(GgmlType::Q6_K, &bytes), expected);
    assert_eq!(decode(GgmlType::Q6_K, &quantize_to_vec(GgmlType::Q6_K, &expected).unwrap()), expected);
}

#[test]
fn q2_k_block() {
    let scales: [u8; 16] = std::array::from_fn(|s| ((s as u8 * 5 + 1) % 16) | (((s as u8 * 3) % 16) << 4));
    let qs: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut bytes = [scales.as_slice(), &qs].concat();
    bytes.extend([h(d), h(dmin)].concat());
    // ggml's dequantize_row_q2_K, loop for loop.
    let mut expected = Vec::new();
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                expected.extend((0..16).map(|l| dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml));
            }
        }
    }
    assert_eq!(decode(GgmlType::Q2_K, &bytes), expected);
}

#[test]
fn q3_k_block() {
    let hmask: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(73).wrapping_add(5));
    let qs: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(41).wrapping_add(3));
    // 16 six-bit scales (stored +32): low nibbles in bytes 0..8 (sub-blocks 0..8 low half,
    // 8..16 high half), top 2 bits of sub-block s in bits 2(s/4) of byte 8 + s%4.
    let raw: [u8; 16] = std::array::from_fn(|s| (s as u8 * 13 + 7) % 64);
    let mut scales = [0u8; 12];
    for s in 0..16 {
        scales[s % 8] |= (raw[s] & 0xF) << (4 * (s / 8));
        scales[8 + s % 4] |= (raw[s] >> 4) << (2 * (s / 4));
    }
    let d = 0.75f32;
    let mut bytes = [hmask.as_slice(), &qs, &scales].concat();
    bytes.extend(h(d));
    // ggml's dequantize_row_q3_K, loop for loop.
    let mut expected = Vec::new();
    let (mut is, mut m) = (0, 1u8);
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let dl = d * (raw[is] as i32 - 32) as f32;
                is += 1;
                expected.extend((0..16).map(|l| {
                    let low = ((q[l + 16 * half] >> shift) & 3) as i32;
                    dl * (low - if hmask[l + 16 * half] & m != 0 { 0 } else { 4 }) as f32
                }));
            }
            m <<= 1;
        }
    }
    assert_eq!(decode(GgmlType::Q3_K, &bytes), expected);
}

#[test]
fn q8_k_block_matches_reference_quantizer() {
    // Largest magnitude positive: ggml maps it to −127, so d is negative.
    let x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) * 0.5).collect();
    let bytes = quantize_to_vec(GgmlType::Q8_K, &x).unwrap();
    let block: BlockQ8K = bytemuck::pod_read_unaligned(&bytes);
    let max = 155.0 * 0.5;
    assert_eq!(block.d, 1.0 / (-127.0 / max));
    assert_eq!(block.qs[255], -127);
    for g in 0..16 {
        let sum: i16 = block.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
        assert_eq!(block.bsums[g], sum);
    }
    assert!(relative_rmse(&x, &decode(GgmlType::Q8_K, &bytes)) < 0.005);
}

#[test]
fn unaligned_buffers_work() {
    let x: Vec<f32> = (0..2 * QK_K).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_K, GgmlType::F32, GgmlType::Q8_0] {
        let bytes = quantize_to_vec(ty, &x).unwrap();
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(dequantize_to_vec(ty, &shifted[1..], x.len()).unwrap(), decode(ty, &bytes), "{ty}");
        mixtral_q::format::codec::quantize(ty, &x, &mut shifted[1..]).unwrap();
        assert_eq!(&shifted[1..], bytes.as_slice(), "{ty}");
    }
}
