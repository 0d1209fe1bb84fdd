//! ggml block codecs: quantize and dequantize, bit-compatible with ggml (`ggml-common.h`, `ggml-quants.c`).
//!
//! Every quantized type packs a fixed number of values (32 or 256) into a fixed-size block; the
//! per-type modules document each layout byte by byte. Block structs are `#[repr(C)]` and `Pod`, with
//! the field order of ggml, so `bytemuck` can view a row of blocks as bytes and back (little-endian
//! hosts, as ggml). The functions here read and write blocks unaligned, so any byte slice works.
//!
//! Dequantization follows ggml's formulas exactly. Quantization produces valid ggml blocks but is not
//! byte-identical to llama.cpp: each quantizer starts from llama.cpp's reference choice, then searches
//! nearby encodings and keeps whichever reconstructs the block with the smallest squared error, so
//! its error is never worse than the reference's, block by block (see `search`).

mod float;
mod kquant_mins;
mod kquant_symmetric;
mod lanes;
mod q2_k;
mod q3_k;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;
mod q8_k;
mod search;

use anyhow::{bail, Result};
use bytemuck::Pod;

use self::search::tempered;

use crate::format::GgmlType;

pub use kquant_mins::get_scale_min_k4;
pub use q2_k::BlockQ2K;
pub use q3_k::BlockQ3K;
pub use q4_0::BlockQ4_0;
pub use q4_1::BlockQ4_1;
pub use q4_k::BlockQ4K;
pub use q5_0::BlockQ5_0;
pub use q5_1::BlockQ5_1;
pub use q5_k::BlockQ5K;
pub use q6_k::BlockQ6K;
pub use q8_0::{BlockQ8_0, BlockQ8_1};
pub use q8_k::BlockQ8K;

/// Values per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// A ggml block of `N` values that can be decoded.
trait Block<const N: usize>: Pod {
    fn dequantize(&self, out: &mut [f32; N]);
}

/// A block type this crate can also encode.
trait Quantize<const N: usize>: Block<N> {
    /// Encodes `x` minimizing `Σ w[i]·(x̂[i] − x[i])²`, `w` the error weights (from an importance
    /// matrix, see `quantize_weighted`); with `None`, the type's [`Quantize::VALUE_WEIGHTS`] alone.
    fn quantize(x: &[f32; N], w: Option<&[f32; N]>) -> Self;

    /// Whether the encoder runs faster compiled for AVX2 (see `encode_blocks`).
    const AVX2_PAYS: bool = true;

    /// How each value's error counts, with and without an importance matrix.
    const VALUE_WEIGHTS: ValueWeights = ValueWeights::Tempered;

    /// Whether an importance matrix is used at all (when not, the encoding is the plain one).
    const TAKES_IMPORTANCE: bool = true;
}

/// How a quantizer weights each value's error against the others' of its block: alone, and as it
/// combines with a column's importance from an importance matrix.
///
/// Chosen per type by the KL divergence of the trained demo model's files from its f32 model
/// (valid.txt, ctx 256, 2026-12-05/06; one file per setting, scored as `compare_imatrix.py` does;
/// differences of 2-3% come and go with any change to a few tensors of this 4-layer model, so only
/// larger ones decided). Without an imatrix, weighting by magnitude lowered it at Q2_K (0.0522 →
/// 0.0447), Q4_0 (0.01138 → 0.01110) and Q8_0 (0.000644 → 0.000555), and raised it at Q4_K (+6%),
/// Q5_K (+5%) and Q6_K (+3%); at Q3_K it lowered the KL 2% but raised the perplexity increase from
/// +0.27 to +0.37. With our imatrix, against llama.cpp's tempered `imp·sqrt(σ² + x²)`: `imp·|x|`
/// lowered it at Q2_K (0.0462 → 0.0429) and Q4_0 (2%), and raised it at Q3_K_M (+2%); the
/// importance alone lowered it at Q5_K_S (−9%), Q5_K_M (−6%) and Q6_K (−3%), and raised it at
/// Q3_K_S/M (+6-7%; Q4_K_M +1%). Types not measured take llama.cpp's weights (`Tempered`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueWeights {
    /// Every value counts the same: the plain squared error, times the importance where given.
    Unit,
    /// Alone, the plain squared error; with an importance matrix, the importance tempered by the
    /// value's magnitude (`search::tempered`, llama.cpp's weights).
    Tempered,
    /// Each value counts by its magnitude `|x|`, times its column's importance where one is given:
    /// the large weights, which move a dot product most, are kept most exact (llama.cpp's Q2_K
    /// reference fits its scales with `|x|` too).
    Magnitude,
}

impl ValueWeights {
    /// The error weights of block `x`: `given` where an importance matrix gave them (see
    /// [`ValueWeights::with_importance`]), else these weights alone.
    #[inline(always)]
    fn or_given<const N: usize>(self, given: Option<&[f32; N]>, x: &[f32; N]) -> [f32; N] {
        match (given, self) {
            (Some(w), _) => *w,
            (None, ValueWeights::Unit | ValueWeights::Tempered) => *unit(),
            // The floor keeps an all-zero block's weights from summing to zero (searches divide by it).
            (None, ValueWeights::Magnitude) => array_of(|i| x[i].abs() + 1e-9),
        }
    }

    /// The error weights of block `x` whose columns have importance `imp`.
    #[inline(always)]
    fn with_importance<const N: usize>(self, x: &[f32; N], imp: &[f32; N]) -> [f32; N] {
        match self {
            ValueWeights::Unit => *imp,
            ValueWeights::Tempered => tempered(x, imp),
            ValueWeights::Magnitude => array_of(|i| imp[i] * (x[i].abs() + 1e-9)),
        }
    }
}

/// `[f(0), f(1), …]`, by a plain loop. The encoders use it instead of `std::array::from_fn` and
/// `map`, which are calls the compiler does not always inline into them (the encoders are large),
/// and then run without AVX2, a call per element.
#[inline(always)]
fn array_of<T: Copy + Default, const N: usize>(mut f: impl FnMut(usize) -> T) -> [T; N] {
    let mut out = [T::default(); N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = f(i);
    }
    out
}

/// Unit error weights: what the encoders weight errors by without an importance matrix.
const UNIT: [f32; QK_K] = [1.0; QK_K];

/// The first `N` values of [`UNIT`].
fn unit<const N: usize>() -> &'static [f32; N] {
    const { assert!(N <= QK_K) };
    UNIT[..N].try_into().unwrap_or_else(|_| unreachable!("N <= QK_K"))
}

/// Decodes `dst.len()` values of type `ty` from `src` (which must be exactly `ty.bytes_for(dst.len())` bytes).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_sizes(ty, dst.len(), src.len())?;
    use GgmlType::*;
    match ty {
        F32 => float::decode_f32(src, dst),
        F16 => float::decode_f16(src, dst),
        BF16 => float::decode_bf16(src, dst),
        Q4_0 => decode_blocks::<BlockQ4_0, 32>(src, dst),
        Q4_1 => decode_blocks::<BlockQ4_1, 32>(src, dst),
        Q5_0 => decode_blocks::<BlockQ5_0, 32>(src, dst),
        Q5_1 => decode_blocks::<BlockQ5_1, 32>(src, dst),
        Q8_0 => decode_blocks::<BlockQ8_0, 32>(src, dst),
        Q8_1 => decode_blocks::<BlockQ8_1, 32>(src, dst),
        Q2_K => decode_blocks::<BlockQ2K, QK_K>(src, dst),
        Q3_K => decode_blocks::<BlockQ3K, QK_K>(src, dst),
        Q4_K => decode_blocks::<BlockQ4K, QK_K>(src, dst),
        Q5_K => decode_blocks::<BlockQ5K, QK_K>(src, dst),
        Q6_K => decode_blocks::<BlockQ6K, QK_K>(src, dst),
        Q8_K => decode_blocks::<BlockQ8K, QK_K>(src, dst),
    }
    Ok(())
}

/// Encodes `src` (a whole number of blocks) into `dst` (exactly `ty.bytes_for(src.len())` bytes).
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    encode(ty, src, None, dst)
}

/// Encodes rows `src` as [`quantize`] does, but minimizing each row's error weighted by
/// `importance`, one value per column (`importance.len()` is the row length): llama.cpp's
/// importance-matrix quantization, where a column's importance is the mean of its input's squares
/// over a calibration text, so that errors count as much as they move the product. Float types
/// and Q8_0 ignore it.
///
/// The error weights are the importance combined with each value's magnitude as the type's
/// [`ValueWeights`] say: `imp·sqrt(σ² + x²)` with σ² = 2·mean(x²) over the block (llama.cpp's
/// search weights; see [`search::tempered`]), `imp·|x|`, or the importance alone.
pub fn quantize_weighted(ty: GgmlType, src: &[f32], importance: &[f32], dst: &mut [u8]) -> Result<()> {
    let cols = importance.len();
    if cols == 0 || !src.len().is_multiple_of(cols) || !cols.is_multiple_of(ty.block_len()) {
        bail!(
            "importance for rows of {cols} values does not fit {} values of {ty} (blocks of {})",
            src.len(),
            ty.block_len()
        );
    }
    if let Some(bad) = importance.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        bail!("importance weights must be finite and non-negative, found {bad}");
    }
    encode(ty, src, Some(importance), dst)
}

fn encode(ty: GgmlType, src: &[f32], imp: Option<&[f32]>, dst: &mut [u8]) -> Result<()> {
    check_sizes(ty, src.len(), dst.len())?;
    use GgmlType::*;
    match ty {
        F32 => float::encode_f32(src, dst),
        F16 => float::encode_f16(src, dst),
        BF16 => float::encode_bf16(src, dst),
        Q4_0 => encode_blocks::<BlockQ4_0, 32>(src, imp, dst),
        Q4_1 => encode_blocks::<BlockQ4_1, 32>(src, imp, dst),
        Q5_0 => encode_blocks::<BlockQ5_0, 32>(src, imp, dst),
        Q5_1 => encode_blocks::<BlockQ5_1, 32>(src, imp, dst),
        Q8_0 => encode_blocks::<BlockQ8_0, 32>(src, imp, dst),
        Q2_K => encode_blocks::<BlockQ2K, QK_K>(src, imp, dst),
        Q3_K => encode_blocks::<BlockQ3K, QK_K>(src, imp, dst),
        Q4_K => encode_blocks::<BlockQ4K, QK_K>(src, imp, dst),
        Q5_K => encode_blocks::<BlockQ5K, QK_K>(src, imp, dst),
        Q6_K => encode_blocks::<BlockQ6K, QK_K>(src, imp, dst),
        Q8_K => encode_blocks::<BlockQ8K, QK_K>(src, imp, dst),
        Q8_1 => bail!("quantizing to {ty} is not supported"),
    }
    Ok(())
}

/// Whether `quantize` supports `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    // Q8_1 is only ever an activation format in ggml; nothing stores weights in it.
    !matches!(ty, GgmlType::Q8_1)
}

pub fn quantize_to_vec(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>> {
    let mut dst = vec![0u8; byte_len(ty, src.len())?];
    quantize(ty, src, &mut dst)?;
    Ok(dst)
}

pub fn dequantize_to_vec(ty: GgmlType, src: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut dst = vec![0f32; n];
    dequantize(ty, src, &mut dst)?;
    Ok(dst)
}

fn byte_len(ty: GgmlType, n: usize) -> Result<usize> {
    match ty.bytes_for(n) {
        Some(bytes) => Ok(bytes),
        None => bail!("{n} values are not a whole number of {ty} blocks of {}", ty.block_len()),
    }
}

fn check_sizes(ty: GgmlType, n: usize, bytes: usize) -> Result<()> {
    let expected = byte_len(ty, n)?;
    if bytes != expected {
        bail!("{n} values of {ty} take {expected} bytes, got a buffer of {bytes}");
    }
    Ok(())
}

fn decode_blocks<B: Block<N>, const N: usize>(src: &[u8], dst: &mut [f32]) {
    let (values, _) = dst.as_chunks_mut::<N>();
    for (bytes, out) in src.chunks_exact(size_of::<B>()).zip(values) {
        bytemuck::pod_read_unaligned::<B>(bytes).dequantize(out);
    }
}

/// Encodes every block of `src`; block `i` of a row takes importance `imp[N·i .. N·(i + 1)]` (rows
/// are `imp.len()` long, a whole number of blocks: checked by `quantize_weighted`), combined with the
/// values' magnitudes into the block's error weights (`ValueWeights::with_importance`).
///
/// The K-quant searches run on all sub-blocks of a super-block at once, as plain loops over
/// [`lanes::Lanes`]; compiled for AVX2 (where the CPU has it) they run on 8-wide registers instead
/// of SSE's 4: measured on one core (`benches/codec.rs`, AVX-512 EPYC), Q2_K 97 vs 67 MiB/s, Q4_K 99
/// vs 68, Q6_K 127 vs 93; Q8_0 has no search and stays on SSE (it measured 20% slower on AVX2).
/// Every encoder is inlined into both versions, and Rust neither reassociates nor fuses float
/// operations, so both give the same bits.
fn encode_blocks<B: Quantize<N>, const N: usize>(src: &[f32], imp: Option<&[f32]>, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if B::AVX2_PAYS && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above), all the function requires.
        return unsafe { encode_blocks_avx2::<B, N>(src, imp, dst) };
    }
    encode_blocks_inline::<B, N>(src, imp, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn encode_blocks_avx2<B: Quantize<N>, const N: usize>(src: &[f32], imp: Option<&[f32]>, dst: &mut [u8]) {
    encode_blocks_inline::<B, N>(src, imp, dst)
}

#[inline(always)]
fn encode_blocks_inline<B: Quantize<N>, const N: usize>(src: &[f32], imp: Option<&[f32]>, dst: &mut [u8]) {
    let (values, _) = src.as_chunks::<N>();
    let imp_blocks = imp.filter(|_| B::TAKES_IMPORTANCE).map(|w| w.as_chunks::<N>().0);
    for (i, (x, bytes)) in values.iter().zip(dst.chunks_exact_mut(size_of::<B>())).enumerate() {
        let w = imp_blocks.map(|blocks| B::VALUE_WEIGHTS.with_importance(x, &blocks[i % blocks.len()]));
        bytes.copy_from_slice(bytemuck::bytes_of(&B::quantize(x, w.as_ref())));
    }
}

#[cfg(test)]
mod tests;
