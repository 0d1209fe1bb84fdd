//! Q2_K: 256 values in 84 bytes, 16 sub-blocks of 16 with 4-bit scales and mins (see `kquant_mins`).

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::kquant_mins::{quantize_with_mins, Geometry, SearchWeights, Start};
use super::search::Grid;
use super::{array_of, Block, Quantize, ValueWeights, QK_K};

/// llama.cpp's sub-block search grid for Q2_K.
const GRID: Grid = Grid { rmin: -0.5, rdelta: 0.1, nstep: 15 };

/// Layout (ggml `block_q2_K`): bytes 0..16 `scales`: byte `s` is sub-block `s`'s scale (low nibble)
/// and min (high nibble); bytes 16..80 `qs`, 2-bit levels; bytes 80..82 `d`, 82..84 `dmin` (f16).
/// Value `128h + 32k + 16t + l` (h < 2, k < 4, t < 2, l < 16) is bits `2k..2k+2` of
/// `qs[32h + 16t + l]`, in sub-block `8h + 2k + t`, and decodes as `d·sc·q − dmin·m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; 16],
    pub qs: [u8; 64],
    pub d: f16,
    pub dmin: f16,
}

const _: () = assert!(size_of::<BlockQ2K>() == 84);

impl Block<QK_K> for BlockQ2K {
    fn dequantize(&self, out: &mut [f32; QK_K]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for (i, y) in out.iter_mut().enumerate() {
            let (h, k, t, l) = (i / 128, i / 32 % 4, i / 16 % 2, i % 16);
            let sc = self.scales[8 * h + 2 * k + t];
            let q = (self.qs[32 * h + 16 * t + l] >> (2 * k)) & 3;
            *y = d * (sc & 0xF) as f32 * q as f32 - dmin * (sc >> 4) as f32;
        }
    }
}

impl Quantize<QK_K> for BlockQ2K {
    const VALUE_WEIGHTS: ValueWeights = ValueWeights::Magnitude;

    #[inline(always)]
    fn quantize(x: &[f32; QK_K], ew: Option<&[f32; QK_K]>) -> Self {
        // Two starts: the error weights tempered again towards large values, and the error weights
        // themselves. (llama.cpp's reference, `|x|` weights minimizing the absolute error, measured
        // worse as a start under `|x|` error weights: KL 0.0452 against 0.0447.)
        let ew = Self::VALUE_WEIGHTS.or_given(ew, x);
        let starts = [
            Start { grid: GRID, weights: SearchWeights::Tempered },
            Start { grid: GRID, weights: SearchWeights::Error },
        ];
        let r = quantize_with_mins::<16, 16>(x, &ew, Geometry { nmax: 3, smax: 15 }, &starts);
        let scales = std::array::from_fn(|s| r.sc[s] | r.m[s] << 4);
        // Value 128h + 32k + l (l < 32) goes to bits 2k..2k+2 of qs[32h + l].
        let qs = array_of(|b| {
            let (h, l) = (b / 32, b % 32);
            (0..4).fold(0u8, |acc, k| acc | r.q[128 * h + 32 * k + l] << (2 * k))
        });
        Self { scales, qs, d: r.d, dmin: r.dmin }
    }
}
