//! AVX-512 (F, BW, VL, VNNI): the 256-bit kernels with `vpdpwssd`/`vpdpbusd`, and 512-bit kernels for the
//! K-quants, which carry nearly all of Mixtral's weights. A 512-bit register holds 64 weights of one
//! K-quant block; per token, Q4_K/Q5_K spend three multiplies per 128 multiply-adds (`block_sums_512`),
//! Q6_K four, and up to 8 tokens share each unpacked block (32 vector registers hold their
//! accumulators). Q4_K against one token
//! (decode) has its own 256-bit kernel, and one-token products over long rows prefetch their weights.

#[inline]
#[target_feature(enable = "avx512vl,avx512vnni")]
fn madd_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, a, b)
}

#[inline]
#[target_feature(enable = "avx512vl,avx512vnni")]
fn dot_acc(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

simd_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");

pub(in crate::engine::cpu::dot) fn kernel(ty: GgmlType) -> Option<RowKernel> {
    Some(match ty {
        GgmlType::Q4_K => {
            // One token (decode): 256-bit registers, whose scales need no cross-lane permutes. Both
            // kernels sum the same integer lanes with the same float operations: bit-identical results.
            RowKernel::Q8KGemm(
                |w, xs, out| {
                    if xs.len() == 1 {
                        by_tile!(q4k_256::<_, 0>, bytes::Q4_K, w, xs, out, [1], 1)
                    } else {
                        by_tile!(k45_512::<_, 0>, bytes::Q4_K, w, xs, out, [1 2 3 4 5 6 7 8], 8)
                    }
                },
                super::kquant_gemm::kquant_gemm::<{ super::kquant_gemm::Q4_K }>,
            )
        }
        GgmlType::Q5_K => RowKernel::Q8KGemm(
            |w, xs, out| by_tile!(k45_512::<_, 1>, bytes::Q5_K, w, xs, out, [1 2 3 4 5 6 7 8], 8),
            super::kquant_gemm::kquant_gemm::<{ super::kquant_gemm::Q5_K }>,
        ),
        GgmlType::Q6_K => RowKernel::Q8KGemm(
            |w, xs, out| by_tile!(q6k_512::<_, 0>, bytes::Q6_K, w, xs, out, [1 2 3 4 5 6 7 8], 8),
            super::kquant_gemm::kquant_gemm::<{ super::kquant_gemm::Q6_K }>,
        ),
        _ => return kernel_256(ty),
    })
}

/// `acc` + pairwise i16 products summed into i32 lanes, as one `vpdpwssd`: written as assembly because
/// LLVM's generic x86-64 tuning splits the intrinsic into `vpmaddwd` + `vpaddd` (two instructions).
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: a register-only instruction of a feature this function requires.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// `acc` + products of the unsigned bytes `u` and the signed bytes `s`, summed by fours into i32 lanes:
/// one `vpdpbusd` (written out like `dpwssd`).
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpbusd(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: a register-only instruction of a feature this function requires.
    unsafe {
        std::arch::asm!(
            "vpdpbusd {acc}, {u}, {s}",
            acc = inout(zmm_reg) acc,
            u = in(zmm_reg) u,
            s = in(zmm_reg) s,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// The 8 scales (bytes 0..8) and 8 minimums (bytes 8..16), 6 bits each, of a Q4_K/Q5_K block from its 12
/// packed scale bytes at `p`, as `codec::get_scale_min_k4` unpacks them. Reads 16 bytes: the block goes on
/// after its scales.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn k4_scales_mins(p: *const u8) -> __m128i {
    let v = _mm_loadu_si128(p.cast());
    // Bytes 0..4 and 8..12: scales 0-3 and minimums 0-3 in their low 6 bits; bytes 4..8 and 12..16 (packed
    // bytes 8..12): the low 4 bits of scales 4-7 and minimums 4-7 in their low and high nibbles, whose
    // top 2 bits are the top 2 bits of packed bytes 0..4 and 4..8.
    let a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    let b = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    let low = _mm_or_si128(
        _mm_and_si128(a, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0)),
        _mm_and_si128(
            _mm_srli_epi16(a, 4),
            _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15),
        ),
    );
    _mm_or_si128(low, _mm_and_si128(_mm_srli_epi16(b, 2), _mm_set1_epi8(0x30)))
}

/// The two 256-bit halves of `v` added.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1))
}

/// A 512-bit vector with `lo` in its low 256 bits and `hi` in its high 256 bits.
#[inline]
#[target_feature(enable = "avx512f")]
fn halves(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

/// The 32 bytes at `p` in both halves of a 512-bit vector.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn both_halves(p: *const u8) -> __m512i {
    _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()))
}

/// Q4_K (Q5 = 0) and Q5_K (Q5 = 1), 64 values per register: the low nibbles of a 32-byte chunk (sub-block
/// 2j) in the low half, its high nibbles (sub-block 2j + 1) in the high half, matching 64 consecutive
/// activations. Products go through [`block_sums_512`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k45_512<const N: usize, const Q5: u8>(w: &[u8], xs: &[&[BlockQ8K]], out: &mut [f32]) {
    let (block_bytes, qs_at) = if Q5 == 1 { (bytes::Q5_K, 48) } else { (bytes::Q4_K, 16) };
    let mask = _mm512_set1_epi8(0xF);
    let sixteen = _mm512_set1_epi8(16);
    let nibble_shift = halves(_mm256_setzero_si256(), _mm256_set1_epi16(4));
    let dup_mins = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    // Scale lanes of the packed pair (registers 2k, 2k + 1): see `block_sums_512`.
    let pick: [__m512i; 2] = std::array::from_fn(|k| {
        let s = |a: usize, b: usize| {
            let (a, b) = ((4 * k + a) as i16, (4 * k + b) as i16);
            _mm_setr_epi16(a, a, a, a, b, b, b, b)
        };
        halves(_mm256_setr_m128i(s(0, 2), s(0, 2)), _mm256_setr_m128i(s(1, 3), s(1, 3)))
    });
    let mut acc = [_mm256_setzero_ps(); N];
    for (i, b) in w.chunks_exact(block_bytes).enumerate() {
        let p = b.as_ptr();
        let (d, dmin) = (_mm256_set1_ps(f16_at(p)), _mm256_set1_ps(f16_at(p.add(2))));
        let scales_mins = k4_scales_mins(p.add(4));
        // Each sub-block's minimum twice: it applies to two 16-value bsums.
        let mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scales_mins, dup_mins));
        let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(scales_mins));
        let high_bits = if Q5 == 1 { both_halves(p.add(16)) } else { _mm512_setzero_si512() };
        let q: [__m512i; 4] = std::array::from_fn(|j| {
            let q =
                _mm512_and_si512(_mm512_srlv_epi16(both_halves(p.add(qs_at + 32 * j)), nibble_shift), mask);
            if Q5 == 0 {
                return q;
            }
            // Sub-block k's fifth bits are bit k of the 32 high-bit bytes.
            let bit =
                halves(_mm256_set1_epi8((1u8 << (2 * j)) as i8), _mm256_set1_epi8((2u8 << (2 * j)) as i8));
            _mm512_or_si512(q, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(high_bits, bit), sixteen))
        });
        let scale = pick.map(|pick| _mm512_permutexvar_epi16(pick, sc16));
        let sumi: [__m512i; N] = block_sums_512(&q, &scale, |t| xs[t].get_unchecked(i).qs.as_ptr());
        for t in 0..N {
            let x = xs[t].get_unchecked(i);
            // d * Σ sc q x - dmin * Σ m bsums, times the activations' scale, in 256 bits: the float
            // operations share the multiply pipes with the integer ones.
            let sum_mins = _mm256_madd_epi16(_mm256_loadu_si256(x.bsums.as_ptr().cast()), mins16);
            let block = _mm256_fnmadd_ps(
                dmin,
                _mm256_cvtepi32_ps(sum_mins),
                _mm256_mul_ps(d, _mm256_cvtepi32_ps(fold(sumi[t]))),
            );
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(x.d), block, acc[t]);
        }
    }
    for t in 0..N {
        out[t] = hsum(acc[t]);
    }
}

/// Σ scale × (q · x) over one 256-value block for each of N tokens, in i32 lanes, from four registers of
/// 64 unsigned weights (`q[j]` matches activations 64j..64j + 64) whose 8-value groups share a scale.
///
/// `vpdpbusd` sums the products by fours (at most 4 × 63 × 127 < 2^15 for weights below 64), so two of
/// its results pack into one register of i16 without saturating, and one `vpdpwssd` applies the scales:
/// three multiplies per 128 products instead of four with `vpmaddubsw`. Packing interleaves the two
/// registers per 128-bit lane, so `scale[k]` (for registers 2k and 2k + 1) holds, per 128-bit lane, four
/// i16 scales for the first register's values there and four for the second's.
///
/// Which products share an i32 lane matters for bit-identical results with [`q4k_256`], which builds
/// the same lanes from 32-value registers (see there).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_sums_512<const N: usize>(
    q: &[__m512i; 4],
    scale: &[__m512i; 2],
    x: impl Fn(usize) -> *const i8,
) -> [__m512i; N] {
    let mut sumi = [_mm512_setzero_si512(); N];
    // Tokens innermost: their dependency chains interleave instead of queueing one after another.
    for k in 0..2 {
        for (t, sumi) in sumi.iter_mut().enumerate() {
            let x = x(t).add(128 * k);
            let a = dpbusd(_mm512_setzero_si512(), q[2 * k], _mm512_loadu_si512(x.cast()));
            let b = dpbusd(_mm512_setzero_si512(), q[2 * k + 1], _mm512_loadu_si512(x.add(64).cast()));
            *sumi = dpwssd(*sumi, _mm512_packs_epi32(a, b), scale[k]);
        }
    }
    sumi
}

/// Rows at least this long have their weights prefetched (see `prefetch_ahead`).
const LONG_ROW_BYTES: usize = 4096;

/// How far ahead of the kernel the weights are prefetched: about one long row.
const PREFETCH_DISTANCE: usize = 8192;

/// Asks for the weight bytes `PREFETCH_DISTANCE` past the `len` bytes at `p` to be brought into L2.
/// Measured on a 2-core EPYC (Zen 4 class) with one token: rows of 14336 values (a 16 KiB activation vector competing for L1
/// with the weight stream) reached 27 GB/s on two cores without it, 35 GB/s with it; short rows, which
/// the hardware prefetchers already serve at ~44 GB/s, got slower, hence the `LONG_ROW_BYTES` limit.
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_ahead(p: *const u8, len: usize) {
    // Prefetches never fault, so the address may lie past the weights: `wrapping_add` keeps it defined.
    let ahead = p.wrapping_add(PREFETCH_DISTANCE);
    for line in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line).cast());
    }
}

/// Q4_K for one token (decode) in 256-bit registers: one register per 32-value sub-block, scales spread by
/// in-lane byte shuffles (no `vpermw`, no variable shifts), two independent integer sums (short dependency
/// chains keep more blocks in flight).
///
/// Products are summed by fours (`vpdpbusd`) and packed in pairs of sub-blocks (0, 2), (1, 3), (4, 6),
/// (5, 7) before `vpdpwssd` applies the scales, as in [`block_sums_512`]: an i32 lane then holds, for
/// the same 8 value positions, sub-blocks 0, 1, 4, 5 (or 2, 3, 6, 7), exactly the lanes that
/// `block_sums_512` + `fold` produce. With the same float operations after that, both kernels give
/// bit-identical results, so a token's logits do not depend on the batch it was computed in.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_256<const N: usize, const V: u8>(w: &[u8], xs: &[&[BlockQ8K]], out: &mut [f32]) {
    const PAIRS: [(usize, usize); 4] = [(0, 2), (1, 3), (4, 6), (5, 7)];
    let mask = _mm256_set1_epi8(0xF);
    let dup_mins = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    // Byte shuffles that spread the scales (bytes) of a packed pair as i16: 4 lanes of the first
    // sub-block's, then 4 of the second's, in each 128-bit lane.
    let spread: [__m256i; 4] = PAIRS.map(|(a, b)| {
        let (a, b) = (0x8000u16 as i16 | a as i16, 0x8000u16 as i16 | b as i16);
        _mm256_broadcastsi128_si256(_mm_setr_epi16(a, a, a, a, b, b, b, b))
    });
    let mut acc = [_mm256_setzero_ps(); N];
    let prefetch = w.len() >= LONG_ROW_BYTES;
    for (i, b) in w.chunks_exact(bytes::Q4_K).enumerate() {
        let p = b.as_ptr();
        if prefetch {
            prefetch_ahead(p, bytes::Q4_K);
        }
        let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
        let scales_mins = k4_scales_mins(p.add(4));
        let mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scales_mins, dup_mins));
        let sc = _mm256_broadcastsi128_si256(scales_mins);
        let mut q = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let v = _mm256_loadu_si256(p.add(16 + 32 * j).cast());
            q[2 * j] = _mm256_and_si256(v, mask);
            q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        }
        let scale = spread.map(|s| _mm256_shuffle_epi8(sc, s));
        for t in 0..N {
            let x = xs[t].get_unchecked(i);
            let fours: [__m256i; 8] = std::array::from_fn(|k| {
                let x8 = _mm256_loadu_si256(x.qs.as_ptr().add(32 * k).cast());
                dot_acc(_mm256_setzero_si256(), q[k], x8)
            });
            let mut sumi = [_mm256_setzero_si256(); 2];
            for (m, (a, b)) in PAIRS.into_iter().enumerate() {
                sumi[m % 2] = dpwssd256(sumi[m % 2], _mm256_packs_epi32(fours[a], fours[b]), scale[m]);
            }
            let sumi = _mm256_add_epi32(sumi[0], sumi[1]);
            let sum_mins = _mm256_madd_epi16(_mm256_loadu_si256(x.bsums.as_ptr().cast()), mins16);
            let block = _mm256_fnmadd_ps(
                _mm256_set1_ps(dmin),
                _mm256_cvtepi32_ps(sum_mins),
                _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi)),
            );
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(x.d), block, acc[t]);
        }
    }
    for t in 0..N {
        out[t] = hsum(acc[t]);
    }
}

/// `acc` + pairwise i16 products summed into i32 lanes, as one `vpdpwssd` (see `dpwssd`).
#[inline]
#[target_feature(enable = "avx512vl,avx512vnni")]
fn dpwssd256(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let mut acc = acc;
    // SAFETY: a register-only instruction of a feature this function requires.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(ymm_reg) acc,
            a = in(ymm_reg) a,
            b = in(ymm_reg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// Q6_K, 64 values per register: per half of the block, quarters 0-1 in one register and 2-3 in
/// another; `w = d * sc[i / 16] * (q - 32)`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_512<const N: usize, const V: u8>(w: &[u8], xs: &[&[BlockQ8K]], out: &mut [f32]) {
    let m4 = _mm512_set1_epi8(0xF);
    let m30 = _mm512_set1_epi8(0x30);
    // High-bit pairs of quarters 0/1 sit at bits 0/2 of qh, of quarters 2/3 at bits 4/6.
    let shift_01 = halves(_mm256_setzero_si256(), _mm256_set1_epi16(2));
    let shift_23 = halves(_mm256_set1_epi16(4), _mm256_set1_epi16(6));
    // Register r of the block (64 values) uses the 16-value scales 4r..4r+4, 8 i16 lanes each.
    let mut pick = [_mm512_setzero_si512(); 4];
    for (r, p) in pick.iter_mut().enumerate() {
        let g = 4 * r as i16;
        *p = halves(
            _mm256_setr_m128i(_mm_set1_epi16(g), _mm_set1_epi16(g + 1)),
            _mm256_setr_m128i(_mm_set1_epi16(g + 2), _mm_set1_epi16(g + 3)),
        );
    }
    let mut acc = [_mm256_setzero_ps(); N];
    let prefetch = N == 1 && w.len() >= LONG_ROW_BYTES;
    for (i, b) in w.chunks_exact(bytes::Q6_K).enumerate() {
        let p = b.as_ptr();
        if prefetch {
            prefetch_ahead(p, bytes::Q6_K);
        }
        let d = _mm256_set1_ps(f16_at(p.add(208)));
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
        let sc512 = _mm512_castsi256_si512(sc16);
        let mut q = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            let ql = _mm512_loadu_si512(p.add(64 * h).cast());
            let qh = both_halves(p.add(128 + 32 * h));
            let high = |shift| _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi16(qh, shift), 4), m30);
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), high(shift_01));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), high(shift_23));
        }
        let mut scale = [_mm512_setzero_si512(); 4];
        for r in 0..4 {
            scale[r] = _mm512_permutexvar_epi16(pick[r], sc512);
        }
        for t in 0..N {
            let x = xs[t].get_unchecked(i);
            let mut sumi = _mm512_setzero_si512();
            for r in 0..4 {
                let x8 = _mm512_loadu_si512(x.qs.as_ptr().add(64 * r).cast());
                sumi = dpwssd(sumi, _mm512_maddubs_epi16(q[r], x8), scale[r]);
            }
            // The offset of 32: 32 * Σ sc[g] * bsums[g].
            let offset = _mm256_madd_epi16(_mm256_loadu_si256(x.bsums.as_ptr().cast()), sc16);
            let sumi = _mm256_sub_epi32(fold(sumi), _mm256_slli_epi32(offset, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x.d)), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    for t in 0..N {
        out[t] = hsum(acc[t]);
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, RngCore, SeedableRng};

    use crate::format::codec::get_scale_min_k4;

    #[test]
    fn vector_k4_scale_unpacking_matches_the_codec() {
        if !super::super::has_avx2() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let mut q = [0u8; 16];
            rng.fill_bytes(&mut q);
            let mut got = [0u8; 16];
            // SAFETY: AVX2 is present (checked above); `q` has the 16 bytes the function reads.
            unsafe { super::_mm_storeu_si128(got.as_mut_ptr().cast(), super::k4_scales_mins(q.as_ptr())) };
            for j in 0..8 {
                let scales: &[u8; 12] = q[..12].try_into().unwrap();
                assert_eq!((got[j], got[8 + j]), get_scale_min_k4(j, scales), "{q:?} sub-block {j}");
            }
        }
    }
}
