//! Q5_0: 32 values in 22 bytes, `x = d·(q − 16)` with 5-bit `q`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::search::quantize_symmetric;
use super::{unit, Block, Quantize};

/// Layout (ggml `block_q5_0`): bytes 0..2 `d` (f16); bytes 2..6 `qh`, a little-endian u32 whose bit
/// `j` is bit 4 of value `j`; bytes 6..22 `qs`: byte `j` holds the low 4 bits of value `j` (low
/// nibble) and of value `j + 16` (high nibble).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ5_0>() == 22);

impl Block<32> for BlockQ5_0 {
    fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        let qh = u32::from_le_bytes(self.qh);
        for j in 0..16 {
            let lo = (self.qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
            let hi = (self.qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
            out[j] = (lo as i32 - 16) as f32 * d;
            out[j + 16] = (hi as i32 - 16) as f32 * d;
        }
    }
}

impl Quantize<32> for BlockQ5_0 {
    /// Starts from ggml's `quantize_row_q5_0_ref` (`d = max / −16`) and keeps a better scale from
    /// `quantize_symmetric` where it finds one.
    #[inline(always)]
    fn quantize(x: &[f32; 32], ew: Option<&[f32; 32]>) -> Self {
        let mut q = [0u8; 32];
        let d = quantize_symmetric(x, ew.unwrap_or(unit()), 16, &mut q);
        let (qh, qs) = pack_5bit(&q);
        Self { d, qh, qs }
    }
}

/// Splits 32 five-bit levels into ggml's `qh` (bit 4 of each) and `qs` (low nibbles, j | j+16 << 4).
#[inline(always)]
pub(super) fn pack_5bit(q: &[u8; 32]) -> ([u8; 4], [u8; 16]) {
    let mut qh = 0u32;
    for (j, &l) in q.iter().enumerate() {
        qh |= ((l as u32 >> 4) & 1) << j;
    }
    (qh.to_le_bytes(), std::array::from_fn(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)))
}
