//! Q4_1: 32 values in 20 bytes, `x = d·q + m` with 4-bit `q`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::search::quantize_affine;
use super::{unit, Block, Quantize};

/// Layout (ggml `block_q4_1`): bytes 0..2 `d` (f16); bytes 2..4 `m` (f16, the value of level 0);
/// bytes 4..20 `qs`: byte `j` holds value `j` in its low nibble and value `j + 16` in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ4_1>() == 20);

impl Block<32> for BlockQ4_1 {
    fn dequantize(&self, out: &mut [f32; 32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for j in 0..16 {
            out[j] = (self.qs[j] & 0xF) as f32 * d + m;
            out[j + 16] = (self.qs[j] >> 4) as f32 * d + m;
        }
    }
}

impl Quantize<32> for BlockQ4_1 {
    /// Starts from ggml's `quantize_row_q4_1_ref` (`d = (max − min) / 15`, `m = min`) and keeps a
    /// better (d, m) from `quantize_affine` where it finds one.
    #[inline(always)]
    fn quantize(x: &[f32; 32], ew: Option<&[f32; 32]>) -> Self {
        let mut q = [0u8; 32];
        let (d, m) = quantize_affine(x, ew.unwrap_or(unit()), 15, &mut q);
        Self { d, m, qs: std::array::from_fn(|j| q[j] | (q[j + 16] << 4)) }
    }
}
