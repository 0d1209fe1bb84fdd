//! Q5_1: 32 values in 24 bytes, `x = d·q + m` with 5-bit `q`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::q5_0::pack_5bit;
use super::search::quantize_affine;
use super::{unit, Block, Quantize};

/// Layout (ggml `block_q5_1`): bytes 0..2 `d` (f16); bytes 2..4 `m` (f16); bytes 4..8 `qh`, a
/// little-endian u32 whose bit `j` is bit 4 of value `j`; bytes 8..24 `qs`: byte `j` holds the low
/// 4 bits of value `j` (low nibble) and of value `j + 16` (high nibble).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ5_1>() == 24);

impl Block<32> for BlockQ5_1 {
    fn dequantize(&self, out: &mut [f32; 32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let lo = (self.qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
            let hi = (self.qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            out[j] = lo as f32 * d + m;
            out[j + 16] = hi as f32 * d + m;
        }
    }
}

impl Quantize<32> for BlockQ5_1 {
    /// Starts from ggml's `quantize_row_q5_1_ref` (`d = (max − min) / 31`, `m = min`) and keeps a
    /// better (d, m) from `quantize_affine` where it finds one.
    #[inline(always)]
    fn quantize(x: &[f32; 32], ew: Option<&[f32; 32]>) -> Self {
        let mut q = [0u8; 32];
        let (d, m) = quantize_affine(x, ew.unwrap_or(unit()), 31, &mut q);
        let (qh, qs) = pack_5bit(&q);
        Self { d, m, qh, qs }
    }
}
