//! The device layer: what the CUDA backend needs of a device, as a trait, so that the kernel launch
//! wrappers ([`super::ops`]), the engine and the expert cache are written once and run on a GPU
//! ([`super::driver`], the CUDA driver API) or on a stand-in such as the tests' CPU emulator of the
//! kernels (tests/emulator).
//!
//! Buffers are raw device addresses with a length and an element type. Work goes to one of two
//! streams and is ordered across them only by explicit events: nothing is tracked per buffer, so a
//! launch costs one driver call. Whoever queues work that reads a buffer another stream writes (or that
//! overwrites what another stream still reads) orders the two with an [`Event`].

use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use anyhow::Result;
use bytemuck::Pod;

use super::DeviceInfo;

/// A device address.
pub type DevicePtr = u64;

/// The device's streams: work queued on one stream runs in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Every kernel.
    Compute,
    /// Expert uploads, overlapping compute.
    Copy,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Compute, Stream::Copy];
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// One kernel argument. Pointers carry their element size so that a device able to check (the
/// emulator) can compare it with the kernel's parameter type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr { addr: DevicePtr, elem_bytes: u32 },
    I32(i32),
    I64(i64),
    F32(f32),
}

impl KernelArg {
    /// A null pointer for a parameter of element type `T`.
    pub fn null<T>() -> KernelArg {
        KernelArg::Ptr { addr: 0, elem_bytes: std::mem::size_of::<T>() as u32 }
    }

    /// The argument's bytes as the kernel's parameter holds them (little-endian), and their number.
    pub fn bytes(&self) -> ([u8; 8], usize) {
        let mut out = [0u8; 8];
        let n = match *self {
            KernelArg::Ptr { addr, .. } => {
                out.copy_from_slice(&addr.to_le_bytes());
                8
            }
            KernelArg::I32(v) => {
                out[..4].copy_from_slice(&v.to_le_bytes());
                4
            }
            KernelArg::I64(v) => {
                out.copy_from_slice(&v.to_le_bytes());
                8
            }
            KernelArg::F32(v) => {
                out[..4].copy_from_slice(&v.to_le_bytes());
                4
            }
        };
        (out, n)
    }
}

/// An event created by [`Device::create_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventId(pub u64);

/// The raw operations of a device. Copies and launches are queued on a stream and may run after the
/// call returns, except where a method says it waits.
pub trait Device: Send + Sync {
    fn info(&self) -> &DeviceInfo;

    /// `bytes` of device memory, aligned to 256 bytes, contents unspecified.
    fn alloc(&self, bytes: usize) -> Result<DevicePtr>;

    /// Frees an allocation once the work queued so far has finished.
    ///
    /// # Safety
    /// `ptr` came from [`Device::alloc`] of this device and is not used afterwards.
    unsafe fn free(&self, ptr: DevicePtr);

    /// `bytes` of page-locked host memory (write-combined on a GPU: for staging uploads, slow to read).
    fn alloc_pinned(&self, bytes: usize) -> Result<*mut u8>;

    /// # Safety
    /// `ptr` came from [`Device::alloc_pinned`] of this device, no queued copy reads it, and it is not
    /// used afterwards.
    unsafe fn free_pinned(&self, ptr: *mut u8);

    /// Queues a copy of `bytes` from host memory at `src` to device memory at `dst`. Pageable memory is
    /// read before the call returns; pinned memory (from [`Device::alloc_pinned`]) when the stream reaches
    /// the copy, so it must stay unchanged until then (record an event after the copy and wait for it).
    ///
    /// # Safety
    /// `src .. src + bytes` is readable (until the copy has run, for pinned memory); `dst .. dst + bytes`
    /// lies in an allocation of this device.
    unsafe fn copy_htod(&self, stream: Stream, dst: DevicePtr, src: *const u8, bytes: usize) -> Result<()>;

    /// Waits for the work queued on `stream`, then copies `bytes` from device memory at `src` to `dst`.
    ///
    /// # Safety
    /// `dst .. dst + bytes` is writable; `src .. src + bytes` lies in an allocation of this device.
    unsafe fn copy_dtoh(&self, stream: Stream, dst: *mut u8, src: DevicePtr, bytes: usize) -> Result<()>;

    /// Queues setting `bytes` of device memory at `dst` to `value`.
    ///
    /// # Safety
    /// `dst .. dst + bytes` lies in an allocation of this device.
    unsafe fn memset(&self, stream: Stream, dst: DevicePtr, value: u8, bytes: usize) -> Result<()>;

    /// Queues kernel `kernel` (a name of [`super::kernels::kernel_names`]) with `args`.
    ///
    /// # Safety
    /// The arguments match the kernel's parameters, and every buffer the kernel reads or writes stays
    /// allocated (and is not written by another stream) until it has run.
    unsafe fn launch(
        &self,
        stream: Stream,
        kernel: &str,
        cfg: &LaunchConfig,
        args: &[KernelArg],
    ) -> Result<()>;

    /// Lets `kernel` use up to `bytes` of dynamic shared memory per block (the default limit is 48 KiB).
    fn set_max_dynamic_shared(&self, kernel: &str, bytes: usize) -> Result<()>;

    fn create_event(&self) -> Result<EventId>;

    /// # Safety
    /// `event` came from [`Device::create_event`] of this device and is not used afterwards.
    unsafe fn destroy_event(&self, event: EventId);

    /// Captures the work queued on `stream` so far in `event` (replacing what it captured before).
    fn record_event(&self, event: EventId, stream: Stream) -> Result<()>;

    /// Work queued on `stream` after this call waits for the work `event` captured when this call was
    /// made (none if it was never recorded).
    fn wait_event(&self, stream: Stream, event: EventId) -> Result<()>;

    /// Waits (on the host) for the work `event` captured (returns at once if it was never recorded).
    fn synchronize_event(&self, event: EventId) -> Result<()>;

    /// Waits (on the host) for the work queued on `stream`.
    fn synchronize(&self, stream: Stream) -> Result<()>;
}

/// `len` values of type `T` in device memory; freed on drop.
pub struct DeviceBuffer<T> {
    ptr: DevicePtr,
    len: usize,
    dev: Arc<dyn Device>,
    _t: PhantomData<T>,
}

impl<T: Pod> DeviceBuffer<T> {
    /// Room for `len` values, contents unspecified (any bit pattern is a valid `T`).
    pub fn alloc(dev: &Arc<dyn Device>, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes =
            len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| anyhow::anyhow!("{len} values"))?;
        let ptr = dev.alloc(bytes)?;
        Ok(DeviceBuffer { ptr, len, dev: dev.clone(), _t: PhantomData })
    }

    /// The same allocation as values of `U` (any bit pattern is a valid `U`); a partial last value
    /// is not counted.
    pub fn cast<U: Pod>(self) -> DeviceBuffer<U> {
        let this = std::mem::ManuallyDrop::new(self);
        let len = this.len * std::mem::size_of::<T>() / std::mem::size_of::<U>();
        // SAFETY: `this` is never dropped, so the device handle moves out exactly once.
        let dev = unsafe { std::ptr::read(&this.dev) };
        DeviceBuffer { ptr: this.ptr, len, dev, _t: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn address(&self) -> DevicePtr {
        self.ptr
    }

    pub fn view(&self) -> BufView<'_, T> {
        BufView { ptr: self.ptr, len: self.len, _t: PhantomData }
    }

    pub fn view_mut(&mut self) -> BufViewMut<'_, T> {
        BufViewMut { ptr: self.ptr, len: self.len, _t: PhantomData }
    }

    /// Values `range` (panics when out of bounds, as slicing does).
    pub fn slice(&self, range: impl RangeBounds<usize>) -> BufView<'_, T> {
        self.view().slice(range)
    }

    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> BufViewMut<'_, T> {
        let (start, end) = bounds(range, self.len);
        BufViewMut { ptr: self.ptr + offset::<T>(start), len: end - start, _t: PhantomData }
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: the buffer owns its allocation, and no view outlives it.
        unsafe { self.dev.free(self.ptr) };
    }
}

/// A read-only range of a [`DeviceBuffer`].
pub struct BufView<'a, T> {
    ptr: DevicePtr,
    len: usize,
    _t: PhantomData<&'a [T]>,
}

impl<T> Clone for BufView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for BufView<'_, T> {}

impl<'a, T> BufView<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn address(&self) -> DevicePtr {
        self.ptr
    }

    pub fn slice(&self, range: impl RangeBounds<usize>) -> BufView<'a, T> {
        let (start, end) = bounds(range, self.len);
        BufView { ptr: self.ptr + offset::<T>(start), len: end - start, _t: PhantomData }
    }

    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr { addr: self.ptr, elem_bytes: std::mem::size_of::<T>() as u32 }
    }
}

/// A writable range of a [`DeviceBuffer`].
pub struct BufViewMut<'a, T> {
    ptr: DevicePtr,
    len: usize,
    _t: PhantomData<&'a mut [T]>,
}

impl<T> BufViewMut<'_, T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn address(&self) -> DevicePtr {
        self.ptr
    }

    pub fn as_view(&self) -> BufView<'_, T> {
        BufView { ptr: self.ptr, len: self.len, _t: PhantomData }
    }

    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> BufViewMut<'_, T> {
        let (start, end) = bounds(range, self.len);
        BufViewMut { ptr: self.ptr + offset::<T>(start), len: end - start, _t: PhantomData }
    }

    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr { addr: self.ptr, elem_bytes: std::mem::size_of::<T>() as u32 }
    }
}

fn offset<T>(elements: usize) -> u64 {
    (elements * std::mem::size_of::<T>()) as u64
}

fn bounds(range: impl RangeBounds<usize>, len: usize) -> (usize, usize) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    assert!(start <= end && end <= len, "range {start}..{end} out of a device buffer of {len} values");
    (start, end)
}

/// A device event (see [`Device::record_event`]); destroyed on drop.
pub struct Event {
    id: EventId,
    dev: Arc<dyn Device>,
}

impl Event {
    pub fn new(dev: &Arc<dyn Device>) -> Result<Event> {
        Ok(Event { id: dev.create_event()?, dev: dev.clone() })
    }

    /// Captures the work queued on `stream` so far.
    pub fn record(&self, stream: Stream) -> Result<()> {
        self.dev.record_event(self.id, stream)
    }

    /// Makes work queued on `stream` from now on wait for what this event captured.
    pub fn wait(&self, stream: Stream) -> Result<()> {
        self.dev.wait_event(stream, self.id)
    }

    /// Waits on the host for what this event captured.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize_event(self.id)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is owned here and used by nothing else.
        unsafe { self.dev.destroy_event(self.id) };
    }
}

/// Page-locked host memory for staging uploads; freed on drop.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    dev: Arc<dyn Device>,
}

// SAFETY: the buffer owns its memory exclusively; shared access is read-only.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn new(dev: &Arc<dyn Device>, len: usize) -> Result<PinnedBuffer> {
        let ptr = dev.alloc_pinned(len)?;
        // SAFETY: the allocation is `len` bytes; zeroing it makes every later read defined.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(PinnedBuffer { ptr, len, dev: dev.clone() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, to fill before a copy reads them: a copy queued earlier that reads this buffer must
    /// have run (wait for the event recorded after it), or it copies what is written now.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `len` bytes and owned by `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // A queued copy may still read the buffer: let it finish first.
        let _ = self.dev.synchronize(Stream::Copy);
        let _ = self.dev.synchronize(Stream::Compute);
        // SAFETY: owned allocation; the copies that read it have finished.
        unsafe { self.dev.free_pinned(self.ptr) };
    }
}
