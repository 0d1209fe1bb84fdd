//! Q3_K: 256 values in 110 bytes, 16 sub-blocks of 16 with signed 6-bit scales, `x = d·sc·q`.
//!
//! Quantization (see `kquant_symmetric`) starts from llama.cpp's `quantize_row_q3_K_ref`: a scale
//! per sub-block from `fit_q3` (its `make_q3_quants`), 6-bit rounding of the scales against
//! `d = max scale / −32`, then the levels re-rounded and refined. A second start's sub-block search
//! is `fit_symmetric` with unit weights; the better of the two is kept.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant_symmetric::{best_of, symmetric_scales, Geometry, SymmetricQuant};
use super::search::{fit_q3, tempered};
use super::{array_of, unit, Block, Quantize, QK_K};

/// Levels −4..4, 6-bit scales.
const GEOMETRY: Geometry = Geometry { nmax: 4, smax: 32 };

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

impl Quantize<QK_K> for BlockQ3K {
    #[inline(always)]
    fn quantize(x: &[f32; QK_K], ew: Option<&[f32; QK_K]>) -> Self {
        // Without an importance matrix: the reference (`make_q3_quants`), and unit weights, which
        // fit the squared error we measure. With one: the error weights tempered again, and the
        // error weights themselves. (Direct calls, not closures: see `array_of`.)
        let nmax = GEOMETRY.nmax;
        let (first, second) = match ew {
            None => (array_of(|s| fit_q3(&x[16 * s..16 * s + 16], nmax)), symmetric_scales(x, unit(), nmax)),
            Some(ew) => (symmetric_scales(x, &tempered(x, ew), nmax), symmetric_scales(x, ew, nmax)),
        };
        let ew = ew.unwrap_or(unit());
        match best_of(x, ew, &[first, second], GEOMETRY) {
            Some(e) => pack(&e),
            None => Self::zeroed(),
        }
    }
}

#[inline(always)]
fn pack(e: &SymmetricQuant) -> BlockQ3K {
    let mut b = BlockQ3K::zeroed();
    for s in 0..16 {
        // Stored as sc + 32: low nibble in scales[s % 8] (high half for s ≥ 8), top 2 bits in
        // scales[8 + s % 4] at bits 2(s / 4).
        let l = (e.sc[s] as i32 + 32) as u8;
        b.scales[s % 8] |= (l & 0xF) << (4 * (s / 8));
        b.scales[8 + s % 4] |= (l >> 4) << (2 * (s / 4));
    }
    for (i, &q) in e.q.iter().enumerate() {
        // q = l + 4 in 0..8: bit 2 is the hmask bit (set: no −4), bits 0..2 go to qs.
        let (h, k, l) = (i / 128, i / 32 % 4, i % 32);
        b.qs[32 * h + l] |= (q & 3) << (2 * k);
        b.hmask[i % 32] |= (q >> 2) << (i / 32);
    }
    b.d = e.d;
    b
}
