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

use super::search::{nearest_int, through_f16};
use super::QK_K;

/// Levels `l` in −nmax..nmax, scales in −smax..smax (both ranges exclusive at the top).
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub nmax: i32,
    pub smax: i32,
}

/// One candidate encoding: `d` exactly representable in f16, levels `q` in 0..2·nmax.
#[derive(Clone)]
pub(super) struct Encoding {
    pub d: f32,
    pub sc: [i8; 16],
    pub q: [u8; QK_K],
    err: [f32; 16],
    g: Geometry,
}

/// Rounds sub-block `x` to levels for scale `d·sc`; returns the `w`-weighted squared error.
#[inline(always)]
fn requantize(x: &[f32], w: &[f32], d: f32, sc: i8, nmax: i32, q: &mut [u8]) -> f32 {
    let ds = d * sc as f32;
    if ds == 0.0 {
        q.fill(nmax as u8);
        return x.iter().zip(w).map(|(v, wi)| wi * v * v).sum();
    }
    let mut err = 0.0;
    for ((qi, &v), &wi) in q.iter_mut().zip(x).zip(w) {
        let l = nearest_int(v / ds).clamp(-nmax, nmax - 1);
        *qi = (l + nmax) as u8;
        let diff = ds * l as f32 - v;
        err += wi * diff * diff;
    }
    err
}

impl Encoding {
    /// The reference's rounding of the sub-block scales `scales` (from the type's search) to
    /// integers; `None` for an all-zero block.
    #[inline(always)]
    pub fn start(x: &[f32; QK_K], ew: &[f32; QK_K], scales: &[f32; 16], g: Geometry) -> Option<Encoding> {
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
        let sc = scales.map(|s| nearest_int(iscale * s).clamp(-g.smax, g.smax - 1) as i8);
        Some(Encoding::new(x, ew, through_f16(1.0 / iscale), sc, g))
    }

    /// Alternates the least-squares `d` and the per-sub-block scale re-pick while the error drops.
    #[inline(always)]
    pub fn refine(self, x: &[f32; QK_K], ew: &[f32; QK_K]) -> Encoding {
        let mut best_err = self.total_err();
        let mut best = self;
        let mut cur = best.clone();
        for _ in 0..3 {
            let Some(d) = cur.refit_d(x, ew) else { break };
            cur = Encoding::new(x, ew, d, cur.sc, cur.g);
            cur.repick_scales(x, ew);
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
    fn new(x: &[f32; QK_K], ew: &[f32; QK_K], d: f32, sc: [i8; 16], g: Geometry) -> Encoding {
        let mut e = Encoding { d, sc, q: [g.nmax as u8; QK_K], err: [0.0; 16], g };
        let blocks = x.chunks_exact(16).zip(ew.chunks_exact(16)).zip(e.q.chunks_exact_mut(16));
        for ((((xs, ws), q), err), &sc) in blocks.zip(&mut e.err).zip(&sc) {
            *err = requantize(xs, ws, d, sc, g.nmax, q);
        }
        e
    }

    #[inline(always)]
    pub fn total_err(&self) -> f32 {
        self.err.iter().sum()
    }

    /// `d` as stored.
    pub fn d16(&self) -> f16 {
        f16::from_f32(self.d)
    }

    /// Weighted least-squares `d` for the current scales and levels, rounded through f16.
    #[inline(always)]
    fn refit_d(&self, x: &[f32; QK_K], ew: &[f32; QK_K]) -> Option<f32> {
        let (mut sxa, mut saa) = (0f64, 0f64);
        for (i, (&v, &w)) in x.iter().zip(ew).enumerate() {
            let a = (self.sc[i / 16] as i32 * (self.q[i] as i32 - self.g.nmax)) as f64;
            sxa += w as f64 * v as f64 * a;
            saa += w as f64 * a * a;
        }
        let d = through_f16((sxa / saa) as f32);
        (saa > 0.0 && d.is_finite()).then_some(d)
    }

    /// For each sub-block, the best of the scales within ±1 of the current one.
    #[inline(always)]
    fn repick_scales(&mut self, x: &[f32; QK_K], ew: &[f32; QK_K]) {
        let mut trial = [0u8; 16];
        let g = self.g;
        for s in 0..16 {
            let r = 16 * s..16 * s + 16;
            let sc0 = self.sc[s] as i32;
            for sc in [(sc0 - 1).max(-g.smax), (sc0 + 1).min(g.smax - 1)] {
                let err = requantize(&x[r.clone()], &ew[r.clone()], self.d, sc as i8, g.nmax, &mut trial);
                if err < self.err[s] {
                    self.err[s] = err;
                    self.sc[s] = sc as i8;
                    self.q[r.clone()].copy_from_slice(&trial);
                }
            }
        }
    }
}

/// The refined encoding with the smallest `ew`-weighted squared error among `starts` (`None`:
/// all-zero block).
#[inline(always)]
pub(super) fn best_of(
    x: &[f32; QK_K],
    ew: &[f32; QK_K],
    starts: impl IntoIterator<Item = Option<Encoding>>,
) -> Option<Encoding> {
    let mut best: Option<Encoding> = None;
    for e in starts.into_iter().flatten() {
        let e = e.refine(x, ew);
        if best.as_ref().is_none_or(|b| e.total_err() < b.total_err()) {
            best = Some(e);
        }
    }
    best
}
