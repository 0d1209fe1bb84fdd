//! Q6_K: 256 values in 210 bytes, 16 sub-blocks of 16 with signed 8-bit scales, `x = d·sc·(q − 32)`.
//!
//! Quantization (see `kquant_symmetric`) starts from llama.cpp's `quantize_row_q6_K_ref`: a scale
//! per sub-block from `fit_symmetric` (weights x²), 8-bit rounding of the scales against
//! `d = max scale / −128`, then the levels re-rounded and refined. A second start's sub-block
//! search uses unit weights; the better of the two is kept.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant_symmetric::{best_of, symmetric_scales, Geometry, SymmetricQuant};
use super::search::tempered;
use super::{array_of, unit, Block, Quantize, ValueWeights, QK_K};

/// Layout (ggml `block_q6_K`): bytes 0..128 `ql`, bytes 128..192 `qh`, bytes 192..208 `scales`
/// (i8), bytes 208..210 `d` (f16). Value `i = 128h + 32k + l` (h < 2, k < 4, l < 32) has its low 4
/// bits in `ql[64h + 32(k % 2) + l]` (low nibble for k < 2, high nibble for k ≥ 2) and its high 2
/// bits in bits `2k..2k+2` of `qh[32h + l]`; it is in sub-block `i / 16` and decodes as
/// `d·scales[i / 16]·(q − 32)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

const _: () = assert!(size_of::<BlockQ6K>() == 210);

impl Block<QK_K> for BlockQ6K {
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = self.d.to_f32();
        for h in 0..2 {
            for k in 0..4 {
                for l in 0..32 {
                    let i = 128 * h + 32 * k + l;
                    let low = self.ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2)) & 0xF;
                    let high = (self.qh[32 * h + l] >> (2 * k)) & 3;
                    let q = (low | high << 4) as i32 - 32;
                    out[i] = d * self.scales[i / 16] as f32 * q as f32;
                }
            }
        }
    }
}

impl Quantize<QK_K> for BlockQ6K {
    const VALUE_WEIGHTS: ValueWeights = ValueWeights::Unit;

    #[inline(always)]
    fn quantize(x: &[f32; QK_K], ew: Option<&[f32; QK_K]>) -> Self {
        // Without an importance matrix: the reference's x², and unit weights, which fit the squared
        // error we measure (they win on most blocks: 1.5% lower error on Gaussian data). With one:
        // the error weights tempered again, and the error weights themselves.
        let (first, second) = match ew {
            None => (array_of(|i| x[i] * x[i]), *unit()),
            Some(ew) => (tempered(x, ew), *ew),
        };
        let ew = ew.unwrap_or(unit());
        // Called directly, not through an array's `map`: see `array_of`.
        let starts =
            [symmetric_scales(x, &first, GEOMETRY.nmax), symmetric_scales(x, &second, GEOMETRY.nmax)];
        match best_of(x, ew, &starts, GEOMETRY) {
            Some(e) => pack(&e),
            None => Self::zeroed(),
        }
    }
}

/// Levels −32..32, 8-bit scales.
const GEOMETRY: Geometry = Geometry { nmax: 32, smax: 128 };

/// Each sub-block's scale from `fit_symmetric` with search weights `w` (llama.cpp's
/// `quantize_row_q6_K_ref` uses x²).
#[inline(always)]
fn pack(e: &SymmetricQuant) -> BlockQ6K {
    let mut b = BlockQ6K::zeroed();
    for h in 0..2 {
        for k in 0..4 {
            for l in 0..32 {
                let q = e.q[128 * h + 32 * k + l];
                b.ql[64 * h + 32 * (k % 2) + l] |= (q & 0xF) << (4 * (k / 2));
                b.qh[32 * h + l] |= (q >> 4) << (2 * k);
            }
        }
    }
    b.scales = e.sc;
    b.d = e.d;
    b
}
