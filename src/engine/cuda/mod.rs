//! The CUDA backend: kernels compiled at run time by NVRTC (no toolkit needed to build or to run), the
//! driver reached through cudarc's dynamically loaded `libcuda`, so the binary starts on machines
//! without an NVIDIA driver and [`cuda_available`] says why CUDA cannot be used.
//!
//! Layout: `nvrtc` (the compiler, found in the toolkit or the `nvidia-cuda-nvrtc` wheels),
//! `kernels` (embedded sources, on-disk cubin cache), `device` (the [`Device`] trait: buffers, copies,
//! launches, streams, events, pinned staging), `driver` (the GPU as a `Device`, through the CUDA driver
//! API), `ops` ([`Gpu`]: typed launch wrappers over any `Device`), `expert_cache` (VRAM slots for experts
//! that the placement plan left in host memory), `pool` (recycled activation buffers), `backend`
//! ([`CudaBackend`]: the transformer's ops over all of these; the model itself is written once, in
//! `engine::transformer`). The tests run `ops`, `expert_cache` and the whole model on a CPU emulator of
//! the kernels (tests/emulator).

mod backend;
pub mod device;
mod driver;
pub mod expert_cache;
pub mod kernels;
pub mod nvrtc;
mod ops;
mod pool;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;

pub use self::backend::{activation_bytes, CudaBackend, CudaEngine};
pub use self::device::{
    BufView, BufViewMut, Device, DeviceBuffer, DevicePtr, Event, KernelArg, LaunchConfig, PinnedBuffer,
    Stream,
};
pub use self::ops::{AttentionArgs, AttentionScratch, Gpu, WeightView, ATT_MAX_SPLITS, MAX_EXPERTS};

/// What the CLI and the placement plan need to know about a GPU.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Shared memory a block may use (the opt-in limit, for kernels that ask for more than 48 KiB).
    pub max_shared_bytes: usize,
}

impl DeviceInfo {
    /// The NVRTC architecture number (`sm_{arch}`).
    pub fn arch(&self) -> u32 {
        (self.compute_capability.0 * 10 + self.compute_capability.1) as u32
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "cuda:{} {} (sm_{}, {:.1} GiB, {:.1} GiB free)",
            self.ordinal,
            self.name,
            self.arch(),
            gib(self.total_bytes),
            gib(self.free_bytes)
        )
    }
}

/// Options of [`CudaEngine::new`].
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// CUDA device ordinal (`--device cuda:N`).
    pub device: usize,
    /// Bytes of VRAM the engine may use (`--vram-budget`); default: free VRAM minus a reserve
    /// ([`crate::placement::DEFAULT_RESERVE`]).
    pub vram_budget: Option<u64>,
    /// Keep the experts of only this many layers in VRAM (`-ngl N`); see [`Plan::with_gpu_layers`].
    ///
    /// [`Plan::with_gpu_layers`]: crate::placement::Plan::with_gpu_layers
    pub gpu_layers: Option<usize>,
    /// Where experts left in host memory run (`--misses`).
    pub misses: crate::engine::hybrid::MissChoice,
    /// The order experts are placed in VRAM, most used first (`--hot-experts`); default: spread.
    pub hot_experts: Option<Vec<(usize, usize)>>,
}

/// Device 0, if CUDA can be used: errors say what is missing (the driver, a device, a recent enough GPU).
pub fn cuda_available() -> Result<DeviceInfo> {
    device_info(0)
}

/// Number of CUDA devices; an error when there is no driver.
pub fn device_count() -> Result<usize> {
    check_driver()?;
    Ok(CudaContext::device_count().context("querying the CUDA devices")? as usize)
}

/// Name, architecture and memory of device `ordinal`.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    let count = device_count()?;
    ensure!(count > 0, "the NVIDIA driver reports no CUDA device");
    ensure!(ordinal < count, "no CUDA device {ordinal} (this machine has {count})");
    let ctx = CudaContext::new(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
    let (free, total) = ctx.mem_get_info()?;
    let info = DeviceInfo {
        ordinal,
        name: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        total_bytes: total as u64,
        free_bytes: free as u64,
        max_shared_bytes: ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
            as usize,
    };
    ensure!(
        info.arch() >= kernels::MIN_ARCH,
        "{} has compute capability {}.{}; mixtral-q needs 7.5 (Turing) or newer",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1
    );
    Ok(info)
}

/// cudarc panics when it cannot load `libcuda`: ask first.
fn check_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("no NVIDIA driver found (libcuda.so could not be loaded)");
    }
    Ok(())
}
