//! The super-block scheme with mins shared by Q2_K, Q4_K and Q5_K: 256 values in sub-blocks (Q4_K,
//! Q5_K: 8 of 32; Q2_K: 16 of 16); sub-block `j` has an integer scale `sc[j]` and min `m[j]` (6-bit
//! for Q4_K/Q5_K, 4-bit for Q2_K), and its value `i` decodes as `d·sc[j]·q − dmin·m[j]` (`d`, `dmin`
//! f16; `q` in 0..=15 for Q4_K, 0..=31 for Q5_K, 0..=3 for Q2_K).
//!
//! For Q4_K/Q5_K the 8 pairs are packed into 12 bytes `scales` (ggml's `get_scale_min_k4`):
//! - `j < 4`: `sc = scales[j] & 63`, `m = scales[j + 4] & 63`;
//! - `j ≥ 4`: `sc = (scales[j + 4] & 15) | (scales[j − 4] >> 6) << 4`,
//!   `m = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4`.
//!
//! So bytes 0..4 hold the low 6 bits of sc[0..4] (top 2 bits: high bits of sc[4..8]), bytes 4..8 the
//! low 6 bits of m[0..4] (top 2 bits: high bits of m[4..8]), and bytes 8..12 the low nibbles of
//! sc[4..8] (low half) and m[4..8] (high half).
//!
//! Quantization starts from llama.cpp's `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` /
//! `quantize_row_q2_K_ref`: a weighted (scale, min) search per sub-block (`fit_affine`; weights
//! `rms + |x|`, or `|x|` with absolute error for Q2_K), rounding of the scales and mins against
//! `d = max scale / smax`, `dmin = max min / smax`, then the levels re-rounded against those. The
//! same start is also computed with unit weights (squared error), and the better of the two is refined by alternating, while the squared error drops, the least-squares (d, dmin)
//! for the fixed integer scales and levels and, per sub-block, the best of the neighbouring 6-bit
//! (sc, m) pairs (levels re-rounded for each).

use half::f16;

use super::lanes::{dot, dot3, fit_affine, sum, transpose, untranspose, Cols, Lanes, Mask};
use super::search::{lane_sum, nearest_int, tempered, through_f16, Grid};
use super::QK_K;

/// Sub-block `j`'s (scale, min) from the 12 packed bytes of a Q4_K or Q5_K block.
pub fn get_scale_min_k4(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// Inverse of `get_scale_min_k4` for all 8 sub-blocks (values must be < 64).
#[inline(always)]
pub(super) fn pack_scales_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            out[j] = sc[j];
            out[j + 4] = m[j];
        } else {
            out[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            out[j - 4] |= (sc[j] >> 4) << 6;
            out[j] |= (m[j] >> 4) << 6;
        }
    }
    out
}

/// Decoded (sc, m) of all 8 sub-blocks.
pub(super) fn unpack_scales_mins(scales: &[u8; 12]) -> [(u8, u8); 8] {
    std::array::from_fn(|j| get_scale_min_k4(j, scales))
}

/// The geometry of a super-block with mins: `S` sub-blocks of `L` values, levels in 0..=`nmax`,
/// integer sub-block scales and mins in 0..=`smax` (Q4_K: 8×32, nmax 15, smax 63; Q5_K: nmax 31;
/// Q2_K: 16×16, nmax 3, smax 15).
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub nmax: i32,
    pub smax: i32,
}

/// How a start fits each sub-block before the scales are rounded: the search grid and weights.
#[derive(Clone, Copy)]
pub(super) struct Start {
    pub grid: Grid,
    pub weights: SearchWeights,
}

/// The weights of a start's sub-block searches.
#[derive(Clone, Copy)]
pub(super) enum SearchWeights {
    /// `rms + |x|`, the rms over the sub-block (llama.cpp's Q4_K/Q5_K reference).
    RmsPlusAbs,
    /// The error weights themselves: 1 without an importance matrix (the squared error we measure).
    Error,
    /// The error weights tempered once more towards large values (`tempered`).
    Tempered,
}

impl SearchWeights {
    /// The weights of the super-block `x` with error weights `ew`.
    #[inline(always)]
    fn of(self, x: &[f32; QK_K], ew: &[f32; QK_K]) -> [f32; QK_K] {
        match self {
            SearchWeights::RmsPlusAbs => {
                let mut w = [0f32; QK_K];
                // The rms of each sub-block of 32 (the types that use these weights have 8 of them).
                for (ws, xs) in w.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
                    let xs: &[f32; 32] = xs.try_into().unwrap_or_else(|_| unreachable!("32 values"));
                    let av_x = (lane_sum::<32>(|i| xs[i] * xs[i]) / 32.0).sqrt();
                    for (w, v) in ws.iter_mut().zip(xs) {
                        *w = av_x + v.abs();
                    }
                }
                w
            }
            SearchWeights::Error => *ew,
            SearchWeights::Tempered => tempered(x, ew),
        }
    }
}

/// A super-block before its levels and scales are bit-packed.
pub(super) struct MinsQuant<const S: usize> {
    pub d: f16,
    pub dmin: f16,
    pub sc: [u8; S],
    pub m: [u8; S],
    /// Level of each value, in 0..=nmax.
    pub q: [u8; QK_K],
}

/// One candidate encoding of the transposed super-block (see `lanes`); `d` and `dmin` are exactly
/// representable in f16, the integer scales `sc`, mins `m` and levels `q` are held as floats.
#[derive(Clone)]
struct Encoding<const S: usize, const L: usize> {
    d: f32,
    dmin: f32,
    sc: Lanes<S>,
    m: Lanes<S>,
    q: Cols<S, L>,
    err: Lanes<S>,
}

/// Rounds every sub-block to levels for scale `d·sc` and min `dmin·m` (as the decoder forms them),
/// writing them to `out`'s lanes where its mask is set; returns each sub-block's `w`-weighted squared error of the
/// reconstruction.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn requantize<const S: usize, const L: usize>(
    x: &Cols<S, L>,
    w: &Cols<S, L>,
    d: f32,
    dmin: f32,
    sc: Lanes<S>,
    m: Lanes<S>,
    nmax: i32,
    mut out: Option<(&mut Cols<S, L>, Mask<S>)>,
) -> Lanes<S> {
    let ds = Lanes::splat(d) * sc;
    let dm = Lanes::splat(dmin) * m;
    let inv = ds.recip_or_zero();
    let mut err = Lanes::splat(0.0);
    for (i, (&xr, &wr)) in x.iter().zip(w).enumerate() {
        let l = ((xr + dm) * inv).clamp(0.0, nmax as f32).round();
        if let Some((q, keep)) = &mut out {
            q[i] = q[i].select(*keep, l);
        }
        let diff = ds * l - dm - xr;
        err = err + wr * diff * diff;
    }
    err
}

impl<const S: usize, const L: usize> Encoding<S, L> {
    #[inline(always)]
    fn new(x: &Cols<S, L>, ew: &Cols<S, L>, d: f32, dmin: f32, sc: Lanes<S>, m: Lanes<S>, nmax: i32) -> Self {
        let mut q = [Lanes::splat(0.0); L];
        let err = requantize(x, ew, d, dmin, sc, m, nmax, Some((&mut q, Mask::all())));
        Encoding { d, dmin, sc, m, q, err }
    }

    #[inline(always)]
    fn total_err(&self) -> f32 {
        self.err.total()
    }

    /// Weighted least-squares (d, dmin) for the current integer scales, mins and levels, rounded
    /// through f16.
    #[inline(always)]
    fn refit_super_scales(&self, x: &Cols<S, L>, w: &Cols<S, L>) -> (f32, f32) {
        // Minimize Σ w·(d·a − dmin·b − x)² with a = sc·q, b = m.
        let q = &self.q;
        let (sw, sq, sq2) = (sum(w).0, dot(w, q).0, dot3(w, q, q).0);
        let (sx, sxq) = (dot(w, x).0, dot3(w, x, q).0);
        let (mut saa, mut sab, mut sbb, mut sax, mut sbx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for j in 0..S {
            let (sc, b) = (self.sc.0[j] as f64, self.m.0[j] as f64);
            saa += sc * sc * sq2[j] as f64;
            sab += sc * sq[j] as f64 * b;
            sbb += sw[j] as f64 * b * b;
            sax += sc * sxq[j] as f64;
            sbx += sx[j] as f64 * b;
        }
        let det = saa * sbb - sab * sab;
        let (d, dmin) = if det > 1e-12 * saa * sbb {
            ((sax * sbb - sab * sbx) / det, (sab * sax - saa * sbx) / det)
        } else if saa > 0.0 {
            // No mins in use: only d matters.
            ((sax + sab * self.dmin as f64) / saa, self.dmin as f64)
        } else {
            (self.d as f64, self.dmin as f64)
        };
        (through_f16(d as f32), through_f16(dmin as f32))
    }

    /// For each sub-block, the best of the (sc, m) pairs within ±1 of the current ones.
    #[inline(always)]
    fn repick_sub_scales(&mut self, x: &Cols<S, L>, ew: &Cols<S, L>, g: Geometry) {
        let (sc0, m0) = (self.sc, self.m);
        let smax = g.smax as f32;
        let mut moved = Mask::none();
        for dsc in -1..=1 {
            for dm in -1..=1 {
                if (dsc, dm) == (0, 0) {
                    continue;
                }
                // A neighbour clamped onto another pair is tried twice, which changes nothing.
                let sc = (sc0 + Lanes::splat(dsc as f32)).clamp(0.0, smax);
                let m = (m0 + Lanes::splat(dm as f32)).clamp(0.0, smax);
                let err = requantize(x, ew, self.d, self.dmin, sc, m, g.nmax, None);
                let better = err.lt(self.err);
                self.err = self.err.select(better, err);
                self.sc = self.sc.select(better, sc);
                self.m = self.m.select(better, m);
                moved = moved.or(better);
            }
        }
        // The levels of the pairs kept, rounded once more (the same rounding as when each was tried).
        requantize(x, ew, self.d, self.dmin, self.sc, self.m, g.nmax, Some((&mut self.q, moved)));
    }
}

/// Quantizes one super-block of `S` sub-blocks of `L` values, minimizing the squared error weighted
/// by `ew` (error weights, all 1 without an importance matrix): each of `starts` (without an
/// importance matrix the first is llama.cpp's reference) gives an encoding, the one with the
/// smallest error is refined. Every step runs on all sub-blocks at once (`lanes`).
#[inline(always)]
pub(super) fn quantize_with_mins<const S: usize, const L: usize>(
    x: &[f32; QK_K],
    ew: &[f32; QK_K],
    g: Geometry,
    starts: &[Start],
) -> MinsQuant<S> {
    let xt = transpose::<S, L>(x);
    let ewt = transpose::<S, L>(ew);
    // Refining only the better start costs a fraction of refining each and loses under 0.1% of
    // error to it (measured on Q4_K).
    let mut better: Option<Encoding<S, L>> = None;
    for start in starts {
        let weights = match start.weights {
            SearchWeights::Error => ewt,
            other => transpose(&other.of(x, ew)),
        };
        let e = start_encoding(&xt, &ewt, &weights, g, start);
        if better.as_ref().is_none_or(|b| e.total_err() < b.total_err()) {
            better = Some(e);
        }
    }
    let start = better
        .unwrap_or_else(|| Encoding::new(&xt, &ewt, 0.0, 0.0, Lanes::splat(0.0), Lanes::splat(0.0), g.nmax));
    let best = refine(&xt, &ewt, start, g);
    MinsQuant {
        d: f16::from_f32(best.d),
        dmin: f16::from_f32(best.dmin),
        sc: best.sc.0.map(|v| v as u8),
        m: best.m.0.map(|v| v as u8),
        q: untranspose(&best.q, 0.0),
    }
}

/// llama.cpp's reference choice (`quantize_row_q4_K_ref`, `quantize_row_q2_K_ref`) when `start`
/// holds the reference's search: per sub-block (scale, min) from `fit_affine` with search weights
/// `w`, integer scales and mins rounded against `d = max scale / smax`, `dmin = max min / smax`,
/// levels re-rounded.
#[inline(always)]
fn start_encoding<const S: usize, const L: usize>(
    x: &Cols<S, L>,
    ew: &Cols<S, L>,
    w: &Cols<S, L>,
    g: Geometry,
    start: &Start,
) -> Encoding<S, L> {
    let (scales, mins) = fit_affine(x, w, g.nmax, start.grid);
    let smax = g.smax as f32;
    let max_scale = scales.0.iter().fold(0f32, |a, &s| a.max(s));
    let max_min = mins.0.iter().fold(0f32, |a, &m| a.max(m));
    let inv_scale = if max_scale > 0.0 { smax / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { smax / max_min } else { 0.0 };
    let sc = scales.map(|s| nearest_int(inv_scale * s).clamp(0, g.smax) as f32);
    let m = mins.map(|v| nearest_int(inv_min * v).clamp(0, g.smax) as f32);
    let d = through_f16(max_scale / smax);
    let dmin = through_f16(max_min / smax);
    Encoding::new(x, ew, d, dmin, sc, m, g.nmax)
}

/// Alternates the least-squares (d, dmin) and the per-sub-block (sc, m) re-pick while the squared
/// error drops (three rounds at most: later rounds gain under 0.1%).
#[inline(always)]
fn refine<const S: usize, const L: usize>(
    x: &Cols<S, L>,
    ew: &Cols<S, L>,
    start: Encoding<S, L>,
    g: Geometry,
) -> Encoding<S, L> {
    let mut best = start;
    let mut best_err = best.total_err();
    let mut cur = best.clone();
    for _ in 0..3 {
        let (d, dmin) = cur.refit_super_scales(x, ew);
        if !(d.is_finite() && dmin.is_finite()) {
            break;
        }
        cur = Encoding::new(x, ew, d, dmin, cur.sc, cur.m, g.nmax);
        cur.repick_sub_scales(x, ew, g);
        let err = cur.total_err();
        if err < best_err {
            best_err = err;
            best = cur.clone();
        } else {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips() {
        let sc = [0, 1, 17, 63, 32, 47, 5, 63];
        let m = [63, 2, 33, 0, 16, 31, 62, 1];
        let packed = pack_scales_mins(&sc, &m);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &packed), (sc[j], m[j]), "sub-block {j}");
        }
    }
}
