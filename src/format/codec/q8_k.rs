//! Q8_K: 256 values in 292 bytes, `x = d·q` with an f32 `d`; the intermediate type K-quant dot
//! products quantize activations to.

use bytemuck::{Pod, Zeroable};

use super::search::nearest_int;
use super::{Block, Quantize, QK_K};

/// Layout (ggml `block_q8_K`): bytes 0..4 `d` (f32); bytes 4..260 `qs`, value `j` as i8; bytes
/// 260..292 `bsums`, 16 little-endian i16: `bsums[g]` = Σ qs[16g..16g+16].
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(size_of::<BlockQ8K>() == 292);

impl Block<QK_K> for BlockQ8K {
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        for (y, &q) in out.iter_mut().zip(&self.qs) {
            *y = self.d * q as f32;
        }
    }
}

impl Quantize<QK_K> for BlockQ8K {
    /// Exactly ggml's `quantize_row_q8_K_ref`: the value of largest magnitude maps to −127 (an activation
    /// format, which no importance matrix describes).
    #[inline(always)]
    fn quantize(x: &[f32; QK_K], _ew: Option<&[f32; QK_K]>) -> Self {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            return Self::zeroed();
        }
        let iscale = -127.0 / max;
        let qs = x.map(|v| nearest_int(iscale * v).min(127) as i8);
        let bsums = std::array::from_fn(|g| qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum());
        Self { d: 1.0 / iscale, qs, bsums }
    }
}
