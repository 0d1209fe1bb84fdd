//! F32, F16 and BF16 "blocks": one little-endian value each.

use half::f16;

pub(super) fn decode_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.as_chunks::<4>().0.iter().zip(dst) {
        *y = f32::from_le_bytes(*b);
    }
}

pub(super) fn encode_f32(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.as_chunks_mut::<4>().0) {
        *b = x.to_le_bytes();
    }
}

pub(super) fn decode_f16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.as_chunks::<2>().0.iter().zip(dst) {
        *y = f16::from_le_bytes(*b).to_f32();
    }
}

/// Round to nearest even, as ggml's `GGML_FP32_TO_FP16`.
pub(super) fn encode_f16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.as_chunks_mut::<2>().0) {
        *b = f16::from_f32(*x).to_le_bytes();
    }
}

pub(super) fn decode_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.as_chunks::<2>().0.iter().zip(dst) {
        *y = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16);
    }
}

pub(super) fn encode_bf16(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.as_chunks_mut::<2>().0) {
        *b = f32_to_bf16_bits(*x).to_le_bytes();
    }
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even; a NaN stays a (quiet) NaN.
fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties go to the even mantissa (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_to_bf16_bits(-2.0), 0xc000);
        let nan = f32_to_bf16_bits(f32::from_bits(0x7f80_0001));
        assert!(f32::from_bits((nan as u32) << 16).is_nan());
    }
}
