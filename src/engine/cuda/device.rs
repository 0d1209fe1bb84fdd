//! One GPU: its context, a compute stream and a copy stream, the kernels compiled for its architecture,
//! and typed launch wrappers that check every size before a kernel sees a pointer.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::kernels::{self, type_suffix};
use super::DeviceInfo;
use crate::format::GgmlType;

/// Launches `func` on `stream` with the kernel arguments in order. One expression, so that the
/// temporaries the arguments borrow live until the launch.
macro_rules! launch {
    ($stream:expr, $func:expr, $cfg:expr; $($arg:expr),* $(,)?) => {
        // SAFETY: every wrapper checks the buffer sizes the kernel relies on before launching, and the
        // argument types match the kernel's parameters (int = i32, long = i64, pointers = device buffers).
        unsafe { $stream.launch_builder($func)$(.arg($arg))*.launch($cfg) }.map(|_| ()).map_err(anyhow::Error::from)
    };
}

/// Rows per matvec block (`WARPS * ROWS_PER_WARP` in matvec.cu).
const MATVEC_ROWS_PER_BLOCK: usize = 16;
/// Tile of matmul.cu (`BM` weight rows x `BN` tokens).
const MATMUL_BM: usize = 64;
const MATMUL_BN: usize = 64;
/// Longest chunk of the sequence one attention block walks before the split-K merge.
const ATT_MIN_CHUNK: usize = 256;
/// At most this many (token, chunk) pairs per head: bounds the split-K scratch.
pub const ATT_MAX_SPLITS: usize = 64;
/// Upper bound on the experts a router kernel handles (`MAX_EXPERTS` in ops.cu).
pub const MAX_EXPERTS: usize = 64;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// All kernels run here, in order.
    pub stream: Arc<CudaStream>,
    /// Expert uploads run here, overlapping compute; ordered against it with events.
    pub copy_stream: Arc<CudaStream>,
    pub info: DeviceInfo,
    functions: HashMap<String, CudaFunction>,
    /// Largest dynamic shared memory a block may use (opt-in limit of the device).
    max_shared_bytes: usize,
}

impl Gpu {
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel for its architecture.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let info = super::device_info(ordinal)?;
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a CUDA context on device {ordinal}"))?;
        let stream = ctx.new_stream()?;
        let copy_stream = ctx.new_stream()?;
        let arch = info.arch();
        let max_shared_bytes = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize;
        let mut functions = HashMap::new();
        // Compiling takes seconds per file on a cold cache: one thread per file.
        let cubins: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let jobs: Vec<_> = kernels::SOURCES
                .iter()
                .map(|(file, source)| s.spawn(move || kernels::cubin(file, source, arch)))
                .collect();
            jobs.into_iter()
                .map(|j| j.join().unwrap_or_else(|_| Err(anyhow::anyhow!("kernel compiler thread panicked"))))
                .collect()
        });
        for ((file, _), cubin) in kernels::SOURCES.iter().zip(cubins) {
            let cubin = cubin?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .with_context(|| format!("loading {file} for sm_{arch}"))?;
            for name in kernels::kernel_names(file) {
                let f = module
                    .load_function(&name)
                    .with_context(|| format!("kernel {name} missing from {file}"))?;
                if name.starts_with("matvec") {
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        max_shared_bytes as i32,
                    )?;
                }
                functions.insert(name, f);
            }
        }
        Ok(Gpu { ctx, stream, copy_stream, info, functions, max_shared_bytes })
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).with_context(|| format!("no kernel {name}"))
    }

    fn typed(&self, prefix: &str, ty: GgmlType) -> Result<&CudaFunction> {
        match type_suffix(ty) {
            Some(s) => self.func(&format!("{prefix}_{s}")),
            None => bail!("no CUDA kernel for {ty} weights"),
        }
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().context("waiting for the GPU")
    }

    /// The device address of a buffer (for the expert pointer tables).
    pub fn address<T>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }

    // ---- launch wrappers ----

    /// `y[r] = Σ_c w[r, c] x[c]` for a `[rows, cols]` matrix of type `ty` in `w`.
    pub fn matvec(&self, w: &WeightView, x: &CudaView<f32>, y: &mut CudaViewMut<f32>) -> Result<()> {
        w.check()?;
        ensure!(x.len() >= w.cols && y.len() >= w.rows, "matvec buffers too small for {}x{}", w.rows, w.cols);
        let cfg = self.matvec_config(w.rows, w.cols, 1)?;
        launch!(self.stream, self.typed("matvec", w.ty)?, cfg; &w.data, x, y, &(w.rows as i32), &(w.cols as i32))
    }

    /// The `ids.len()` selected experts in one launch: slot s multiplies expert `ids[s]` (read on the
    /// device; its weights at `table[ids[s]]`) by `x[s * x_stride ..]` into `y[s * rows ..]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_experts(
        &self,
        table: &CudaView<u64>,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        ids: &CudaView<i32>,
        x: &CudaView<f32>,
        x_stride: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        check_row_blocks(ty, cols)?;
        let n = ids.len();
        ensure!(
            x.len() >= x_stride * (n - 1) + cols && y.len() >= n * rows,
            "matvec_experts buffers too small"
        );
        let cfg = self.matvec_config(rows, cols, n)?;
        launch!(self.stream, self.typed("matvec_experts", ty)?, cfg;
            table, ids, x, &(x_stride as i64), y, &(rows as i32), &(cols as i32))
    }

    fn matvec_config(&self, rows: usize, cols: usize, matrices: usize) -> Result<LaunchConfig> {
        // The padded activation vector of matvec.cu: one extra float per 32.
        let shared = (cols + cols / 32) * 4;
        ensure!(
            shared <= self.max_shared_bytes,
            "rows of {cols} values exceed the {} bytes of shared memory per block",
            self.max_shared_bytes
        );
        Ok(LaunchConfig {
            grid_dim: (rows.div_ceil(MATVEC_ROWS_PER_BLOCK) as u32, matrices as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: shared as u32,
        })
    }

    /// `y[i, r] = Σ_c w[r, c] x[g(i), c]` for `i < m`, where `g(i) = gather[i]` or `i`.
    pub fn matmul(
        &self,
        w: &WeightView,
        x: &CudaView<f32>,
        gather: Option<&CudaView<i32>>,
        m: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        w.check()?;
        ensure!(w.cols.is_multiple_of(32), "matmul needs rows of a multiple of 32 values, not {}", w.cols);
        ensure!(y.len() >= m * w.rows, "matmul output too small");
        match gather {
            Some(g) => ensure!(g.len() >= m, "matmul gather list too short"),
            None => ensure!(x.len() >= m * w.cols, "matmul input too small"),
        }
        let cfg = LaunchConfig {
            grid_dim: (w.rows.div_ceil(MATMUL_BM) as u32, m.div_ceil(MATMUL_BN) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.typed("matmul", w.ty)?;
        let (rows, cols, m) = (w.rows as i32, w.cols as i32, m as i32);
        match gather {
            Some(g) => launch!(self.stream, f, cfg; &w.data, x, g, y, &rows, &cols, &m),
            None => launch!(self.stream, f, cfg; &w.data, x, &0u64, y, &rows, &cols, &m),
        }
    }

    /// Row-wise RMSNorm of `n` rows of `w.len()` values.
    pub fn rms_norm(
        &self,
        x: &CudaView<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        n: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let width = w.len();
        ensure!(x.len() >= n * width && y.len() >= n * width, "rms_norm buffers too small");
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self.stream, self.func("rms_norm")?, cfg; x, w, y, &(width as i32), &eps)
    }

    /// RoPE on `n` rows of `width` values (heads of `head_dim`), row t at position `pos0 + t`.
    pub fn rope(
        &self,
        v: &mut CudaViewMut<f32>,
        n: usize,
        width: usize,
        head_dim: usize,
        pos0: usize,
        inv_freq: &CudaSlice<f64>,
    ) -> Result<()> {
        ensure!(
            v.len() >= n * width && inv_freq.len() * 2 == head_dim && width.is_multiple_of(head_dim),
            "rope sizes"
        );
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self.stream, self.func("rope")?, cfg; v, &(width as i32), &(head_dim as i32), &(pos0 as i32), inv_freq)
    }

    /// `gate = silu(gate) * up` over `n` values (in place: the gate values are not needed afterwards).
    pub fn swiglu(&self, gate: &mut CudaViewMut<f32>, up: &CudaView<f32>, n: usize) -> Result<()> {
        ensure!(gate.len() >= n && up.len() >= n, "swiglu buffers too small");
        launch!(self.stream, self.func("swiglu")?, elementwise(n); gate, up, &(n as i64))
    }

    pub fn add(&self, x: &mut CudaViewMut<f32>, y: &CudaView<f32>, n: usize) -> Result<()> {
        ensure!(x.len() >= n && y.len() >= n, "add buffers too small");
        launch!(self.stream, self.func("add_in_place")?, elementwise(n); x, y, &(n as i64))
    }

    /// Top-`k` routing of `n` tokens from their router logits (`[n, n_experts]`).
    pub fn route_top_k(
        &self,
        logits: &CudaView<f32>,
        n: usize,
        n_experts: usize,
        k: usize,
        ids: &mut CudaViewMut<i32>,
        weights: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        ensure!(n_experts <= MAX_EXPERTS && k <= n_experts, "routing {k} of {n_experts} experts");
        ensure!(
            logits.len() >= n * n_experts && ids.len() >= n * k && weights.len() >= n * k,
            "router buffers too small"
        );
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self.stream, self.func("route_top_k")?, cfg;
            logits, &(n as i32), &(n_experts as i32), &(k as i32), ids, weights)
    }

    /// Decode: `x += Σ_j weights[j] y[j]` over `k` expert outputs of `width` values.
    pub fn moe_combine(
        &self,
        x: &mut CudaViewMut<f32>,
        y: &CudaView<f32>,
        weights: &CudaView<f32>,
        k: usize,
        width: usize,
    ) -> Result<()> {
        ensure!(
            x.len() >= width && y.len() >= k * width && weights.len() >= k,
            "moe_combine buffers too small"
        );
        launch!(self.stream, self.func("moe_combine")?, elementwise(width); x, y, weights, &(k as i32), &(width as i32))
    }

    /// Prompt: `x[tokens[i]] += weights[i] y[i]` for `m` rows of `width` values.
    pub fn scatter_add(
        &self,
        x: &mut CudaViewMut<f32>,
        y: &CudaView<f32>,
        tokens: &CudaView<i32>,
        weights: &CudaView<f32>,
        m: usize,
        width: usize,
    ) -> Result<()> {
        ensure!(
            y.len() >= m * width && tokens.len() >= m && weights.len() >= m,
            "scatter_add buffers too small"
        );
        let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self.stream, self.func("scatter_add")?, cfg; x, y, tokens, weights, &(width as i32))
    }

    /// Stores `n` tokens' keys and values (`[n, kv_dim]`) into a layer's f16 cache at `pos0`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &self,
        k: &CudaView<f32>,
        v: &CudaView<f32>,
        k_cache: &mut CudaViewMut<u16>,
        v_cache: &mut CudaViewMut<u16>,
        n: usize,
        kv_dim: usize,
        pos0: usize,
    ) -> Result<()> {
        ensure!(k.len() >= n * kv_dim && v.len() >= n * kv_dim, "kv_store inputs too small");
        ensure!(
            k_cache.len() >= (pos0 + n) * kv_dim && v_cache.len() >= (pos0 + n) * kv_dim,
            "KV cache overflow"
        );
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self.stream, self.func("kv_store")?, cfg; k, v, k_cache, v_cache, &(kv_dim as i32), &(pos0 as i32))
    }

    /// Rows `tokens` of an embedding table, dequantized into `out` (`[n, table.cols]`).
    pub fn embed(
        &self,
        table: &WeightView,
        tokens: &CudaView<i32>,
        n: usize,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        table.check()?;
        ensure!(tokens.len() >= n && out.len() >= n * table.cols, "embedding buffers too small");
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self.stream, self.typed("embed", table.ty)?, cfg; &table.data, tokens, out, &(table.cols as i32))
    }

    /// Causal attention of `n` query tokens at positions `pos0 ..` (`q`: `[n, n_heads * head_dim]`) over a
    /// layer's f16 cache holding positions `0 .. pos0 + n`; writes `[n, n_heads * head_dim]` into `out`.
    pub fn attention(
        &self,
        a: &AttentionArgs,
        q: &CudaView<f32>,
        k_cache: &CudaView<u16>,
        v_cache: &CudaView<u16>,
        scratch: &mut AttentionScratch,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let AttentionArgs { n, pos0, n_heads, n_kv_heads, head_dim } = *a;
        let group = n_heads / n_kv_heads;
        let max_group = kernels::ATTENTION_GROUPS[kernels::ATTENTION_GROUPS.len() - 1];
        ensure!(
            n_heads.is_multiple_of(n_kv_heads) && group <= max_group,
            "{n_heads} query heads over {n_kv_heads} KV heads: no attention kernel for groups of {group}"
        );
        ensure!(
            kernels::ATTENTION_HEAD_DIMS.contains(&head_dim),
            "no attention kernel for heads of {head_dim} values (have {:?})",
            kernels::ATTENTION_HEAD_DIMS
        );
        let kv_dim = n_kv_heads * head_dim;
        ensure!(
            q.len() >= n * n_heads * head_dim && out.len() >= n * n_heads * head_dim,
            "attention buffers too small"
        );
        ensure!(
            k_cache.len() >= (pos0 + n) * kv_dim && v_cache.len() >= (pos0 + n) * kv_dim,
            "attention cache too small"
        );
        let seen = pos0 + n;
        let n_chunks = seen.div_ceil(ATT_MIN_CHUNK).clamp(1, (ATT_MAX_SPLITS / n).max(1));
        let chunk = seen.div_ceil(n_chunks);
        ensure!(scratch.fits(n * n_chunks, n_heads, head_dim), "attention scratch too small");
        let cfg = LaunchConfig {
            grid_dim: (n_kv_heads as u32, n_chunks as u32, n as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let partial = self.func(&kernels::attention_partial_name(group, head_dim))?;
        launch!(self.stream, partial, cfg;
            q, k_cache, v_cache, &mut scratch.acc, &mut scratch.ml, &(n_heads as i32), &(n_kv_heads as i32),
            &(pos0 as i32), &(chunk as i32), &scale)?;
        let cfg = LaunchConfig {
            grid_dim: (n_heads as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self.stream, self.func("attention_merge")?, cfg;
            &scratch.acc, &scratch.ml, out, &(n_heads as i32), &(head_dim as i32), &(n_chunks as i32))
    }
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).min(4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_row_blocks(ty: GgmlType, cols: usize) -> Result<()> {
    let block = kernels::kernel_block_len(ty);
    ensure!(cols.is_multiple_of(block), "rows of {cols} {ty} values are not whole kernel blocks of {block}");
    Ok(())
}

/// A weight matrix on the device: type, row-major `[rows, cols]`, bytes in ggml's layout.
pub struct WeightView<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: CudaView<'a, u8>,
}

impl WeightView<'_> {
    fn check(&self) -> Result<()> {
        check_row_blocks(self.ty, self.cols)?;
        let row_bytes = self.ty.bytes_for(self.cols).context("row size")?;
        ensure!(
            self.data.len() >= row_bytes * self.rows,
            "{} bytes for a {}x{} {} matrix",
            self.data.len(),
            self.rows,
            self.cols,
            self.ty
        );
        Ok(())
    }
}

/// Shape of one attention call.
#[derive(Clone, Copy)]
pub struct AttentionArgs {
    /// New query tokens.
    pub n: usize,
    /// Position of the first new token.
    pub pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Split-K partial results of attention: per (token, head, chunk) the weighted values and (max, sum).
pub struct AttentionScratch {
    acc: CudaSlice<f32>,
    ml: CudaSlice<f32>,
}

impl AttentionScratch {
    /// Room for `splits` (token, chunk) pairs per head: `max(ATT_MAX_SPLITS, tokens)` covers any call.
    pub fn new(
        stream: &Arc<CudaStream>,
        splits: usize,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<AttentionScratch> {
        Ok(AttentionScratch {
            acc: stream.alloc_zeros(splits * n_heads * head_dim)?,
            ml: stream.alloc_zeros(splits * n_heads * 2)?,
        })
    }

    fn fits(&self, splits: usize, n_heads: usize, head_dim: usize) -> bool {
        self.acc.len() >= splits * n_heads * head_dim && self.ml.len() >= splits * n_heads * 2
    }

    pub fn bytes(splits: usize, n_heads: usize, head_dim: usize) -> u64 {
        (splits * n_heads * (head_dim + 2) * 4) as u64
    }
}
