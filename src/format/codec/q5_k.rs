//! Q5_K: 256 values in 176 bytes, 8 sub-blocks of 32 with 6-bit scales and mins (see `kquant_mins`).

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant_mins::{
    pack_scales_mins, quantize_with_mins, unpack_scales_mins, Geometry, SearchWeights, Start,
};
use super::search::Grid;
use super::{unit, Block, Quantize, ValueWeights, QK_K};

/// Layout (ggml `block_q5_K`): bytes 0..2 `d`, bytes 2..4 `dmin` (f16); bytes 4..16 `scales` as in
/// Q4_K; bytes 16..48 `qh`; bytes 48..176 `qs`. Value `64c + l` (c < 4, l < 32) has its low 4 bits
/// in the low nibble of `qs[32c + l]` and bit 4 in bit `2c` of `qh[l]`; value `64c + 32 + l` the high
/// nibble of `qs[32c + l]` and bit `2c + 1` of `qh[l]`. Value `i` is in sub-block `i / 32` and
/// decodes as `d·sc·q − dmin·m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// llama.cpp's sub-block search grid for Q5_K.
const GRID: Grid = Grid { rmin: -0.5, rdelta: 0.1, nstep: 15 };

impl Block<QK_K> for BlockQ5K {
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        let sm = unpack_scales_mins(&self.scales);
        for c in 0..4 {
            let (d1, m1) = (d * sm[2 * c].0 as f32, dmin * sm[2 * c].1 as f32);
            let (d2, m2) = (d * sm[2 * c + 1].0 as f32, dmin * sm[2 * c + 1].1 as f32);
            for l in 0..32 {
                let (q, h) = (self.qs[32 * c + l], self.qh[l] >> (2 * c));
                out[64 * c + l] = d1 * ((q & 0xF) | (h & 1) << 4) as f32 - m1;
                out[64 * c + 32 + l] = d2 * ((q >> 4) | (h & 2) << 3) as f32 - m2;
            }
        }
    }
}

impl Quantize<QK_K> for BlockQ5K {
    const VALUE_WEIGHTS: ValueWeights = ValueWeights::Unit;

    #[inline(always)]
    fn quantize(x: &[f32; QK_K], ew: Option<&[f32; QK_K]>) -> Self {
        // Without an importance matrix: llama.cpp's reference and a start fitted to the squared error;
        // with one: the error weights tempered again, and a start fitted to the error weights.
        let first = if ew.is_some() { SearchWeights::Tempered } else { SearchWeights::RmsPlusAbs };
        let starts =
            [Start { grid: GRID, weights: first }, Start { grid: GRID, weights: SearchWeights::Error }];
        let r =
            quantize_with_mins::<8, 32>(x, ew.unwrap_or(unit()), Geometry { nmax: 31, smax: 63 }, &starts);
        let scales = pack_scales_mins(&r.sc, &r.m);
        let mut qh = [0u8; QK_K / 8];
        let mut qs = [0u8; QK_K / 2];
        for c in 0..4 {
            for l in 0..32 {
                let (lo, hi) = (r.q[64 * c + l], r.q[64 * c + 32 + l]);
                qs[32 * c + l] = (lo & 0xF) | (hi & 0xF) << 4;
                qh[l] |= (lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1);
            }
        }
        Self { d: r.d, dmin: r.dmin, scales, qh, qs }
    }
}
