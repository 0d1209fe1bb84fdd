//! Q4_K: 256 values in 144 bytes, 8 sub-blocks of 32 with 6-bit scales and mins (see `kquant_mins`).

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant_mins::{
    pack_scales_mins, quantize_with_mins, unpack_scales_mins, Geometry, SearchWeights, Start,
};
use super::search::Grid;
use super::{array_of, unit, Block, Quantize, QK_K};

/// Layout (ggml `block_q4_K`): bytes 0..2 `d`, bytes 2..4 `dmin` (f16); bytes 4..16 `scales`, the 8
/// 6-bit (sc, m) pairs packed as `get_scale_min_k4` reads them; bytes 16..144 `qs`: value
/// `64c + l` (c < 4, l < 32) is the low nibble of `qs[32c + l]` and value `64c + 32 + l` its high
/// nibble. Value `i` is in sub-block `i / 32` and decodes as `d·sc·q − dmin·m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// llama.cpp's sub-block search grid for Q4_K.
const GRID: Grid = Grid { rmin: -1.0, rdelta: 0.1, nstep: 20 };

impl Block<QK_K> for BlockQ4K {
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        let sm = unpack_scales_mins(&self.scales);
        for c in 0..4 {
            let (d1, m1) = (d * sm[2 * c].0 as f32, dmin * sm[2 * c].1 as f32);
            let (d2, m2) = (d * sm[2 * c + 1].0 as f32, dmin * sm[2 * c + 1].1 as f32);
            for l in 0..32 {
                let q = self.qs[32 * c + l];
                out[64 * c + l] = d1 * (q & 0xF) as f32 - m1;
                out[64 * c + 32 + l] = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

impl Quantize<QK_K> for BlockQ4K {
    #[inline(always)]
    fn quantize(x: &[f32; QK_K], ew: Option<&[f32; QK_K]>) -> Self {
        // Without an importance matrix: llama.cpp's reference and a start fitted to the squared error;
        // with one: the error weights tempered again, and a start fitted to the error weights.
        let first = if ew.is_some() { SearchWeights::Tempered } else { SearchWeights::RmsPlusAbs };
        let starts =
            [Start { grid: GRID, weights: first }, Start { grid: GRID, weights: SearchWeights::Error }];
        let r =
            quantize_with_mins::<8, 32>(x, ew.unwrap_or(unit()), Geometry { nmax: 15, smax: 63 }, &starts);
        let scales = pack_scales_mins(&r.sc, &r.m);
        let qs = array_of(|k| {
            let (c, l) = (k / 32, k % 32);
            r.q[64 * c + l] | (r.q[64 * c + 32 + l] << 4)
        });
        Self { d: r.d, dmin: r.dmin, scales, qs }
    }
}
