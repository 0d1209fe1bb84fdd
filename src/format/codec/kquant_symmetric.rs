//! The symmetric super-block scheme shared by Q3_K and Q6_K: 256 values in 16 sub-blocks of 16;
//! sub-block `s` has a signed integer scale `sc[s]` in −smax..smax (Q6_K: 8-bit, smax 128; Q3_K:
//! 6-bit, smax 32), and its value decodes as `d·sc[s]·l` with `l` in −nmax..nmax (Q6_K: nmax 32,
//! Q3_K: nmax 4). Levels are kept here as `q = l + nmax`.
//!
//! Quantization starts from llama.cpp's reference (`quantize_row_q6_K_ref`, `quantize_row_q3_K_ref`):
//! a scale per sub-block from the type's search, integer rounding of the scales against
//! `d = max scale / −smax` (the scale of largest magnitude maps to −smax), then the levels
//! re-rounded against those. It then alternates, while the (importance-weighted) squared error drops, the least-squares
//! `d` for the fixed integer scales and levels and, per sub-block, the best of the neighbouring
//! integer scales (levels re-rounded for each). Each type also tries other sub-block searches as
//! starts; the encoding with the smallest squared error is kept.

use half::f16;

use super::lanes::{dot3, fit_symmetric, transpose, untranspose, Cols, Lanes, Mask};
use super::search::{nearest_int, through_f16};
use super::QK_K;

/// Levels `l` in −nmax..nmax, scales in −smax..smax (both ranges exclusive at the top).
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub nmax: i32,
    pub smax: i32,
}

/// A super-block before its levels and scales are bit-packed.
pub(super) struct SymmetricQuant {
    pub d: f16,
    pub sc: [i8; 16],
    /// Level of each value, stored as `l + nmax` in 0..2·nmax.
    pub q: [u8; QK_K],
}

/// The 16 sub-blocks of 16, transposed (see `lanes`).
type Sub = Cols<16, 16>;

/// One candidate encoding: `d` exactly representable in f16; the integer scales `sc` and levels
/// `l` held as floats.
#[derive(Clone)]
struct Encoding {
    d: f32,
    sc: Lanes<16>,
    l: Sub,
    err: Lanes<16>,
}

/// Rounds every sub-block to levels for scale `d·sc`, writing them to `out`'s lanes where its mask
/// is set; returns
/// each sub-block's `w`-weighted squared error.
#[inline(always)]
fn requantize(
    x: &Sub,
    w: &Sub,
    d: f32,
    sc: Lanes<16>,
    nmax: i32,
    mut out: Option<(&mut Sub, Mask<16>)>,
) -> Lanes<16> {
    let ds = Lanes::splat(d) * sc;
    let inv = ds.recip_or_zero();
    let nmaxf = nmax as f32;
    let mut err = Lanes::splat(0.0);
    for (i, (&xr, &wr)) in x.iter().zip(w).enumerate() {
        let l = (xr * inv).round().clamp(-nmaxf, nmaxf - 1.0);
        if let Some((q, keep)) = &mut out {
            q[i] = q[i].select(*keep, l);
        }
        let diff = ds * l - xr;
        err = err + wr * diff * diff;
    }
    err
}

/// The sub-block scales of `x` by `search::fit_symmetric` with search weights `w` (llama.cpp's
/// `make_qx_quants`), all 16 sub-blocks at once.
#[inline(always)]
pub(super) fn symmetric_scales(x: &[f32; QK_K], w: &[f32; QK_K], nmax: i32) -> [f32; 16] {
    fit_symmetric(&transpose::<16, 16>(x), &transpose::<16, 16>(w), nmax).0
}

impl Encoding {
    /// The reference's rounding of the sub-block scales `scales` (from the type's search) to
    /// integers; `None` for an all-zero block.
    #[inline(always)]
    fn start(x: &Sub, ew: &Sub, scales: &[f32; 16], g: Geometry) -> Option<Encoding> {
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for &s in scales {
            if s.abs() > max_abs {
                max_abs = s.abs();
                max_scale = s;
            }
        }
        if max_abs < 1e-15 {
            return None;
        }
        let iscale = -(g.smax as f32) / max_scale;
        let sc = Lanes(scales.map(|s| nearest_int(iscale * s).clamp(-g.smax, g.smax - 1) as f32));
        Some(Encoding::new(x, ew, through_f16(1.0 / iscale), sc, g))
    }

    /// Alternates the least-squares `d` and the per-sub-block scale re-pick while the error drops.
    #[inline(always)]
    fn refine(self, x: &Sub, ew: &Sub, g: Geometry) -> Encoding {
        let mut best_err = self.total_err();
        let mut best = self;
        let mut cur = best.clone();
        for _ in 0..3 {
            let Some(d) = cur.refit_d(x, ew) else { break };
            cur = Encoding::new(x, ew, d, cur.sc, g);
            cur.repick_scales(x, ew, g);
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

    #[inline(always)]
    fn new(x: &Sub, ew: &Sub, d: f32, sc: Lanes<16>, g: Geometry) -> Encoding {
        let mut l = [Lanes::splat(0.0); 16];
        let err = requantize(x, ew, d, sc, g.nmax, Some((&mut l, Mask::all())));
        Encoding { d, sc, l, err }
    }

    #[inline(always)]
    fn total_err(&self) -> f32 {
        self.err.total()
    }

    /// Weighted least-squares `d` for the current scales and levels, rounded through f16.
    #[inline(always)]
    fn refit_d(&self, x: &Sub, ew: &Sub) -> Option<f32> {
        let (sxl, sll) = (dot3(ew, x, &self.l).0, dot3(ew, &self.l, &self.l).0);
        let (mut sxa, mut saa) = (0f64, 0f64);
        for (s, &sc) in self.sc.0.iter().enumerate() {
            sxa += sc as f64 * sxl[s] as f64;
            saa += (sc * sc) as f64 * sll[s] as f64;
        }
        let d = through_f16((sxa / saa) as f32);
        (saa > 0.0 && d.is_finite()).then_some(d)
    }

    /// For each sub-block, the best of the scales within ±1 of the current one.
    #[inline(always)]
    fn repick_scales(&mut self, x: &Sub, ew: &Sub, g: Geometry) {
        let sc0 = self.sc;
        let mut moved = Mask::none();
        for step in [-1.0, 1.0] {
            let sc = (sc0 + Lanes::splat(step)).clamp(-g.smax as f32, (g.smax - 1) as f32);
            let err = requantize(x, ew, self.d, sc, g.nmax, None);
            let better = err.lt(self.err);
            self.err = self.err.select(better, err);
            self.sc = self.sc.select(better, sc);
            moved = moved.or(better);
        }
        // The levels of the scales kept, rounded once more (the same rounding as when each was tried).
        requantize(x, ew, self.d, self.sc, g.nmax, Some((&mut self.l, moved)));
    }
}

/// The refined encoding with the smallest `ew`-weighted squared error among those starting from
/// each of `starts`, sub-block scales from the type's searches (`None`: all-zero block). Every step
/// runs on all 16 sub-blocks at once (`lanes`).
#[inline(always)]
pub(super) fn best_of(
    x: &[f32; QK_K],
    ew: &[f32; QK_K],
    starts: &[[f32; 16]],
    g: Geometry,
) -> Option<SymmetricQuant> {
    let (xt, ewt) = (transpose::<16, 16>(x), transpose::<16, 16>(ew));
    let mut best: Option<Encoding> = None;
    for scales in starts {
        let Some(e) = Encoding::start(&xt, &ewt, scales, g) else { continue };
        let e = e.refine(&xt, &ewt, g);
        if best.as_ref().is_none_or(|b| e.total_err() < b.total_err()) {
            best = Some(e);
        }
    }
    best.map(|e| SymmetricQuant {
        d: f16::from_f32(e.d),
        sc: e.sc.0.map(|v| v as i8),
        q: untranspose(&e.l, g.nmax as f32),
    })
}
