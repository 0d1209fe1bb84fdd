//! K-quants (Q4_K, Q5_K, Q6_K) against many tokens (prompts) with AVX-512 VNNI: eight weight rows in the
//! eight i32 lanes of a 256-bit register, the way llama.cpp's repacked "8x8" Q4_K kernels work, but
//! repacked on the fly.
//!
//! The row kernels put 64 values of one row in a register and reduce across lanes for every block and
//! token; their float epilogue, packing and horizontal sums cost more than the multiplies. Here a group
//! of 8 rows is first unpacked once per product into [`Block8`]s: for every 4 consecutive values, the 8
//! rows' weights as 32 bytes (unsigned: Q6_K's offset of 32 is left for later), so that one `vpdpbusd`
//! multiplies them by the same 4 activations of a token (broadcast from memory) and adds into one lane
//! per row. A sub-block's steps need no reduction at all; its scale is one `vpmulld` over the 8 rows,
//! and the block's float work is shared by the 8 rows too: the minimums (Q6_K: the offset times the
//! scale) multiply per-token sums of the activations. Each token's result is 8 consecutive outputs,
//! already in the `[token][row]` layout. Any number of tokens uses all lanes; the unpacking is paid once
//! per 8 rows and block, for all tokens.

use std::arch::x86_64::*;

use super::avx512::k4_scales_mins;
use crate::engine::cpu::dot::activations::BlockQ8K;
use crate::engine::cpu::dot::block_bytes as bytes;

/// Rows per group: one per i32 lane of a 256-bit register.
const ROWS: usize = 8;

/// Tokens computed together: their accumulators (3 registers each) fill the 32 vector registers.
const TOKENS: usize = 8;

/// The weight types, as the `KIND` parameter.
pub(in crate::engine::cpu::dot) const Q4_K: u8 = 0;
pub(in crate::engine::cpu::dot) const Q5_K: u8 = 1;
pub(in crate::engine::cpu::dot) const Q6_K: u8 = 2;

const fn block_bytes(kind: u8) -> usize {
    match kind {
        Q4_K => bytes::Q4_K,
        Q5_K => bytes::Q5_K,
        _ => bytes::Q6_K,
    }
}

/// Sub-blocks per block, each with its own scale: 8 of 32 values for Q4_K/Q5_K, 16 of 16 for Q6_K.
const fn sub_blocks(kind: u8) -> usize {
    if kind == Q6_K {
        16
    } else {
        8
    }
}

/// One block of a group of 8 rows, unpacked: `q[g]` holds the 4 weights (values 4g..4g + 4) of rows
/// 0..8, a byte each; `scales[j]` the sub-block j scale of rows 0..8 and `mins[j]` what multiplies the
/// activations' sum over the sub-block (`dmin * m[j]`; Q6_K: `32 * d * scale[j]`); `d` the rows' block
/// scales. Q4_K/Q5_K use the first 8 sub-block slots.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Block8 {
    q: [[u8; 32]; 64],
    scales: [[i32; ROWS]; 16],
    mins: [[f32; ROWS]; 16],
    d: [f32; ROWS],
}

const EMPTY: Block8 =
    Block8 { q: [[0; 32]; 64], scales: [[0; ROWS]; 16], mins: [[0.0; ROWS]; 16], d: [0.0; ROWS] };

/// `out[t * rows + r] = dot(row r of w, xs[t])` for the `rows = w.len() / row_bytes` rows of `w`, of the
/// type `KIND`.
pub(in crate::engine::cpu::dot) fn kquant_gemm<const KIND: u8>(
    w: &[u8],
    row_bytes: usize,
    xs: &[&[BlockQ8K]],
    out: &mut [f32],
) {
    let rows = w.len() / row_bytes;
    let blocks = row_bytes / block_bytes(KIND);
    assert!(
        w.len().is_multiple_of(row_bytes)
            && row_bytes.is_multiple_of(block_bytes(KIND))
            && out.len() == rows * xs.len()
            && xs.iter().all(|x| x.len() == blocks),
        "dot kernel called with inconsistent sizes"
    );
    // Per token and block, the activations' sum over each sub-block times their scale: what `mins`
    // multiplies.
    let dsums: Vec<[f32; 16]> = xs
        .iter()
        .flat_map(|x| x.iter())
        .map(|b| {
            std::array::from_fn(|j| match KIND {
                Q6_K => b.d * b.bsums[j] as f32,
                _ if j < 8 => b.d * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32) as f32,
                _ => 0.0,
            })
        })
        .collect();
    let mut unpacked = vec![EMPTY; blocks];
    let groups: Vec<&[u8]> = w.chunks(ROWS * row_bytes).collect();
    for (group, &w) in groups.iter().enumerate() {
        let n_rows = w.len() / row_bytes;
        // SAFETY: sizes checked above; CPU features: the caller hands this out at the AVX-512 level only.
        unsafe {
            if KIND == Q6_K {
                unpack_q6k_rows(w, row_bytes, &mut unpacked)
            } else {
                unpack_k45_rows::<KIND>(w, row_bytes, &mut unpacked)
            }
        };
        for (first, tokens) in xs.chunks(TOKENS).enumerate().map(|(i, t)| (i * TOKENS, t)) {
            // While the first tokens compute, the next group's weights come into the caches, so that
            // unpacking them does not wait on memory.
            let next = groups.get(group + 1).filter(|_| first == 0).map(|next| Next {
                w: next,
                row_bytes,
                block_bytes: block_bytes(KIND),
            });
            let dsums = &dsums[first * blocks..];
            let mut sums = [[0f32; ROWS]; TOKENS];
            // SAFETY: as above.
            unsafe {
                match tokens.len() {
                    1 => group_sums::<1, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    2 => group_sums::<2, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    3 => group_sums::<3, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    4 => group_sums::<4, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    5 => group_sums::<5, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    6 => group_sums::<6, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    7 => group_sums::<7, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    8 => group_sums::<8, KIND>(&unpacked, tokens, dsums, next, &mut sums),
                    n => unreachable!("chunks of at most {TOKENS} tokens, got {n}"),
                }
            }
            for (t, sums) in sums[..tokens.len()].iter().enumerate() {
                let at = (first + t) * rows + group * ROWS;
                out[at..at + n_rows].copy_from_slice(&sums[..n_rows]);
            }
        }
    }
}

/// Unpacks every Q4_K or Q5_K block (KIND) of up to 8 rows (`w`, `row_bytes` each) into
/// `out`; missing rows read as zeros.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_k45_rows<const KIND: u8>(w: &[u8], row_bytes: usize, out: &mut [Block8]) {
    let n_rows = w.len() / row_bytes;
    let mask = _mm256_set1_epi8(0xF);
    for (i, b) in out.iter_mut().enumerate() {
        let block = |r: usize| w.as_ptr().add(r * row_bytes + i * block_bytes(KIND));
        // Per row: the 8 scales (i32) and the 8 `dmin * m` (f32), transposed to per sub-block.
        let mut scales = [_mm256_setzero_si256(); ROWS];
        let mut mins = [_mm256_setzero_si256(); ROWS];
        for r in 0..ROWS {
            if r >= n_rows {
                b.d[r] = 0.0;
                continue;
            }
            let p = block(r);
            b.d[r] = f16_at(p);
            let scales_mins = k4_scales_mins(p.add(4));
            scales[r] = _mm256_cvtepu8_epi32(scales_mins);
            let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scales_mins, 8)));
            mins[r] = _mm256_castps_si256(_mm256_mul_ps(_mm256_set1_ps(f16_at(p.add(2))), m));
        }
        for (j, (s, m)) in transpose_8x8(&scales).into_iter().zip(transpose_8x8(&mins)).enumerate() {
            _mm256_store_si256(b.scales[j].as_mut_ptr().cast(), s);
            _mm256_store_si256(b.mins[j].as_mut_ptr().cast(), m);
        }
        let transposed = |at: usize| transposed_bytes(n_rows, block, at);
        // Q5_K: byte l of the fifth bits holds value l of sub-block j in bit j.
        let fifth = if KIND == Q5_K { transposed(16) } else { [_mm256_setzero_si256(); 8] };
        let fifth_bit = |k: usize, j: usize| {
            let bit = _mm256_set1_epi8((1u8 << j) as i8);
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(fifth[k], bit), bit), _mm256_set1_epi8(16))
        };
        // Chunk c (32 bytes) of the rows, transposed: 4 bytes hold groups 16c + k (low nibbles) and
        // 16c + 8 + k (high nibbles) of all rows at once.
        for c in 0..4 {
            for (k, v) in transposed(16 + 32 * (KIND == Q5_K) as usize + 32 * c).into_iter().enumerate() {
                let (mut low, mut high) =
                    (_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
                if KIND == Q5_K {
                    low = _mm256_or_si256(low, fifth_bit(k, 2 * c));
                    high = _mm256_or_si256(high, fifth_bit(k, 2 * c + 1));
                }
                _mm256_store_si256(b.q[16 * c + k].as_mut_ptr().cast(), low);
                _mm256_store_si256(b.q[16 * c + 8 + k].as_mut_ptr().cast(), high);
            }
        }
    }
}

/// Unpacks every Q6_K block of up to 8 rows (`w`, `row_bytes` each) into `out`; missing rows read as
/// zeros. A value is `d * scale[i / 16] * (q - 32)`: q (6 bits) goes to `q` as it is, the offset to `mins`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_q6k_rows(w: &[u8], row_bytes: usize, out: &mut [Block8]) {
    let n_rows = w.len() / row_bytes;
    let (low4, top2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
    for (i, b) in out.iter_mut().enumerate() {
        let block = |r: usize| w.as_ptr().add(r * row_bytes + i * block_bytes(Q6_K));
        // Per row: the 16 scales (i32) and `32 * d * scale` (f32), in two halves of 8 sub-blocks.
        let mut scales = [[_mm256_setzero_si256(); ROWS]; 2];
        let mut mins = [[_mm256_setzero_si256(); ROWS]; 2];
        for r in 0..n_rows {
            let p = block(r);
            let d = f16_at(p.add(208));
            b.d[r] = d;
            for (half, (scales, mins)) in scales.iter_mut().zip(&mut mins).enumerate() {
                let s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(192 + 8 * half).cast()));
                scales[r] = s;
                mins[r] = _mm256_castps_si256(_mm256_mul_ps(_mm256_set1_ps(32.0 * d), _mm256_cvtepi32_ps(s)));
            }
        }
        for r in n_rows..ROWS {
            b.d[r] = 0.0;
        }
        for half in 0..2 {
            let pairs = transpose_8x8(&scales[half]).into_iter().zip(transpose_8x8(&mins[half]));
            for (j, (s, m)) in pairs.enumerate() {
                _mm256_store_si256(b.scales[8 * half + j].as_mut_ptr().cast(), s);
                _mm256_store_si256(b.mins[8 * half + j].as_mut_ptr().cast(), m);
            }
        }
        // Per half h of 128 values: ql[64h..64h + 32] holds the low 4 bits of values l (low nibbles) and
        // l + 64 (high), ql[64h + 32..64h + 64] those of l + 32 and l + 96; qh[32h + l] their top 2 bits
        // in bit pairs 0, 1, 2, 3 (quarters 0..4). Transposed, register k covers l = 4k..4k + 4.
        for h in 0..2 {
            let (ql0, ql1) =
                (transposed_bytes(n_rows, block, 64 * h), transposed_bytes(n_rows, block, 64 * h + 32));
            let qh = transposed_bytes(n_rows, block, 128 + 32 * h);
            for k in 0..8 {
                // The top 2 bits of quarter s, moved to bits 4 and 5.
                let top = |s: i32| {
                    let v = match s {
                        0 => _mm256_slli_epi16(qh[k], 4),
                        1 => _mm256_slli_epi16(qh[k], 2),
                        2 => qh[k],
                        _ => _mm256_srli_epi16(qh[k], 2),
                    };
                    _mm256_and_si256(v, top2)
                };
                let quarters = [
                    _mm256_and_si256(ql0[k], low4),
                    _mm256_and_si256(ql1[k], low4),
                    _mm256_and_si256(_mm256_srli_epi16(ql0[k], 4), low4),
                    _mm256_and_si256(_mm256_srli_epi16(ql1[k], 4), low4),
                ];
                for (s, low) in quarters.into_iter().enumerate() {
                    let q = _mm256_or_si256(low, top(s as i32));
                    _mm256_store_si256(b.q[32 * h + 8 * s + k].as_mut_ptr().cast(), q);
                }
            }
        }
    }
}

/// The 32 bytes at offset `at` of `block(r)` for rows `r < n_rows` (zeros for the others), transposed:
/// register k holds bytes 4k..4k + 4 of all rows.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transposed_bytes(n_rows: usize, block: impl Fn(usize) -> *const u8, at: usize) -> [__m256i; 8] {
    transpose_8x8(&std::array::from_fn(|r| {
        if r < n_rows {
            _mm256_loadu_si256(block(r).add(at).cast())
        } else {
            _mm256_setzero_si256()
        }
    }))
}

/// Rows to columns for 8 registers of 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose_8x8(r: &[__m256i; 8]) -> [__m256i; 8] {
    // Pairs of rows interleaved: lo01 = r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] r0[5] r1[5], and so on.
    let (lo01, hi01) = (_mm256_unpacklo_epi32(r[0], r[1]), _mm256_unpackhi_epi32(r[0], r[1]));
    let (lo23, hi23) = (_mm256_unpacklo_epi32(r[2], r[3]), _mm256_unpackhi_epi32(r[2], r[3]));
    let (lo45, hi45) = (_mm256_unpacklo_epi32(r[4], r[5]), _mm256_unpackhi_epi32(r[4], r[5]));
    let (lo67, hi67) = (_mm256_unpacklo_epi32(r[6], r[7]), _mm256_unpackhi_epi32(r[6], r[7]));
    // Columns k and k + 4 of rows 0..4 (a) and 4..8 (b), in the low and high 128 bits.
    let a = [
        _mm256_unpacklo_epi64(lo01, lo23),
        _mm256_unpackhi_epi64(lo01, lo23),
        _mm256_unpacklo_epi64(hi01, hi23),
        _mm256_unpackhi_epi64(hi01, hi23),
    ];
    let b = [
        _mm256_unpacklo_epi64(lo45, lo67),
        _mm256_unpackhi_epi64(lo45, lo67),
        _mm256_unpacklo_epi64(hi45, hi67),
        _mm256_unpackhi_epi64(hi45, hi67),
    ];
    std::array::from_fn(|k| {
        if k < 4 {
            _mm256_permute2x128_si256(a[k], b[k], 0x20)
        } else {
            _mm256_permute2x128_si256(a[k - 4], b[k - 4], 0x31)
        }
    })
}

/// The 8 rows of `blocks` (of type KIND) against N tokens: `sums[t][r]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group_sums<const N: usize, const KIND: u8>(
    blocks: &[Block8],
    xs: &[&[BlockQ8K]],
    dsums: &[[f32; 16]],
    next: Option<Next>,
    sums: &mut [[f32; ROWS]; TOKENS],
) {
    let n_blocks = blocks.len();
    let mut acc = [_mm256_setzero_ps(); N];
    for (i, b) in blocks.iter().enumerate() {
        if let Some(next) = next {
            next.prefetch(i);
        }
        let x: [&BlockQ8K; N] = std::array::from_fn(|t| xs[t].get_unchecked(i));
        let mut sumi = [_mm256_setzero_si256(); N];
        // Groups of 4 values per sub-block.
        let per_sub = 64 / sub_blocks(KIND);
        for j in 0..sub_blocks(KIND) {
            let mut sub = [_mm256_setzero_si256(); N];
            for g in per_sub * j..per_sub * (j + 1) {
                let q = _mm256_load_si256(b.q[g].as_ptr().cast());
                for t in 0..N {
                    let x4 = _mm256_set1_epi32(x[t].qs.as_ptr().add(4 * g).cast::<i32>().read_unaligned());
                    sub[t] = _mm256_dpbusd_epi32(sub[t], q, x4);
                }
            }
            let scale = _mm256_load_si256(b.scales[j].as_ptr().cast());
            for t in 0..N {
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(sub[t], scale));
            }
        }
        let d = _mm256_load_ps(b.d.as_ptr());
        for t in 0..N {
            acc[t] = _mm256_fmadd_ps(
                _mm256_mul_ps(d, _mm256_set1_ps(x[t].d)),
                _mm256_cvtepi32_ps(sumi[t]),
                acc[t],
            );
            for (mins, &dsum) in b.mins[..sub_blocks(KIND)].iter().zip(dsums.get_unchecked(t * n_blocks + i))
            {
                acc[t] = _mm256_fnmadd_ps(_mm256_load_ps(mins.as_ptr()), _mm256_set1_ps(dsum), acc[t]);
            }
        }
    }
    for t in 0..N {
        _mm256_storeu_ps(sums[t].as_mut_ptr(), acc[t]);
    }
}

/// The rows of the next group, to prefetch block by block.
#[derive(Clone, Copy)]
struct Next<'a> {
    w: &'a [u8],
    row_bytes: usize,
    block_bytes: usize,
}

impl Next<'_> {
    /// Asks for block `i` of every row to be brought into the caches.
    #[inline]
    #[target_feature(enable = "sse")]
    fn prefetch(self, i: usize) {
        for row in self.w.chunks_exact(self.row_bytes) {
            let block = &row[i * self.block_bytes..][..self.block_bytes];
            for line in (0..self.block_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(block[line..].as_ptr().cast());
            }
            _mm_prefetch::<_MM_HINT_T0>(block[self.block_bytes - 1..].as_ptr().cast());
        }
    }
}

/// The little-endian f16 at `p`, converted by the CPU (F16C).
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32)))
}
