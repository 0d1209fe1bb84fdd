//! Q3_K (decode only): 256 values in 110 bytes, 16 sub-blocks of 16 with signed 6-bit scales.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{Block, QK_K};

/// Layout (ggml `block_q3_K`): bytes 0..32 `hmask`, bytes 32..96 `qs`, bytes 96..108 `scales`,
/// bytes 108..110 `d` (f16). Value `i = 128h + 32k + 16t + l` (h < 2, k < 4, t < 2, l < 16) has low
/// bits `2k..2k+2` of `qs[32h + 16t + l]` and high bit `4h + k` of `hmask[16t + l]`; a clear high
/// bit subtracts 4, so `q` is in −4..=3. Sub-block `s = 8h + 2k + t` has the 6-bit scale
/// `sc = (lo4 | hi2 << 4) − 32`, `lo4` the low nibble of `scales[s]` (s < 8) or the high nibble of
/// `scales[s − 8]`, `hi2` bits `2(s/4)..2(s/4)+2` of `scales[8 + s%4]`. The value is `d·sc·q`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; 32],
    pub qs: [u8; 64],
    pub scales: [u8; 12],
    pub d: f16,
}

const _: () = assert!(size_of::<BlockQ3K>() == 110);

impl BlockQ3K {
    /// Signed scale of sub-block `s` (0..16).
    pub fn scale(&self, s: usize) -> i8 {
        let lo = if s < 8 { self.scales[s] & 0xF } else { self.scales[s - 8] >> 4 };
        let hi = (self.scales[8 + s % 4] >> (2 * (s / 4))) & 3;
        (lo | hi << 4) as i8 - 32
    }
}

impl Block<QK_K> for BlockQ3K {
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        let scales: [f32; 16] = std::array::from_fn(|s| d * self.scale(s) as f32);
        for (i, y) in out.iter_mut().enumerate() {
            let (h, k, t, l) = (i / 128, i / 32 % 4, i / 16 % 2, i % 16);
            let low = ((self.qs[32 * h + 16 * t + l] >> (2 * k)) & 3) as i8;
            let high_set = self.hmask[16 * t + l] & (1 << (4 * h + k)) != 0;
            let q = low - if high_set { 0 } else { 4 };
            *y = scales[8 * h + 2 * k + t] * q as f32;
        }
    }
}
