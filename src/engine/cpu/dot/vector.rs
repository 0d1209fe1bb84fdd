//! f32 dot products and `o += w * v` for attention (query · key, weight × value), at the SIMD level the
//! quantized kernels use: head-sized vectors, called once per cached position and head, so at long
//! contexts these loops are what decode time goes to.

use super::SimdLevel;

/// `Σ a[i] * b[i]` over the shorter of the two.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SimdLevel::active() >= SimdLevel::Avx2 {
        // SAFETY: the active level is at most what the CPU has (`SimdLevel::active`).
        return unsafe { x86::dot(a, b) };
    }
    portable::dot(a, b)
}

/// `o[i] += w * v[i]` over the shorter of the two.
pub fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if SimdLevel::active() >= SimdLevel::Avx2 {
        // SAFETY: as in `dot`.
        return unsafe { x86::axpy(o, w, v) };
    }
    portable::axpy(o, w, v)
}

mod portable {
    /// Lanes of independent partial sums: a single running sum is a dependency chain the compiler may
    /// not reorder, so it would stay scalar; 16 lanes become vector registers.
    const LANES: usize = 16;

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    pub fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
        for (a, &x) in o.iter_mut().zip(v) {
            *a += w * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Four 8-lane accumulators (32 values per step) keep four FMA chains in flight.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + 8 * k;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(at)), _mm256_loadu_ps(pb.add(at)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
        let n = o.len().min(v.len());
        let (po, pv) = (o.as_mut_ptr(), v.as_ptr());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                po.add(i),
                _mm256_fmadd_ps(wv, _mm256_loadu_ps(pv.add(i)), _mm256_loadu_ps(po.add(i))),
            );
            i += 8;
        }
        for j in i..n {
            o[j] += w * v[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_portable_agree() {
        for n in [0, 1, 7, 8, 31, 32, 40, 128, 131] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "dot, n = {n}");
            assert!((portable::dot(&a, &b) as f64 - want).abs() < 1e-5, "portable dot, n = {n}");
            let (mut o1, mut o2) = (b.clone(), b.clone());
            axpy(&mut o1, 0.5, &a);
            portable::axpy(&mut o2, 0.5, &a);
            for (x, y) in o1.iter().zip(&o2) {
                assert!((x - y).abs() < 1e-6, "axpy, n = {n}: {x} vs {y}");
            }
        }
    }
}
