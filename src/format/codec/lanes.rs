//! A super-block's sub-blocks side by side, for the K-quant scale searches.
//!
//! The searches fit each sub-block on its own, so they are run on all `S` sub-blocks at once: the
//! super-block is transposed into [`Cols`], whose row `i` holds value `i` of every sub-block, and
//! every step works on whole rows, one lane per sub-block. Each lane's sums then accumulate in
//! registers with no horizontal reductions, and the compiler turns each row operation into 8-wide
//! vector instructions (16 lanes: two). The steps are those of the one-sub-block searches in
//! `search` (llama.cpp's `make_qkx2_quants` and `make_qx_quants`); only the summation order and
//! multiplying by reciprocals instead of dividing differ, so results can differ in the last bits.

use super::search::{round_small, Grid};
use super::{array_of, QK_K};

/// One value of each of `S` sub-blocks: the vector every step of a search works on. Each operation
/// is one elementwise loop, which the compiler turns into vector instructions (one 8-wide AVX2
/// instruction per 8 lanes; the searches written over whole rows of sub-blocks did not vectorize).
#[derive(Clone, Copy, PartialEq, Debug)]
#[repr(C, align(32))]
pub(super) struct Lanes<const S: usize>(pub [f32; S]);

/// `S` sub-blocks of `L` values each, transposed: row `i` holds value `i` of every sub-block.
pub(super) type Cols<const S: usize, const L: usize> = [Lanes<S>; L];

impl<const S: usize> Lanes<S> {
    #[inline(always)]
    pub fn splat(v: f32) -> Self {
        Lanes([v; S])
    }

    /// `f(j)` for every lane `j`. A plain loop: `std::array::from_fn` and `map` are calls that the
    /// compiler does not always inline into the large encoders, and called they run without AVX2.
    #[inline(always)]
    pub fn from_fn(mut f: impl FnMut(usize) -> f32) -> Self {
        let mut r = [0f32; S];
        for (j, v) in r.iter_mut().enumerate() {
            *v = f(j);
        }
        Lanes(r)
    }

    #[inline(always)]
    pub fn map(self, f: impl Fn(f32) -> f32) -> Self {
        Lanes::from_fn(|j| f(self.0[j]))
    }

    #[inline(always)]
    pub fn zip(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Lanes::from_fn(|j| f(self.0[j], o.0[j]))
    }

    /// Per lane, `a` where `take` is set, else `self`.
    #[inline(always)]
    pub fn select(self, take: Mask<S>, a: Self) -> Self {
        Lanes::from_fn(|j| {
            f32::from_bits((a.0[j].to_bits() & take.0[j]) | (self.0[j].to_bits() & !take.0[j]))
        })
    }

    #[inline(always)]
    fn compare(self, o: Self, f: impl Fn(f32, f32) -> bool) -> Mask<S> {
        Mask::from_fn(|j| if f(self.0[j], o.0[j]) { u32::MAX } else { 0 })
    }

    /// Per lane, whether `self < o`.
    #[inline(always)]
    pub fn lt(self, o: Self) -> Mask<S> {
        self.compare(o, |a, b| a < b)
    }

    /// Per lane, whether `self == o`.
    #[inline(always)]
    pub fn eq(self, o: Self) -> Mask<S> {
        self.compare(o, |a, b| a == b)
    }

    #[inline(always)]
    pub fn min(self, o: Self) -> Self {
        self.zip(o, f32::min)
    }

    #[inline(always)]
    pub fn max(self, o: Self) -> Self {
        self.zip(o, f32::max)
    }

    /// Rounded half to even, for `|v| < 2²²` (`search::round_small`).
    #[inline(always)]
    pub fn round(self) -> Self {
        self.map(round_small)
    }

    #[inline(always)]
    pub fn clamp(self, lo: f32, hi: f32) -> Self {
        self.map(|v| v.clamp(lo, hi))
    }

    /// `1 / v` per lane, 0 where `v` is 0 (a zero scale rounds every value to level 0).
    #[inline(always)]
    pub fn recip_or_zero(self) -> Self {
        self.map(|v| if v != 0.0 { 1.0 / v } else { 0.0 })
    }

    /// The sum of all lanes.
    #[inline(always)]
    pub fn total(self) -> f32 {
        self.0.iter().sum()
    }
}

/// A per-lane condition: all bits set where it holds (the form vector comparisons produce, so
/// selecting by it stays in vector registers).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct Mask<const S: usize>([u32; S]);

impl<const S: usize> Mask<S> {
    /// `f(j)` for every lane `j` (a loop, not `std::array::from_fn`: see `Lanes::from_fn`).
    #[inline(always)]
    fn from_fn(mut f: impl FnMut(usize) -> u32) -> Self {
        let mut r = [0u32; S];
        for (j, v) in r.iter_mut().enumerate() {
            *v = f(j);
        }
        Mask(r)
    }

    #[inline(always)]
    pub fn and(self, o: Self) -> Self {
        Mask::from_fn(|j| self.0[j] & o.0[j])
    }

    #[inline(always)]
    pub fn or(self, o: Self) -> Self {
        Mask::from_fn(|j| self.0[j] | o.0[j])
    }

    /// Every lane set.
    #[inline(always)]
    pub fn all() -> Self {
        Mask([u32::MAX; S])
    }

    /// No lane set.
    #[inline(always)]
    pub fn none() -> Self {
        Mask([0; S])
    }
}

macro_rules! lanes_op {
    ($trait:ident, $method:ident, $op:tt) => {
        impl<const S: usize> std::ops::$trait for Lanes<S> {
            type Output = Self;
            #[inline(always)]
            fn $method(self, o: Self) -> Self {
                self.zip(o, |a, b| a $op b)
            }
        }
    };
}
lanes_op!(Add, add, +);
lanes_op!(Sub, sub, -);
lanes_op!(Mul, mul, *);
lanes_op!(Div, div, /);

/// `x` (sub-block `j` at `x[L·j .. L·(j + 1)]`) as columns.
#[inline(always)]
pub(super) fn transpose<const S: usize, const L: usize>(x: &[f32; QK_K]) -> Cols<S, L> {
    const { assert!(S * L == QK_K) };
    let mut c = [Lanes::splat(0.0); L];
    for (i, row) in c.iter_mut().enumerate() {
        *row = Lanes::from_fn(|j| x[L * j + i]);
    }
    c
}

/// The levels of columns `q` in the natural order of the super-block, as stored bytes (`q + offset`).
#[inline(always)]
pub(super) fn untranspose<const S: usize, const L: usize>(q: &Cols<S, L>, offset: f32) -> [u8; QK_K] {
    array_of(|v| (q[v % L].0[v / L] + offset) as u8)
}

/// Per lane, the sum over the rows of `a`.
#[inline(always)]
pub(super) fn sum<const S: usize, const L: usize>(a: &Cols<S, L>) -> Lanes<S> {
    a.iter().fold(Lanes::splat(0.0), |acc, &r| acc + r)
}

/// Per lane, the sum over the rows of `a·b`.
#[inline(always)]
pub(super) fn dot<const S: usize, const L: usize>(a: &Cols<S, L>, b: &Cols<S, L>) -> Lanes<S> {
    a.iter().zip(b).fold(Lanes::splat(0.0), |acc, (&r, &s)| acc + r * s)
}

/// Per lane, the sum over the rows of `a·b·c`.
#[inline(always)]
pub(super) fn dot3<const S: usize, const L: usize>(
    a: &Cols<S, L>,
    b: &Cols<S, L>,
    c: &Cols<S, L>,
) -> Lanes<S> {
    let mut acc = Lanes::splat(0.0);
    for ((&r, &s), &t) in a.iter().zip(b).zip(c) {
        acc = acc + r * s * t;
    }
    acc
}

/// `search::fit_affine` on every sub-block at once: per lane, the `(scale, min)` of
/// `x ≈ scale·q − min`, `q` in 0..=nmax, `min ≥ 0`, minimizing the `w`-weighted squared error.
#[inline(always)]
pub(super) fn fit_affine<const S: usize, const L: usize>(
    x: &Cols<S, L>,
    w: &Cols<S, L>,
    nmax: i32,
    grid: Grid,
) -> (Lanes<S>, Lanes<S>) {
    let (lo, hi) = x.iter().fold((x[0], x[0]), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let mut min = lo.min(Lanes::splat(0.0));
    let flat = hi.eq(min);
    let first_min = min;
    let one = Lanes::splat(1.0);
    let sum_w = sum(w);
    let sum_x = dot(w, x);
    let nmaxf = nmax as f32;
    let sum_x2 = dot3(w, x, x);
    let two = Lanes::splat(2.0);
    // One pass per trial scale: round to levels and sum what the least-squares fit needs. The
    // squared error of a fit follows from the same sums (expanding Σw·(s·l + m − x)²), so the
    // levels need not be kept.
    /// Per lane, Σw·l, Σw·l² and Σw·x·l of the levels at inverse scale `iscale` from `min` (a
    /// function so that it inlines; see `sums` in `fit_symmetric`).
    #[inline(always)]
    fn level_sums<const S: usize, const L: usize>(
        x: &Cols<S, L>,
        w: &Cols<S, L>,
        nmaxf: f32,
        iscale: Lanes<S>,
        min: Lanes<S>,
    ) -> (Lanes<S>, Lanes<S>, Lanes<S>) {
        let (mut sum_l, mut sum_l2, mut sum_xl) = (Lanes::splat(0.0), Lanes::splat(0.0), Lanes::splat(0.0));
        for (&xr, &wr) in x.iter().zip(w) {
            let l = (iscale * (xr - min)).clamp(0.0, nmaxf).round();
            let wl = wr * l;
            sum_l = sum_l + wl;
            sum_l2 = sum_l2 + wl * l;
            sum_xl = sum_xl + wl * xr;
        }
        (sum_l, sum_l2, sum_xl)
    }
    let error = |s: Lanes<S>, m: Lanes<S>, (sum_l, sum_l2, sum_xl): (Lanes<S>, Lanes<S>, Lanes<S>)| {
        s * s * sum_l2 + m * m * sum_w + sum_x2 + two * s * m * sum_l - two * s * sum_xl - two * m * sum_x
    };
    let iscale = Lanes::splat(nmaxf) / (hi - min).select(flat, one);
    // The range is from the current min (which the search moves, as llama.cpp's does); a flat
    // lane's is set to 1 so its search stays finite, and its result is replaced below.
    let mut scale = iscale.recip_or_zero();
    let sums = level_sums(x, w, nmaxf, iscale, min);
    let mut best_error = error(scale, min, sums);
    for step in 0..=grid.nstep {
        let iscale =
            Lanes::splat(grid.rmin + grid.rdelta * step as f32 + nmaxf) / (hi - min).select(flat, one);
        let sums = level_sums(x, w, nmaxf, iscale, min);
        let (sum_l, sum_l2, sum_xl) = sums;
        let det = sum_w * sum_l2 - sum_l * sum_l;
        let this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        let this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        // A positive min is not allowed: refit the scale alone.
        let clamp_min = Lanes::splat(0.0).lt(this_min);
        let this_scale = this_scale.select(clamp_min, sum_xl / sum_l2);
        let this_min = this_min.select(clamp_min, Lanes::splat(0.0));
        let err = error(this_scale, this_min, sums);
        let take = Lanes::splat(0.0).lt(det).and(err.lt(best_error));
        best_error = best_error.select(take, err);
        scale = scale.select(take, this_scale);
        min = min.select(take, this_min);
    }
    let scale = scale.select(flat, Lanes::splat(0.0));
    let neg_min = (Lanes::splat(0.0) - min).select(flat, Lanes::splat(0.0) - first_min);
    (scale, neg_min)
}

/// `search::fit_symmetric` on every sub-block at once: per lane, the signed scale of
/// `x ≈ scale·l`, `l` in −nmax..nmax, minimizing the `w`-weighted squared error over 19 inverse
/// scales around `−nmax / max` (the value of largest magnitude maps to −nmax).
#[inline(always)]
pub(super) fn fit_symmetric<const S: usize, const L: usize>(
    x: &Cols<S, L>,
    w: &Cols<S, L>,
    nmax: i32,
) -> Lanes<S> {
    let (mut max, mut amax) = (Lanes::splat(0.0), Lanes::splat(0.0));
    for &row in x {
        let abs = row.map(f32::abs);
        let bigger = amax.lt(abs);
        amax = amax.select(bigger, abs);
        max = max.select(bigger, row);
    }
    let nmaxf = nmax as f32;
    // An all-zero lane's scale is 0; 1 keeps its search finite.
    let zero = amax.lt(Lanes::splat(1e-15));
    let inv_max = max.recip_or_zero().select(zero, Lanes::splat(1.0));
    /// Per lane, Σw·x·l and Σw·l² of the levels `l` at inverse scale `iscale`. (A function, not a
    /// closure, so that it can be marked for inlining: called, it runs without AVX2.)
    #[inline(always)]
    fn sums<const S: usize, const L: usize>(
        x: &Cols<S, L>,
        w: &Cols<S, L>,
        nmaxf: f32,
        iscale: Lanes<S>,
    ) -> (Lanes<S>, Lanes<S>) {
        let (mut sumlx, mut suml2) = (Lanes::splat(0.0), Lanes::splat(0.0));
        for (&xr, &wr) in x.iter().zip(w) {
            let l = (iscale * xr).round().clamp(-nmaxf, nmaxf - 1.0);
            let wl = wr * l;
            sumlx = sumlx + wl * xr;
            suml2 = suml2 + wl * l;
        }
        (sumlx, suml2)
    }
    let (sumlx, suml2) = sums(x, w, nmaxf, Lanes::splat(-nmaxf) * inv_max);
    let mut scale = (sumlx / suml2).select(suml2.eq(Lanes::splat(0.0)), Lanes::splat(0.0));
    let mut best = scale * sumlx;
    for k in (-9..=9).filter(|&k| k != 0) {
        let (sumlx, suml2) = sums(x, w, nmaxf, Lanes::splat(-(nmaxf + 0.1 * k as f32)) * inv_max);
        let take = Lanes::splat(0.0).lt(suml2).and((best * suml2).lt(sumlx * sumlx));
        scale = scale.select(take, sumlx / suml2);
        best = best.select(take, scale * sumlx);
    }
    scale.select(zero, Lanes::splat(0.0))
}

#[cfg(test)]
mod tests {
    use super::super::search;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn block(rng: &mut StdRng) -> [f32; QK_K] {
        // Sub-blocks of different spreads and offsets, some flat or zero, as real rows have.
        std::array::from_fn(|i| match (i / 16) % 8 {
            0 => 0.0,
            1 => 0.25,
            k => (rng.random::<f32>() - 0.3) * k as f32,
        })
    }

    #[test]
    fn lane_searches_match_the_one_sub_block_searches() {
        let mut rng = StdRng::seed_from_u64(7);
        let grid = Grid { rmin: -1.0, rdelta: 0.1, nstep: 20 };
        for _ in 0..50 {
            let x = block(&mut rng);
            let w: [f32; QK_K] = std::array::from_fn(|_| rng.random::<f32>() + 0.1);
            let (scale, min) = fit_affine(&transpose::<8, 32>(&x), &transpose::<8, 32>(&w), 15, grid);
            for j in 0..8 {
                let r = 32 * j..32 * j + 32;
                let mut q = [0u8; 32];
                let (s1, m1) = search::fit_affine::<32>(
                    x[r.clone()].try_into().unwrap(),
                    w[r].try_into().unwrap(),
                    15,
                    grid,
                    search::Metric::Squared,
                    &mut q,
                );
                // The steps are the same, but sums in another order can flip a near tie between two
                // grid points (and the path after it): compare the fits' errors.
                let err = |s: f32, m: f32| -> f32 {
                    (32 * j..32 * j + 32)
                        .map(|i| {
                            let l = if s > 0.0 { ((x[i] + m) / s).round().clamp(0.0, 15.0) } else { 0.0 };
                            w[i] * (s * l - m - x[i]).powi(2)
                        })
                        .sum()
                };
                let (ours, theirs) = (err(scale.0[j], min.0[j]), err(s1, m1));
                assert!(ours <= theirs * 1.02 + 1e-9, "sub-block {j}: error {ours} vs {theirs}");
            }
            let scale = fit_symmetric(&transpose::<16, 16>(&x), &transpose::<16, 16>(&w), 32);
            for j in 0..16 {
                let r = 16 * j..16 * j + 16;
                let s1 = search::fit_symmetric(&x[r.clone()], &w[r], 32, &mut [0u8; 16]);
                assert!(
                    (scale.0[j] - s1).abs() <= 1e-4 * s1.abs().max(1e-6),
                    "sub-block {j}: {} vs {s1}",
                    scale.0[j]
                );
            }
        }
    }
}
