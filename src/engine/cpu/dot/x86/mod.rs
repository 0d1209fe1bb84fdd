//! x86-64 kernels. One body of 256-bit kernels ([`simd_kernels!`]) is compiled twice: for AVX2+FMA+F16C,
//! and for AVX-512 with VNNI, where the multiply-accumulate helpers become single `vpdpwssd`/`vpdpbusd`
//! instructions. The AVX-512 level also has 512-bit kernels for the K-quants (`avx512.rs`).

pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

pub(super) fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Scales and minimums (6 bits each) of the 8 sub-blocks of a Q4_K/Q5_K block from its 12 packed bytes,
/// unpacked with word operations (same result as `codec::get_scale_min_k4` for j = 0..8).
#[inline(always)]
pub(super) fn k4_scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    let sc_lo = a & LOW6;
    let sc_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let m_lo = b & LOW6;
    let m_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let join = |lo: u32, hi: u32| (lo as u64 | (hi as u64) << 32).to_le_bytes();
    (join(sc_lo, sc_hi), join(m_lo, m_hi))
}

/// Checks the sizes the kernels rely on (one block of activations per weight block, one output
/// per token), then runs `$f` on groups of at most `$max` tokens (the largest of the listed `$n`), each
/// with the instance for its token count.
macro_rules! by_tile {
    (
        $f:ident::<_, $variant:literal>,
        $block_bytes:expr,
        $w:ident,
        $xs:ident,
        $out:ident,
        [$($n:literal)+],
        $max:literal
    ) => {{
        let blocks = $w.len() / $block_bytes;
        assert!(
            $w.len() % $block_bytes == 0 && $out.len() == $xs.len() && $xs.iter().all(|x| x.len() == blocks),
            "dot kernel called with inconsistent sizes"
        );
        for (xs, out) in $xs.chunks($max).zip($out.chunks_mut($max)) {
            // SAFETY: sizes checked above; CPU features: see `kernel`.
            unsafe {
                match xs.len() {
                    $($n => $f::<$n, $variant>($w, xs, out),)+
                    _ => unreachable!("chunks of at most {} tokens", $max),
                }
            }
        }
    }};
}

/// The kernels, for the target features given as a string literal. The invoking module provides
/// `madd_acc(acc, a, b)` (acc + pairwise i16 products summed into i32 lanes) and `dot_acc(acc, u, s)`
/// (acc + products of unsigned bytes `u` and signed bytes `s`, summed by fours into i32 lanes).
macro_rules! simd_kernels {
    ($features:literal) => {
        use std::arch::x86_64::*;

        use crate::engine::cpu::dot::activations::{BlockQ8K, BlockQ8_0};
        use crate::engine::cpu::dot::{block_bytes as bytes, RowKernel};
        use crate::format::GgmlType;

        /// The 256-bit kernel for `ty`, or None where only the scalar one exists. Callers hand these out
        /// only for a level the CPU has (that is what makes the `unsafe` calls below sound).
        fn kernel_256(ty: GgmlType) -> Option<RowKernel> {
            use GgmlType::*;
            Some(match ty {
                F32 => RowKernel::F32(|w, xs, out| by_tile!(float_n::<_, 0>, 4, w, xs, out, [1 2 3 4], 4)),
                F16 => RowKernel::F32(|w, xs, out| by_tile!(float_n::<_, 1>, 2, w, xs, out, [1 2 3 4], 4)),
                BF16 => RowKernel::F32(|w, xs, out| by_tile!(float_n::<_, 2>, 2, w, xs, out, [1 2 3 4], 4)),
                Q4_0 => RowKernel::Q8_0(|w, xs, out| by_tile!(q4_0_n::<_, 0>, bytes::Q4_0, w, xs, out, [1 2 3 4], 4)),
                Q8_0 => RowKernel::Q8_0(|w, xs, out| by_tile!(q8_0_n::<_, 0>, bytes::Q8_0, w, xs, out, [1 2 3 4], 4)),
                Q4_K => RowKernel::Q8K(|w, xs, out| by_tile!(k45_n::<_, 0>, bytes::Q4_K, w, xs, out, [1 2 3 4], 4)),
                Q5_K => RowKernel::Q8K(|w, xs, out| by_tile!(k45_n::<_, 1>, bytes::Q5_K, w, xs, out, [1 2 3 4], 4)),
                Q6_K => RowKernel::Q8K(|w, xs, out| by_tile!(q6k_n::<_, 0>, bytes::Q6_K, w, xs, out, [1 2 3 4], 4)),
                Q2_K => RowKernel::Q8K(|w, xs, out| by_tile!(k23_n::<_, 2>, bytes::Q2_K, w, xs, out, [1 2 3 4], 4)),
                Q3_K => RowKernel::Q8K(|w, xs, out| by_tile!(k23_n::<_, 3>, bytes::Q3_K, w, xs, out, [1 2 3 4], 4)),
                _ => return None,
            })
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        /// The little-endian f16 at `p`. Moved into a vector register with `vmovd` written out: from
        /// the intrinsics LLVM emits `vpinsrw` into whatever register it likes (an accumulator, say), a
        /// false dependency that serialized whole loops.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn f16_at(p: *const u8) -> f32 {
            let bits = p.cast::<u16>().read_unaligned() as u32;
            let v: __m128i;
            // SAFETY: a register-only instruction (AVX is part of every feature set here).
            std::arch::asm!(
                "vmovd {v}, {bits:e}",
                v = out(xmm_reg) v,
                bits = in(reg) bits,
                options(pure, nomem, nostack)
            );
            _mm_cvtss_f32(_mm_cvtph_ps(v))
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load(p: *const i8) -> __m256i {
            _mm256_loadu_si256(p.cast())
        }

        /// Eight float weights from index `i`: KIND 0 = F32, 1 = F16, 2 = BF16.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load8<const KIND: u8>(p: *const u8, i: usize) -> __m256 {
            match KIND {
                0 => _mm256_loadu_ps(p.add(4 * i).cast()),
                1 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast())),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i).cast())),
                    16,
                )),
            }
        }

        /// The float weight at index `i` (see `load8`).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn value<const KIND: u8>(p: *const u8, i: usize) -> f32 {
            match KIND {
                0 => p.add(4 * i).cast::<f32>().read_unaligned(),
                1 => f16_at(p.add(2 * i)),
                _ => f32::from_bits((p.add(2 * i).cast::<u16>().read_unaligned() as u32) << 16),
            }
        }

        /// Float weights: KIND 0 = F32, 1 = F16, 2 = BF16.
        #[target_feature(enable = $features)]
        unsafe fn float_n<const N: usize, const KIND: u8>(w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
            let n = xs[0].len();
            let p = w.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let mut i = 0;
            while i + 16 <= n {
                let (w0, w1) = (load8::<KIND>(p, i), load8::<KIND>(p, i + 8));
                for t in 0..N {
                    let x = xs[t].as_ptr().add(i);
                    acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[t][1]);
                }
                i += 16;
            }
            for t in 0..N {
                let mut tail = 0.0;
                for j in i..n {
                    tail += value::<KIND>(p, j) * xs[t][j];
                }
                out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + tail;
            }
        }

        /// Signed bytes `a` times signed bytes `b`, summed by fours into i32 lanes, added to `acc`.
        #[inline]
        #[target_feature(enable = $features)]
        fn dot_signed_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            // |a| as unsigned bytes (-128 becomes 128) times b with a's sign.
            dot_acc(acc, _mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
        }

        #[target_feature(enable = $features)]
        unsafe fn q8_0_n<const N: usize, const V: u8>(w: &[u8], xs: &[&[BlockQ8_0]], out: &mut [f32]) {
            let mut acc = [_mm256_setzero_ps(); N];
            for (i, b) in w.chunks_exact(bytes::Q8_0).enumerate() {
                let d = f16_at(b.as_ptr());
                let q = load(b.as_ptr().add(2).cast());
                for t in 0..N {
                    let x = xs[t].get_unchecked(i);
                    let s = dot_signed_acc(_mm256_setzero_si256(), q, load(x.qs.as_ptr()));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(s), acc[t]);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn q4_0_n<const N: usize, const V: u8>(w: &[u8], xs: &[&[BlockQ8_0]], out: &mut [f32]) {
            let mask = _mm256_set1_epi8(0xF);
            let eight = _mm256_set1_epi8(8);
            let mut acc = [_mm256_setzero_ps(); N];
            for (i, b) in w.chunks_exact(bytes::Q4_0).enumerate() {
                let d = f16_at(b.as_ptr());
                let packed = _mm_loadu_si128(b.as_ptr().add(2).cast());
                // Values 0..16 are the low nibbles, 16..32 the high ones.
                let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
                let q = _mm256_sub_epi8(nibbles, eight);
                for t in 0..N {
                    let x = xs[t].get_unchecked(i);
                    let s = dot_signed_acc(_mm256_setzero_si256(), q, load(x.qs.as_ptr()));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(s), acc[t]);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }

        /// Q4_K (Q5 = 0) and Q5_K (Q5 = 1): `w = d * sc[j] * q - dmin * m[j]` per sub-block j of 32.
        #[target_feature(enable = $features)]
        unsafe fn k45_n<const N: usize, const Q5: u8>(w: &[u8], xs: &[&[BlockQ8K]], out: &mut [f32]) {
            let (block_bytes, qs_at) = if Q5 == 1 { (bytes::Q5_K, 48) } else { (bytes::Q4_K, 16) };
            let mask = _mm256_set1_epi8(0xF);
            let sixteen = _mm256_set1_epi8(16);
            let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            let mut acc = [_mm256_setzero_ps(); N];
            for (i, b) in w.chunks_exact(block_bytes).enumerate() {
                let p = b.as_ptr();
                let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                let (sc, mins) = super::k4_scales_mins(&b[4..16]);
                // Each sub-block's minimum twice: it applies to two 16-value bsums.
                let mins16 =
                    _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64(mins.as_ptr().cast()), dup));
                let high_bits = if Q5 == 1 { load(p.add(16).cast()) } else { _mm256_setzero_si256() };
                let mut sumi = [_mm256_setzero_si256(); N];
                for j in 0..4 {
                    let q = load(p.add(qs_at + 32 * j).cast());
                    let mut lo = _mm256_and_si256(q, mask);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                    if Q5 == 1 {
                        // Sub-block k's fifth bits are bit k of the 32 high-bit bytes.
                        let bit_lo = _mm256_set1_epi8((1u8 << (2 * j)) as i8);
                        let bit_hi = _mm256_set1_epi8((2u8 << (2 * j)) as i8);
                        let set_lo = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits, bit_lo), bit_lo);
                        let set_hi = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits, bit_hi), bit_hi);
                        lo = _mm256_or_si256(lo, _mm256_and_si256(set_lo, sixteen));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(set_hi, sixteen));
                    }
                    let scale_lo = _mm256_set1_epi16(sc[2 * j] as i16);
                    let scale_hi = _mm256_set1_epi16(sc[2 * j + 1] as i16);
                    for t in 0..N {
                        let x = xs[t].get_unchecked(i).qs.as_ptr().add(64 * j);
                        sumi[t] = madd_acc(sumi[t], _mm256_maddubs_epi16(lo, load(x)), scale_lo);
                        sumi[t] = madd_acc(sumi[t], _mm256_maddubs_epi16(hi, load(x.add(32))), scale_hi);
                    }
                }
                for t in 0..N {
                    let x = xs[t].get_unchecked(i);
                    let sum_mins = _mm256_madd_epi16(load(x.bsums.as_ptr().cast()), mins16);
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                    acc[t] =
                        _mm256_fnmadd_ps(_mm256_set1_ps(dmin * x.d), _mm256_cvtepi32_ps(sum_mins), acc[t]);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }

        /// Q2_K (BITS = 2): `w = d * sc[s] * q - dmin * m[s]`, and Q3_K (BITS = 3):
        /// `w = d * sc[s] * (q - 4)`, for sub-block `s = i / 16`. Both keep 2 bits of each value in
        /// bits 2k of `qs[32h + l]` (value 128h + 32k + l); Q3_K's third bit is bit 4h + k of
        /// `hmask[l]`. Levels stay unsigned (0..3 or 0..7) for `maddubs`; Q3_K's offset of 4 comes off
        /// through the bsums: 4 * Σ sc[s] * bsums[s].
        #[target_feature(enable = $features)]
        unsafe fn k23_n<const N: usize, const BITS: u8>(w: &[u8], xs: &[&[BlockQ8K]], out: &mut [f32]) {
            let (block_bytes, qs_at) = if BITS == 2 { (bytes::Q2_K, 16) } else { (bytes::Q3_K, 32) };
            let m2 = _mm256_set1_epi8(3);
            let four = _mm256_set1_epi8(4);
            let mut acc = [_mm256_setzero_ps(); N];
            for (i, b) in w.chunks_exact(block_bytes).enumerate() {
                let p = b.as_ptr();
                // The 16 sub-block scales (and Q2_K's mins) as i16.
                let (sc, mins, d, dmin) = if BITS == 2 {
                    let packed = _mm_loadu_si128(p.cast());
                    let sc = _mm_and_si128(packed, _mm_set1_epi8(0xF));
                    let mins = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0xF));
                    (_mm256_cvtepu8_epi16(sc), _mm256_cvtepu8_epi16(mins), f16_at(p.add(80)), f16_at(p.add(82)))
                } else {
                    let block: crate::format::codec::BlockQ3K = bytemuck::pod_read_unaligned(b);
                    let sc: [i8; 16] = std::array::from_fn(|s| block.scale(s));
                    let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr().cast()));
                    (sc, _mm256_setzero_si256(), f16_at(p.add(108)), 0.0)
                };
                let hmask = if BITS == 3 { load(p.cast()) } else { _mm256_setzero_si256() };
                let sc_arr: [i16; 16] = std::mem::transmute::<__m256i, [i16; 16]>(sc);
                let mut sumi = [_mm256_setzero_si256(); N];
                for h in 0..2 {
                    let q = load(p.add(qs_at + 32 * h).cast());
                    for k in 0..4 {
                        let shift = _mm_cvtsi32_si128(2 * k as i32);
                        let mut levels = _mm256_and_si256(_mm256_srl_epi16(q, shift), m2);
                        if BITS == 3 {
                            let bit = _mm256_set1_epi8((1u8 << (4 * h + k)) as i8);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(hmask, bit), bit);
                            levels = _mm256_or_si256(levels, _mm256_and_si256(set, four));
                        }
                        // Sub-block 8h + 2k in the low 128-bit lane, 8h + 2k + 1 in the high one.
                        let s = 8 * h + 2 * k;
                        let scale = _mm256_set_m128i(_mm_set1_epi16(sc_arr[s + 1]), _mm_set1_epi16(sc_arr[s]));
                        for t in 0..N {
                            let x = xs[t].get_unchecked(i).qs.as_ptr().add(128 * h + 32 * k);
                            sumi[t] = madd_acc(sumi[t], _mm256_maddubs_epi16(levels, load(x)), scale);
                        }
                    }
                }
                for t in 0..N {
                    let x = xs[t].get_unchecked(i);
                    let bsums = load(x.bsums.as_ptr().cast());
                    if BITS == 2 {
                        let sum_mins = _mm256_madd_epi16(bsums, mins);
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                        acc[t] =
                            _mm256_fnmadd_ps(_mm256_set1_ps(dmin * x.d), _mm256_cvtepi32_ps(sum_mins), acc[t]);
                    } else {
                        let offset = _mm256_madd_epi16(bsums, sc);
                        let s = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(offset, 2));
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(s), acc[t]);
                    }
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }

        /// Q6_K: `w = d * sc[i / 16] * (q - 32)`, q = 4 low bits from `ql` and 2 high bits from `qh`.
        #[target_feature(enable = $features)]
        unsafe fn q6k_n<const N: usize, const V: u8>(w: &[u8], xs: &[&[BlockQ8K]], out: &mut [f32]) {
            let m4 = _mm256_set1_epi8(0xF);
            let bits = [0x03u8, 0x0C, 0x30, 0xC0].map(|m| _mm256_set1_epi8(m as i8));
            // Per 32-value quarter k: the i16 scale 2k in the low 128-bit lane (its first 16 values), the
            // scale 2k + 1 in the high lane.
            let pick = [0i16, 1, 2, 3].map(|k| {
                _mm256_set_m128i(
                    _mm_set1_epi16((4 * k + 3) << 8 | (4 * k + 2)),
                    _mm_set1_epi16((4 * k + 1) << 8 | 4 * k),
                )
            });
            let mut acc = [_mm256_setzero_ps(); N];
            for (i, b) in w.chunks_exact(bytes::Q6_K).enumerate() {
                let p = b.as_ptr();
                let d = f16_at(p.add(208));
                let mut sumi = [_mm256_setzero_si256(); N];
                for h in 0..2 {
                    // The 8 scales of this half as i16, in both lanes.
                    let sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                        p.add(192 + 8 * h).cast(),
                    )));
                    let ql0 = load(p.add(64 * h).cast());
                    let ql1 = load(p.add(64 * h + 32).cast());
                    let qh = load(p.add(128 + 32 * h).cast());
                    let q = [
                        _mm256_or_si256(
                            _mm256_and_si256(ql0, m4),
                            _mm256_slli_epi16(_mm256_and_si256(qh, bits[0]), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, m4),
                            _mm256_slli_epi16(_mm256_and_si256(qh, bits[1]), 2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                            _mm256_and_si256(qh, bits[2]),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_srli_epi16(_mm256_and_si256(qh, bits[3]), 2),
                        ),
                    ];
                    for k in 0..4 {
                        let scale = _mm256_shuffle_epi8(sc, pick[k]);
                        for t in 0..N {
                            let x = xs[t].get_unchecked(i).qs.as_ptr().add(128 * h + 32 * k);
                            sumi[t] = madd_acc(sumi[t], _mm256_maddubs_epi16(q[k], load(x)), scale);
                        }
                    }
                }
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
                for t in 0..N {
                    let x = xs[t].get_unchecked(i);
                    // The offset of 32: 32 * Σ sc[g] * bsums[g].
                    let offset = _mm256_madd_epi16(load(x.bsums.as_ptr().cast()), sc16);
                    let s = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(offset, 5));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(s), acc[t]);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }
    };
}

pub(super) mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_set1_epi16,
    };

    #[inline]
    #[target_feature(enable = "avx2")]
    fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_acc(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // Pairs of products fit in i16: |u| <= 128 and |s| <= 127 for our operands.
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    }

    simd_kernels!("avx2,fma,f16c");

    pub(in crate::engine::cpu::dot) fn kernel(ty: GgmlType) -> Option<RowKernel> {
        kernel_256(ty)
    }
}

pub(super) mod avx512;
mod kquant_gemm;
