//! Q4_0: 32 values in 18 bytes, `x = d·(q − 8)` with 4-bit `q`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::search::quantize_symmetric;
use super::{Block, Quantize, ValueWeights};

/// Layout (ggml `block_q4_0`): bytes 0..2 `d` (f16); bytes 2..18 `qs`: byte `j` holds value `j` in
/// its low nibble and value `j + 16` in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);

impl Block<32> for BlockQ4_0 {
    fn dequantize(&self, out: &mut [f32; 32]) {
        let d = self.d.to_f32();
        for j in 0..16 {
            out[j] = ((self.qs[j] & 0xF) as i32 - 8) as f32 * d;
            out[j + 16] = ((self.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

impl Quantize<32> for BlockQ4_0 {
    const VALUE_WEIGHTS: ValueWeights = ValueWeights::Magnitude;

    /// Starts from ggml's `quantize_row_q4_0_ref` (`d = max / −8`, `max` the value of largest
    /// magnitude) and keeps a better scale from `quantize_symmetric` where it finds one.
    #[inline(always)]
    fn quantize(x: &[f32; 32], ew: Option<&[f32; 32]>) -> Self {
        let mut q = [0u8; 32];
        let d = quantize_symmetric(x, &Self::VALUE_WEIGHTS.or_given(ew, x), 8, &mut q);
        Self { d, qs: std::array::from_fn(|j| q[j] | (q[j + 16] << 4)) }
    }
}
