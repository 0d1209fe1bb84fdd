//! Matrix-vector and matrix-matrix products over ggml-quantized weights: the hot loop of the CPU engine.
//!
//! Activations are quantized once per token ([`QuantizedActivations`]: Q8_K blocks for K-quant weights,
//! Q8_0 blocks for 32-block weights, plain f32 for float weights), so that the weight blocks are consumed
//! with integer dot products. Kernels exist per SIMD level (AVX-512 with VNNI, AVX2+FMA, portable scalar);
//! the best one the CPU has runs, unless `MIXTRAL_Q_SIMD=scalar|avx2|avx512` asks for a lower one.
//!
//! Three shapes of work: row kernels (one row against a tile of tokens, `run`), K-quant GEMMs for
//! prompts at the AVX-512 level (8 rows repacked on the fly, `run_gemm`), and [`matvec_many`], which
//! puts the one-token products of a decode step into one parallel pass. [`vector`] has the f32 dot and
//! axpy of attention.

mod activations;
mod scalar;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

/// Block sizes of the weight types the kernels read, from their descriptors (compile-time constants,
/// so that the kernels' block loops see a fixed stride).
mod block_bytes {
    use crate::format::GgmlType;

    pub const Q4_0: usize = GgmlType::Q4_0.block_bytes();
    pub const Q4_1: usize = GgmlType::Q4_1.block_bytes();
    pub const Q5_0: usize = GgmlType::Q5_0.block_bytes();
    pub const Q5_1: usize = GgmlType::Q5_1.block_bytes();
    pub const Q8_0: usize = GgmlType::Q8_0.block_bytes();
    pub const Q2_K: usize = GgmlType::Q2_K.block_bytes();
    pub const Q3_K: usize = GgmlType::Q3_K.block_bytes();
    pub const Q4_K: usize = GgmlType::Q4_K.block_bytes();
    pub const Q5_K: usize = GgmlType::Q5_K.block_bytes();
    pub const Q6_K: usize = GgmlType::Q6_K.block_bytes();
}

use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

use crate::format::{ActivationKind, GgmlType};
use activations::{BlockQ8K, BlockQ8_0};

/// Activations prepared for dot products with weights of type `weight_ty`: Q8_K blocks for K-quant
/// weights, Q8_0 blocks for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights, f32 for F32/F16/BF16 weights.
#[derive(Clone, Debug)]
pub struct QuantizedActivations {
    blocks: Activations,
    len: usize,
}

#[derive(Clone, Debug)]
enum Activations {
    Q8K(Vec<BlockQ8K>),
    Q8_0(Vec<BlockQ8_0>),
    F32(Vec<f32>),
}

fn activation_kind(ty: GgmlType) -> Result<ActivationKind> {
    ty.activations().with_context(|| format!("no CPU dot-product kernel for {ty} weights"))
}

impl QuantizedActivations {
    /// `x.len()` must be a multiple of the weight type's block length.
    pub fn new(weight_ty: GgmlType, x: &[f32]) -> Result<Self> {
        let kind = activation_kind(weight_ty)?;
        ensure!(
            x.len().is_multiple_of(weight_ty.block_len()),
            "activation length {} is not a multiple of the {weight_ty} block length {}",
            x.len(),
            weight_ty.block_len()
        );
        let blocks = match kind {
            ActivationKind::Q8K => Activations::Q8K(activations::quantize_q8k(x)),
            ActivationKind::Q8_0 => Activations::Q8_0(activations::quantize_q8_0(x)),
            ActivationKind::F32 => Activations::F32(x.to_vec()),
        };
        Ok(QuantizedActivations { blocks, len: x.len() })
    }

    /// Number of activation values.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn kind(&self) -> ActivationKind {
        match self.blocks {
            Activations::Q8K(_) => ActivationKind::Q8K,
            Activations::Q8_0(_) => ActivationKind::Q8_0,
            Activations::F32(_) => ActivationKind::F32,
        }
    }
}

/// One weight row against the activations of 1..=TILE tokens: `out[t] = dot(row, xs[t])`. The caller
/// guarantees `out.len() == xs.len() <= TILE` and that every `xs[t]` covers exactly the row's values.
#[derive(Clone, Copy)]
enum RowKernel {
    Q8K(fn(&[u8], &[&[BlockQ8K]], &mut [f32])),
    /// A row kernel, and a [`GemmKernel`] for products with at least [`GEMM_MIN_TOKENS`] tokens.
    Q8KGemm(fn(&[u8], &[&[BlockQ8K]], &mut [f32]), GemmKernel<BlockQ8K>),
    Q8_0(fn(&[u8], &[&[BlockQ8_0]], &mut [f32])),
    F32(fn(&[u8], &[&[f32]], &mut [f32])),
}

/// Consecutive rows of a matrix (the weights, `row_bytes` per row) against all tokens:
/// `out[t * rows + r] = dot(row r, xs[t])`, sizes checked by the kernel.
type GemmKernel<B> = fn(&[u8], usize, &[&[B]], &mut [f32]);

/// Fewest tokens for which a [`GemmKernel`] runs instead of the row kernel: it unpacks its weights once
/// per product, which pays off from a few tokens on.
const GEMM_MIN_TOKENS: usize = 4;

/// Tokens handled per kernel call in [`matmul`]: each weight block is unpacked once for all of them.
const TILE: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SimdLevel {
    Scalar,
    Avx2,
    Avx512,
}

impl SimdLevel {
    fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The best level this CPU runs.
    fn detected() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx512() {
                return SimdLevel::Avx512;
            }
            if x86::has_avx2() {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// The detected level, lowered by `MIXTRAL_Q_SIMD` (a request above the CPU's level is refused with a
    /// warning, never honoured).
    fn active() -> SimdLevel {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = SimdLevel::detected();
            let Ok(wanted) = std::env::var("MIXTRAL_Q_SIMD") else { return best };
            let wanted = match wanted.as_str() {
                "scalar" => SimdLevel::Scalar,
                "avx2" => SimdLevel::Avx2,
                "avx512" => SimdLevel::Avx512,
                other => {
                    eprintln!(
                        "warning: MIXTRAL_Q_SIMD={other} is not scalar, avx2 or avx512; using {}",
                        best.name()
                    );
                    return best;
                }
            };
            if wanted > best {
                eprintln!("warning: MIXTRAL_Q_SIMD={} but this CPU only has {}", wanted.name(), best.name());
            }
            wanted.min(best)
        })
    }

    /// Every level this CPU runs, lowest first.
    #[cfg(test)]
    fn available() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| *l <= Self::detected())
            .collect()
    }

    /// The kernel for `ty` at this level, falling back to the scalar one for types without a SIMD kernel.
    /// Only ever called with a level at or below `detected()`: the SIMD kernels assume their CPU features.
    fn kernel(self, ty: GgmlType) -> Option<RowKernel> {
        #[cfg(target_arch = "x86_64")]
        {
            let simd = match self {
                SimdLevel::Avx512 => x86::avx512::kernel(ty),
                SimdLevel::Avx2 => x86::avx2::kernel(ty),
                SimdLevel::Scalar => None,
            };
            if simd.is_some() {
                return simd;
            }
        }
        scalar::kernel(ty)
    }
}

/// Which implementation runs (for bench/--verbose): "avx512", "avx2", "scalar".
pub fn simd_level() -> &'static str {
    SimdLevel::active().name()
}

/// `out[r] = dot(row r of w, x)` for a row-major matrix `w` of `rows` rows of `cols` values of type `ty`
/// (`w.len() == rows * ty.bytes_for(cols)`). Parallel over rows with rayon.
pub fn matvec(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &QuantizedActivations,
    out: &mut [f32],
) -> Result<()> {
    matmul_at(SimdLevel::active(), ty, w, rows, cols, std::slice::from_ref(x), out)
}

/// Batched: `out[t * rows + r] = dot(row r, xs[t])`. Each weight row is unpacked once per tile of
/// [`TILE`] tokens; parallel over chunks of rows.
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xs: &[QuantizedActivations],
    out: &mut [f32],
) -> Result<()> {
    matmul_at(SimdLevel::active(), ty, w, rows, cols, xs, out)
}

/// Below this many weight bytes a product runs on the calling thread: splitting costs more than it saves.
const PARALLEL_MIN_BYTES: usize = 256 * 1024;

/// Rows computed together for all tokens of a tile, so that both stay in L1/L2 between uses.
const ROW_BLOCK: usize = 8;

fn matmul_at(
    level: SimdLevel,
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xs: &[QuantizedActivations],
    out: &mut [f32],
) -> Result<()> {
    let Some((kernel, row_bytes)) = checked_kernel(level, ty, w, rows, cols, xs, out)? else { return Ok(()) };
    // The kinds were checked, so no token's blocks come back empty.
    match kernel {
        RowKernel::Q8K(k) => run(k, w, row_bytes, &q8k_blocks(xs), out),
        RowKernel::Q8KGemm(_, gemm) if xs.len() >= GEMM_MIN_TOKENS => {
            run_gemm(gemm, w, row_bytes, &q8k_blocks(xs), out)
        }
        RowKernel::Q8KGemm(k, _) => run(k, w, row_bytes, &q8k_blocks(xs), out),
        RowKernel::Q8_0(k) => run(k, w, row_bytes, &q8_0_blocks(xs), out),
        RowKernel::F32(k) => run(k, w, row_bytes, &f32_values(xs), out),
    }
    Ok(())
}

/// One matrix-vector product of [`matvec_many`]: `out[r] = dot(row r of w, x)`, as for [`matvec`].
pub struct MatVec<'a> {
    pub ty: GgmlType,
    pub w: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub x: &'a QuantizedActivations,
    pub out: &'a mut [f32],
}

/// Independent matrix-vector products in one parallel pass: the threads share out the rows of all of
/// them, so one thread never waits at the end of a product for the other to finish its last rows. With
/// one token, the rows are the whole work and a core alone reads memory at about half the speed of
/// both, so that waiting (and the serial work between products) costs decode speed directly.
pub fn matvec_many(products: &mut [MatVec<'_>]) -> Result<()> {
    let level = SimdLevel::active();
    let total: usize = products.iter().map(|p| p.w.len()).sum();
    // About 8 tasks per thread over all products, in whole row blocks.
    let task_bytes = (total / (rayon::current_num_threads() * 8)).max(1);
    let mut tasks: Vec<Box<dyn FnOnce() + Send + '_>> = Vec::new();
    for p in products.iter_mut() {
        let x = std::slice::from_ref(p.x);
        let Some((kernel, row_bytes)) = checked_kernel(level, p.ty, p.w, p.rows, p.cols, x, p.out)? else {
            continue;
        };
        let chunk = (task_bytes / row_bytes).max(1).next_multiple_of(ROW_BLOCK) * row_bytes;
        for (w, out) in p.w.chunks(chunk).zip(p.out.chunks_mut(chunk / row_bytes)) {
            tasks.push(match kernel {
                RowKernel::Q8K(k) | RowKernel::Q8KGemm(k, _) => {
                    row_task(k, w, row_bytes, q8k_blocks(x)[0], out)
                }
                RowKernel::Q8_0(k) => row_task(k, w, row_bytes, q8_0_blocks(x)[0], out),
                RowKernel::F32(k) => row_task(k, w, row_bytes, f32_values(x)[0], out),
            });
        }
    }
    tasks.into_par_iter().for_each(|task| task());
    Ok(())
}

/// The rows of `w` against one token, as a task for [`matvec_many`].
fn row_task<'a, B: Sync>(
    kernel: fn(&[u8], &[&[B]], &mut [f32]),
    w: &'a [u8],
    row_bytes: usize,
    x: &'a [B],
    out: &'a mut [f32],
) -> Box<dyn FnOnce() + Send + 'a> {
    Box::new(move || {
        for (row, out) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(1)) {
            kernel(row, &[x], out);
        }
    })
}

/// Validates a product's sizes and activations and returns its kernel and row size, or None when there
/// is nothing to compute.
fn checked_kernel(
    level: SimdLevel,
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    xs: &[QuantizedActivations],
    out: &[f32],
) -> Result<Option<(RowKernel, usize)>> {
    let kind = activation_kind(ty)?;
    let row_bytes =
        ty.bytes_for(cols).with_context(|| format!("{cols} columns is not a whole number of {ty} blocks"))?;
    ensure!(
        rows.checked_mul(row_bytes) == Some(w.len()),
        "{ty} matrix of {rows}x{cols} needs {} bytes, got {}",
        rows as u128 * row_bytes as u128,
        w.len()
    );
    ensure!(
        rows.checked_mul(xs.len()) == Some(out.len()),
        "output has {} values, expected {rows} rows x {} tokens",
        out.len(),
        xs.len()
    );
    for x in xs {
        ensure!(x.len == cols, "activations have {} values, the {ty} matrix has {cols} columns", x.len);
        ensure!(x.kind() == kind, "activations were prepared for another weight type than {ty}");
    }
    if rows == 0 || xs.is_empty() {
        return Ok(None);
    }
    let kernel = level.kernel(ty).with_context(|| format!("no CPU dot-product kernel for {ty} weights"))?;
    Ok(Some((kernel, row_bytes)))
}

fn q8k_blocks(xs: &[QuantizedActivations]) -> Vec<&[BlockQ8K]> {
    xs.iter().map(|x| if let Activations::Q8K(v) = &x.blocks { &v[..] } else { &[] }).collect()
}

fn q8_0_blocks(xs: &[QuantizedActivations]) -> Vec<&[BlockQ8_0]> {
    xs.iter().map(|x| if let Activations::Q8_0(v) = &x.blocks { &v[..] } else { &[] }).collect()
}

fn f32_values(xs: &[QuantizedActivations]) -> Vec<&[f32]> {
    xs.iter().map(|x| if let Activations::F32(v) = &x.blocks { &v[..] } else { &[] }).collect()
}

/// Runs `gemm` on chunks of rows in parallel, then gathers each token's outputs.
fn run_gemm<B: Sync>(gemm: GemmKernel<B>, w: &[u8], row_bytes: usize, xs: &[&[B]], out: &mut [f32]) {
    let rows = w.len() / row_bytes;
    if w.len() < PARALLEL_MIN_BYTES {
        return gemm(w, row_bytes, xs, out);
    }
    let chunk = chunk_rows(rows).next_multiple_of(ROW_BLOCK);
    let parts: Vec<Vec<f32>> = w
        .par_chunks(chunk * row_bytes)
        .map(|w| {
            let mut part = vec![0f32; w.len() / row_bytes * xs.len()];
            gemm(w, row_bytes, xs, &mut part);
            part
        })
        .collect();
    out.par_chunks_mut(rows).enumerate().for_each(|(t, out)| {
        for (out, part) in out.chunks_mut(chunk).zip(&parts) {
            out.copy_from_slice(&part[t * out.len()..][..out.len()]);
        }
    });
}

/// Rows per parallel task: a few tasks per thread, so that work stealing evens out the threads.
fn chunk_rows(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads() * 4).max(ROW_BLOCK)
}

/// Runs `kernel` over all rows of `w` (validated sizes) and all tokens of `xs`; `out[t * rows + r]`.
fn run<B: Sync>(
    kernel: fn(&[u8], &[&[B]], &mut [f32]),
    w: &[u8],
    row_bytes: usize,
    xs: &[&[B]],
    out: &mut [f32],
) {
    let rows = w.len() / row_bytes;
    let n_tok = xs.len();
    // Computes the rows of `w_rows` into `dst`, laid out [row][token].
    let compute = |w_rows: &[u8], dst: &mut [f32]| {
        for (w_block, d_block) in w_rows.chunks(ROW_BLOCK * row_bytes).zip(dst.chunks_mut(ROW_BLOCK * n_tok))
        {
            for (tile_idx, tile) in xs.chunks(TILE).enumerate() {
                let first = tile_idx * TILE;
                for (row, d) in w_block.chunks_exact(row_bytes).zip(d_block.chunks_exact_mut(n_tok)) {
                    kernel(row, tile, &mut d[first..first + tile.len()]);
                }
            }
        }
    };
    let parallel = w.len() >= PARALLEL_MIN_BYTES;
    let chunk = chunk_rows(rows);
    if n_tok == 1 {
        // One token: [row][token] is the output layout already.
        if parallel {
            w.par_chunks(chunk * row_bytes).zip(out.par_chunks_mut(chunk)).for_each(|(w, o)| compute(w, o));
        } else {
            compute(w, out);
        }
        return;
    }
    let mut by_row = vec![0f32; rows * n_tok];
    if parallel {
        w.par_chunks(chunk * row_bytes)
            .zip(by_row.par_chunks_mut(chunk * n_tok))
            .for_each(|(w, o)| compute(w, o));
    } else {
        compute(w, &mut by_row);
    }
    let transpose = |(t, o): (usize, &mut [f32])| {
        for (r, v) in o.iter_mut().enumerate() {
            *v = by_row[r * n_tok + t];
        }
    };
    if parallel {
        out.par_chunks_mut(rows).enumerate().for_each(transpose);
    } else {
        out.chunks_mut(rows).enumerate().for_each(transpose);
    }
}
