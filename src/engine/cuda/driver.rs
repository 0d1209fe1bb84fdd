//! The GPU as a [`Device`]: the CUDA driver API through cudarc (context, streams and modules with its
//! safe types; memory, copies, events and launches as plain driver calls on raw handles, so that nothing
//! is tracked per buffer and a launch is one `cuLaunchKernel`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::sys::{self, CUfunction_attribute};
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use super::device::{Device, DevicePtr, EventId, KernelArg, LaunchConfig, Stream};
use super::{kernels, DeviceInfo};

pub struct CudaDriver {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

impl CudaDriver {
    /// Opens device `ordinal` and compiles (or loads from the cache) every kernel for its architecture.
    pub fn new(ordinal: usize) -> Result<CudaDriver> {
        let info = super::device_info(ordinal)?;
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a CUDA context on device {ordinal}"))?;
        // Buffers are raw addresses here; cudarc's per-buffer event tracking has nothing to track.
        // SAFETY: no cudarc-managed buffer is used with this context.
        unsafe { ctx.disable_event_tracking() };
        let compute = ctx.new_stream()?;
        let copy = ctx.new_stream()?;
        let arch = info.arch();
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
        let mut functions = HashMap::new();
        for ((file, _), cubin) in kernels::SOURCES.iter().zip(cubins) {
            let module = ctx
                .load_module(Ptx::from_binary(cubin?))
                .with_context(|| format!("loading {file} for sm_{arch}"))?;
            for name in kernels::kernel_names(file) {
                let f = module
                    .load_function(&name)
                    .with_context(|| format!("kernel {name} missing from {file}"))?;
                functions.insert(name, f);
            }
        }
        Ok(CudaDriver { ctx, info, compute, copy, functions })
    }

    fn stream(&self, s: Stream) -> sys::CUstream {
        match s {
            Stream::Compute => self.compute.cu_stream(),
            Stream::Copy => self.copy.cu_stream(),
        }
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).with_context(|| format!("no kernel {name}"))
    }

    /// Makes the context current on the calling thread (the engine may move between threads).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().context("making the CUDA context current")
    }
}

fn event(e: EventId) -> sys::CUevent {
    e.0 as usize as sys::CUevent
}

impl Device for CudaDriver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        self.bind()?;
        // SAFETY: plain allocation; cuMemAlloc aligns to at least 256 bytes. Zero bytes is not allowed.
        Ok(unsafe { result::malloc_sync(bytes.max(1)) }?)
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        if self.bind().is_ok() && self.ctx.synchronize().is_ok() {
            let _ = result::free_sync(ptr);
        }
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<*mut u8> {
        self.bind()?;
        // SAFETY: plain allocation.
        let ptr = unsafe { result::malloc_host(bytes.max(1), sys::CU_MEMHOSTALLOC_WRITECOMBINED) }?;
        Ok(ptr as *mut u8)
    }

    unsafe fn free_pinned(&self, ptr: *mut u8) {
        if self.bind().is_ok() {
            let _ = result::free_host(ptr as *mut c_void);
        }
    }

    unsafe fn copy_htod(&self, stream: Stream, dst: DevicePtr, src: *const u8, bytes: usize) -> Result<()> {
        self.bind()?;
        sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, bytes, self.stream(stream)).result()?;
        Ok(())
    }

    unsafe fn copy_dtoh(&self, stream: Stream, dst: *mut u8, src: DevicePtr, bytes: usize) -> Result<()> {
        self.bind()?;
        let s = self.stream(stream);
        sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, bytes, s).result()?;
        result::stream::synchronize(s)?;
        Ok(())
    }

    unsafe fn memset(&self, stream: Stream, dst: DevicePtr, value: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        result::memset_d8_async(dst, value, bytes, self.stream(stream))?;
        Ok(())
    }

    unsafe fn launch(
        &self,
        stream: Stream,
        kernel: &str,
        cfg: &LaunchConfig,
        args: &[KernelArg],
    ) -> Result<()> {
        let f = self.function(kernel)?;
        self.bind()?;
        // Each argument's bytes in an 8-byte slot; the driver reads as many as the parameter's size.
        let mut slots: Vec<[u8; 8]> = args.iter().map(|a| a.bytes().0).collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect();
        result::launch_kernel(
            f.cu_function(),
            cfg.grid,
            cfg.block,
            cfg.shared_bytes,
            self.stream(stream),
            &mut params,
        )
        .with_context(|| format!("launching {kernel}"))?;
        Ok(())
    }

    fn set_max_dynamic_shared(&self, kernel: &str, bytes: usize) -> Result<()> {
        self.bind()?;
        self.function(kernel)?
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .with_context(|| format!("allowing {kernel} {bytes} bytes of shared memory"))?;
        Ok(())
    }

    fn create_event(&self) -> Result<EventId> {
        self.bind()?;
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        Ok(EventId(e as usize as u64))
    }

    unsafe fn destroy_event(&self, e: EventId) {
        if self.bind().is_ok() {
            let _ = result::event::destroy(event(e));
        }
    }

    fn record_event(&self, e: EventId, stream: Stream) -> Result<()> {
        self.bind()?;
        // SAFETY: `e` is a live event of this context (the `Event` owning it is borrowed by the caller).
        unsafe { result::event::record(event(e), self.stream(stream)) }?;
        Ok(())
    }

    fn wait_event(&self, stream: Stream, e: EventId) -> Result<()> {
        self.bind()?;
        // SAFETY: as in `record_event`.
        unsafe {
            result::stream::wait_event(
                self.stream(stream),
                event(e),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }?;
        Ok(())
    }

    fn synchronize_event(&self, e: EventId) -> Result<()> {
        self.bind()?;
        // SAFETY: as in `record_event`.
        unsafe { result::event::synchronize(event(e)) }.context("waiting for the GPU")?;
        Ok(())
    }

    fn synchronize(&self, stream: Stream) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream lives as long as `self`.
        unsafe { result::stream::synchronize(self.stream(stream)) }.context("waiting for the GPU")?;
        Ok(())
    }
}
