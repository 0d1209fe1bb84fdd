//! [`Gpu`]: a [`Device`] with typed data movement and launch wrappers for every kernel, which check
//! every size before a kernel sees a pointer and hold the launch configurations (grid, block, shared
//! memory) that kernels/*.cu are written for. Written once for every device: the CUDA driver, or the
//! tests' CPU emulator.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use bytemuck::Pod;

use super::device::{
    BufView, BufViewMut, Device, DeviceBuffer, Event, KernelArg, LaunchConfig, PinnedBuffer, Stream,
};
use super::driver::CudaDriver;
use super::kernels::{self, type_suffix};
use super::DeviceInfo;
use crate::format::GgmlType;

/// Rows per matvec block.
const MATVEC_ROWS_PER_BLOCK: usize = kernels::MATVEC_WARPS * kernels::MATVEC_ROWS_PER_WARP;
const MATVEC_THREADS: u32 = (kernels::MATVEC_WARPS * 32) as u32;
const MATMUL_THREADS: u32 = (kernels::MATMUL_WARPS * 32) as u32;
const ATT_THREADS: u32 = (kernels::ATT_WARPS * 32) as u32;
/// Longest chunk of the sequence one attention block walks before the split-K merge.
const ATT_MIN_CHUNK: usize = 256;
/// At most this many (token, chunk) pairs per head: bounds the split-K scratch.
pub const ATT_MAX_SPLITS: usize = 64;
pub use super::kernels::MAX_EXPERTS;
/// Threads per block of the per-row and elementwise kernels of ops.cu (rms_norm's `partial[8]` = 8 warps).
const ROW_THREADS: u32 = 256;
/// Tokens per block of the router (one thread each).
const ROUTER_THREADS: usize = 64;

/// A device with the kernels of kernels/*.cu.
pub struct Gpu {
    dev: Arc<dyn Device>,
    pub info: DeviceInfo,
}

impl Gpu {
    /// CUDA device `ordinal`, its kernels compiled (or loaded from the cache) for its architecture.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        Gpu::on(Arc::new(CudaDriver::new(ordinal)?))
    }

    /// The kernels on `dev` (a GPU, or a stand-in such as the tests' emulator).
    pub fn on(dev: Arc<dyn Device>) -> Result<Gpu> {
        let info = dev.info().clone();
        // The matrix-vector kernels stage a whole activation row in dynamic shared memory.
        for name in kernels::SOURCES.iter().flat_map(|(file, _)| kernels::kernel_names(file)) {
            if name.starts_with("matvec") {
                dev.set_max_dynamic_shared(&name, info.max_shared_bytes)?;
            }
        }
        Ok(Gpu { dev, info })
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    // ---- memory and data movement (on the compute stream unless stated) ----

    /// `len` zeros.
    pub fn alloc_zeros<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let buf = DeviceBuffer::<T>::alloc(&self.dev, len)?;
        // SAFETY: the range is the buffer's own allocation.
        unsafe { self.dev.memset(Stream::Compute, buf.address(), 0, len * std::mem::size_of::<T>()) }?;
        Ok(buf)
    }

    /// A new buffer holding `data`.
    pub fn upload<T: Pod>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = DeviceBuffer::alloc(&self.dev, data.len())?;
        self.copy_htod(data, &mut buf.view_mut())?;
        Ok(buf)
    }

    /// Copies `src` into the start of `dst` (pageable memory: `src` may change as soon as this returns).
    pub fn copy_htod<T: Pod>(&self, src: &[T], dst: &mut BufViewMut<T>) -> Result<()> {
        ensure!(src.len() <= dst.len(), "copying {} values into a device buffer of {}", src.len(), dst.len());
        let bytes: &[u8] = bytemuck::cast_slice(src);
        // SAFETY: `bytes` is readable now, and pageable memory is read before the call returns; the
        // destination range lies in `dst`.
        unsafe { self.dev.copy_htod(Stream::Compute, dst.address(), bytes.as_ptr(), bytes.len()) }
    }

    /// Waits for the compute stream, then returns the values of `src`.
    pub fn download<T: Pod>(&self, src: &BufView<T>) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); src.len()];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        // SAFETY: `bytes` is writable and as long as `src`.
        unsafe { self.dev.copy_dtoh(Stream::Compute, bytes.as_mut_ptr(), src.address(), bytes.len()) }?;
        Ok(out)
    }

    /// Queues a copy of `src` (pinned) to device memory at `dst` on `stream`; `src` must not change until
    /// the copy has run (record an event after it).
    pub fn copy_pinned(&self, stream: Stream, src: &PinnedBuffer, dst: &mut BufViewMut<u8>) -> Result<()> {
        ensure!(src.len() <= dst.len(), "copying {} bytes into a device buffer of {}", src.len(), dst.len());
        // SAFETY: the pinned buffer outlives the copy (its drop waits for the copy stream) and the caller
        // keeps it unchanged until the copy has run; the destination range lies in `dst`.
        unsafe { self.dev.copy_htod(stream, dst.address(), src.as_ptr(), src.len()) }
    }

    pub fn pinned(&self, len: usize) -> Result<PinnedBuffer> {
        PinnedBuffer::new(&self.dev, len)
    }

    pub fn event(&self) -> Result<Event> {
        Event::new(&self.dev)
    }

    /// Waits for everything queued on the compute stream.
    pub fn sync(&self) -> Result<()> {
        self.dev.synchronize(Stream::Compute)
    }

    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[KernelArg]) -> Result<()> {
        // SAFETY: every wrapper below checks the buffer sizes the kernel relies on before launching, and
        // passes the arguments in the kernel's parameter order and types (int = I32, long = I64,
        // pointers = device buffers of the parameter's element type).
        unsafe { self.dev.launch(Stream::Compute, kernel, &cfg, args) }
    }

    fn typed(prefix: &str, ty: GgmlType) -> Result<String> {
        match type_suffix(ty) {
            Some(s) => Ok(format!("{prefix}_{s}")),
            None => bail!("no CUDA kernel for {ty} weights"),
        }
    }

    // ---- launch wrappers ----

    /// `y[r] = Σ_c w[r, c] x[c]` for a `[rows, cols]` matrix of type `ty` in `w`.
    pub fn matvec(&self, w: &WeightView, x: &BufView<f32>, y: &mut BufViewMut<f32>) -> Result<()> {
        w.check()?;
        ensure!(x.len() >= w.cols && y.len() >= w.rows, "matvec buffers too small for {}x{}", w.rows, w.cols);
        let cfg = self.matvec_config(w.rows, w.cols, 1)?;
        let (rows, cols) = (KernelArg::I32(w.rows as i32), KernelArg::I32(w.cols as i32));
        self.launch(&Self::typed("matvec", w.ty)?, cfg, &[w.data.arg(), x.arg(), y.arg(), rows, cols])
    }

    /// The `ids.len()` selected experts in one launch: slot s multiplies expert `ids[s]` (read on the
    /// device; its weights at `table[ids[s]]`) by `x[s * x_stride ..]` into `y[s * rows ..]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_experts(
        &self,
        table: &BufView<u64>,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        ids: &BufView<i32>,
        x: &BufView<f32>,
        x_stride: usize,
        y: &mut BufViewMut<f32>,
    ) -> Result<()> {
        check_row_blocks(ty, cols)?;
        let n = ids.len();
        ensure!(n > 0, "matvec_experts without experts");
        ensure!(
            x.len() >= x_stride * (n - 1) + cols && y.len() >= n * rows,
            "matvec_experts buffers too small"
        );
        let cfg = self.matvec_config(rows, cols, n)?;
        let args = [
            table.arg(),
            ids.arg(),
            x.arg(),
            KernelArg::I64(x_stride as i64),
            y.arg(),
            KernelArg::I32(rows as i32),
            KernelArg::I32(cols as i32),
        ];
        self.launch(&Self::typed("matvec_experts", ty)?, cfg, &args)
    }

    fn matvec_config(&self, rows: usize, cols: usize, matrices: usize) -> Result<LaunchConfig> {
        // The padded activation vector of matvec.cu: one extra float per 32.
        let shared = (cols + cols / 32) * 4;
        ensure!(
            shared <= self.info.max_shared_bytes,
            "rows of {cols} values exceed the {} bytes of shared memory per block",
            self.info.max_shared_bytes
        );
        Ok(LaunchConfig {
            grid: (rows.div_ceil(MATVEC_ROWS_PER_BLOCK) as u32, matrices as u32, 1),
            block: (MATVEC_THREADS, 1, 1),
            shared_bytes: shared as u32,
        })
    }

    /// `y[i, r] = Σ_c w[r, c] x[g(i), c]` for `i < m`, where `g(i) = gather[i]` or `i`.
    pub fn matmul(
        &self,
        w: &WeightView,
        x: &BufView<f32>,
        gather: Option<&BufView<i32>>,
        m: usize,
        y: &mut BufViewMut<f32>,
    ) -> Result<()> {
        w.check()?;
        ensure!(w.cols.is_multiple_of(32), "matmul needs rows of a multiple of 32 values, not {}", w.cols);
        ensure!(y.len() >= m * w.rows, "matmul output too small");
        match gather {
            Some(g) => ensure!(g.len() >= m, "matmul gather list too short"),
            None => ensure!(x.len() >= m * w.cols, "matmul input too small"),
        }
        let cfg = LaunchConfig {
            grid: (w.rows.div_ceil(kernels::MATMUL_BM) as u32, m.div_ceil(kernels::MATMUL_BN) as u32, 1),
            block: (MATMUL_THREADS, 1, 1),
            shared_bytes: 0,
        };
        let gather = gather.map_or(KernelArg::null::<i32>(), |g| g.arg());
        let args = [
            w.data.arg(),
            x.arg(),
            gather,
            y.arg(),
            KernelArg::I32(w.rows as i32),
            KernelArg::I32(w.cols as i32),
            KernelArg::I32(m as i32),
        ];
        self.launch(&Self::typed("matmul", w.ty)?, cfg, &args)
    }

    /// Row-wise RMSNorm of `n` rows of `w.len()` values.
    pub fn rms_norm(
        &self,
        x: &BufView<f32>,
        w: &BufView<f32>,
        eps: f32,
        n: usize,
        y: &mut BufViewMut<f32>,
    ) -> Result<()> {
        let width = w.len();
        ensure!(x.len() >= n * width && y.len() >= n * width, "rms_norm buffers too small");
        let args = [x.arg(), w.arg(), y.arg(), KernelArg::I32(width as i32), KernelArg::F32(eps)];
        self.launch("rms_norm", per_row(n), &args)
    }

    /// RoPE on `n` rows of `width` values (heads of `head_dim`), row t at position `pos0 + t`.
    pub fn rope(
        &self,
        v: &mut BufViewMut<f32>,
        n: usize,
        width: usize,
        head_dim: usize,
        pos0: usize,
        inv_freq: &BufView<f64>,
    ) -> Result<()> {
        ensure!(
            v.len() >= n * width && inv_freq.len() * 2 == head_dim && width.is_multiple_of(head_dim),
            "rope sizes"
        );
        let args = [
            v.arg(),
            KernelArg::I32(width as i32),
            KernelArg::I32(head_dim as i32),
            KernelArg::I32(pos0 as i32),
            inv_freq.arg(),
        ];
        self.launch("rope", per_row(n), &args)
    }

    /// `gate = silu(gate) * up` over `n` values (in place: the gate values are not needed afterwards).
    pub fn swiglu(&self, gate: &mut BufViewMut<f32>, up: &BufView<f32>, n: usize) -> Result<()> {
        ensure!(gate.len() >= n && up.len() >= n, "swiglu buffers too small");
        self.launch("swiglu", elementwise(n), &[gate.arg(), up.arg(), KernelArg::I64(n as i64)])
    }

    pub fn add(&self, x: &mut BufViewMut<f32>, y: &BufView<f32>, n: usize) -> Result<()> {
        ensure!(x.len() >= n && y.len() >= n, "add buffers too small");
        self.launch("add_in_place", elementwise(n), &[x.arg(), y.arg(), KernelArg::I64(n as i64)])
    }

    /// Top-`k` routing of `n` tokens from their router logits (`[n, n_experts]`).
    pub fn route_top_k(
        &self,
        logits: &BufView<f32>,
        n: usize,
        n_experts: usize,
        k: usize,
        ids: &mut BufViewMut<i32>,
        weights: &mut BufViewMut<f32>,
    ) -> Result<()> {
        ensure!(n_experts <= MAX_EXPERTS && k <= n_experts, "routing {k} of {n_experts} experts");
        ensure!(
            logits.len() >= n * n_experts && ids.len() >= n * k && weights.len() >= n * k,
            "router buffers too small"
        );
        let cfg = LaunchConfig {
            grid: (n.div_ceil(ROUTER_THREADS) as u32, 1, 1),
            block: (ROUTER_THREADS as u32, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            logits.arg(),
            KernelArg::I32(n as i32),
            KernelArg::I32(n_experts as i32),
            KernelArg::I32(k as i32),
            ids.arg(),
            weights.arg(),
        ];
        self.launch("route_top_k", cfg, &args)
    }

    /// Decode: `x += Σ_j weights[j] y[j]` over `k` expert outputs of `width` values.
    pub fn moe_combine(
        &self,
        x: &mut BufViewMut<f32>,
        y: &BufView<f32>,
        weights: &BufView<f32>,
        k: usize,
        width: usize,
    ) -> Result<()> {
        ensure!(
            x.len() >= width && y.len() >= k * width && weights.len() >= k,
            "moe_combine buffers too small"
        );
        let args = [x.arg(), y.arg(), weights.arg(), KernelArg::I32(k as i32), KernelArg::I32(width as i32)];
        self.launch("moe_combine", elementwise(width), &args)
    }

    /// Prompt: `x[tokens[i]] += weights[i] y[i]` for `m` rows of `width` values.
    pub fn scatter_add(
        &self,
        x: &mut BufViewMut<f32>,
        y: &BufView<f32>,
        tokens: &BufView<i32>,
        weights: &BufView<f32>,
        m: usize,
        width: usize,
    ) -> Result<()> {
        ensure!(
            y.len() >= m * width && tokens.len() >= m && weights.len() >= m,
            "scatter_add buffers too small"
        );
        let args = [x.arg(), y.arg(), tokens.arg(), weights.arg(), KernelArg::I32(width as i32)];
        self.launch("scatter_add", per_row(m), &args)
    }

    /// Stores `n` tokens' keys and values (`[n, kv_dim]`) into a layer's f16 cache at `pos0`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &self,
        k: &BufView<f32>,
        v: &BufView<f32>,
        k_cache: &mut BufViewMut<u16>,
        v_cache: &mut BufViewMut<u16>,
        n: usize,
        kv_dim: usize,
        pos0: usize,
    ) -> Result<()> {
        ensure!(k.len() >= n * kv_dim && v.len() >= n * kv_dim, "kv_store inputs too small");
        ensure!(
            k_cache.len() >= (pos0 + n) * kv_dim && v_cache.len() >= (pos0 + n) * kv_dim,
            "KV cache overflow"
        );
        let args = [
            k.arg(),
            v.arg(),
            k_cache.arg(),
            v_cache.arg(),
            KernelArg::I32(kv_dim as i32),
            KernelArg::I32(pos0 as i32),
        ];
        self.launch("kv_store", per_row(n), &args)
    }

    /// Rows `tokens` of an embedding table, dequantized into `out` (`[n, table.cols]`).
    pub fn embed(
        &self,
        table: &WeightView,
        tokens: &BufView<i32>,
        n: usize,
        out: &mut BufViewMut<f32>,
    ) -> Result<()> {
        table.check()?;
        ensure!(tokens.len() >= n && out.len() >= n * table.cols, "embedding buffers too small");
        let args = [table.data.arg(), tokens.arg(), out.arg(), KernelArg::I32(table.cols as i32)];
        self.launch(&Self::typed("embed", table.ty)?, per_row(n), &args)
    }

    /// Causal attention of `n` query tokens at positions `pos0 ..` (`q`: `[n, n_heads * head_dim]`) over a
    /// layer's f16 cache holding positions `0 .. pos0 + n`; writes `[n, n_heads * head_dim]` into `out`.
    pub fn attention(
        &self,
        a: &AttentionArgs,
        q: &BufView<f32>,
        k_cache: &BufView<u16>,
        v_cache: &BufView<u16>,
        scratch: &mut AttentionScratch,
        out: &mut BufViewMut<f32>,
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
            grid: (n_kv_heads as u32, n_chunks as u32, n as u32),
            block: (ATT_THREADS, 1, 1),
            shared_bytes: 0,
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let args = [
            q.arg(),
            k_cache.arg(),
            v_cache.arg(),
            scratch.acc.view().arg(),
            scratch.ml.view().arg(),
            KernelArg::I32(n_heads as i32),
            KernelArg::I32(n_kv_heads as i32),
            KernelArg::I32(pos0 as i32),
            KernelArg::I32(chunk as i32),
            KernelArg::F32(scale),
        ];
        self.launch(&kernels::attention_partial_name(group, head_dim), cfg, &args)?;
        let cfg =
            LaunchConfig { grid: (n_heads as u32, n as u32, 1), block: (ATT_THREADS, 1, 1), shared_bytes: 0 };
        let args = [
            scratch.acc.view().arg(),
            scratch.ml.view().arg(),
            out.arg(),
            KernelArg::I32(n_heads as i32),
            KernelArg::I32(head_dim as i32),
            KernelArg::I32(n_chunks as i32),
        ];
        self.launch("attention_merge", cfg, &args)
    }
}

/// One block of `ROW_THREADS` per row (or token).
fn per_row(n: usize) -> LaunchConfig {
    LaunchConfig { grid: (n as u32, 1, 1), block: (ROW_THREADS, 1, 1), shared_bytes: 0 }
}

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid: (n.div_ceil(ROW_THREADS as usize).min(4096) as u32, 1, 1),
        block: (ROW_THREADS, 1, 1),
        shared_bytes: 0,
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
    pub data: BufView<'a, u8>,
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
    acc: DeviceBuffer<f32>,
    ml: DeviceBuffer<f32>,
}

impl AttentionScratch {
    /// Room for `splits` (token, chunk) pairs per head: `max(ATT_MAX_SPLITS, tokens)` covers any call.
    pub fn new(gpu: &Gpu, splits: usize, n_heads: usize, head_dim: usize) -> Result<AttentionScratch> {
        Ok(AttentionScratch {
            acc: gpu.alloc_zeros(splits * n_heads * head_dim)?,
            ml: gpu.alloc_zeros(splits * n_heads * 2)?,
        })
    }

    fn fits(&self, splits: usize, n_heads: usize, head_dim: usize) -> bool {
        self.acc.len() >= splits * n_heads * head_dim && self.ml.len() >= splits * n_heads * 2
    }

    pub fn bytes(splits: usize, n_heads: usize, head_dim: usize) -> u64 {
        (splits * n_heads * (head_dim + 2) * 4) as u64
    }
}
