//! The emulated GPU: a [`Device`] whose memory is host memory and whose kernels run in the emulator
//! library (compile.rs). Streams are modelled, not flattened: every copy, memset, launch and event record
//! or wait is queued on its stream and runs later, in an order chosen at random among those the queued
//! events allow, at the latest when the host waits (a synchronize, a download, a free). So work that
//! is not ordered by an event may run before or after the work it races with, and a missing event shows
//! up as a wrong result: a kernel that reads an expert slot before its copy ran, a copy that reads a
//! pinned staging buffer after the host refilled it, a copy that overwrites a slot a queued kernel still
//! reads. A kernel error is sticky, like the driver's, and is reported by the call that waits for it.
//!
//! Other driver behaviour modelled: allocations are 256-byte aligned, hold 0xFF bytes until written,
//! and are limited to the device's capacity (out-of-memory errors); pageable host memory is read when a
//! copy is queued, pinned memory when it runs; more than 48 KiB of dynamic shared memory needs
//! `set_max_dynamic_shared`; kernel arguments must match the kernel's parameters in number, kind and
//! size, and pointer arguments must lie in live device memory.

use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use libloading::Library;
use mixtral_q::engine::cuda::device::EventId;
use mixtral_q::engine::cuda::{Device, DeviceInfo, DevicePtr, KernelArg, LaunchConfig, Stream};

/// Alignment of device allocations (cudaMalloc's).
const ALIGN: usize = 256;
/// Dynamic shared memory a kernel may use without `set_max_dynamic_shared`.
const DEFAULT_DYNAMIC_SHARED: usize = 48 << 10;

/// `EmuArg` of scheduler.cpp.
#[repr(C)]
struct EmuArg {
    value: *const c_void,
    kind: u32,
    size: u32,
    pointee_size: u32,
}

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u32,
    u32,
    *const EmuArg,
    u32,
    u64,
    *mut c_char,
    usize,
) -> c_int;

type HasKernelFn = unsafe extern "C" fn(*const c_char) -> c_int;

pub struct EmulatedDevice {
    launch: LaunchFn,
    has_kernel: HasKernelFn,
    info: DeviceInfo,
    state: Mutex<State>,
    /// Keeps `launch` valid.
    _lib: Library,
}

enum Source {
    /// Pageable memory, read when the copy was queued.
    Snapshot(Vec<u8>),
    /// The address of pinned memory, read when the copy runs.
    Pinned(usize),
}

enum Op {
    Launch { kernel: String, cfg: LaunchConfig, args: Vec<KernelArg> },
    Copy { dst: DevicePtr, src: Source, bytes: usize },
    Memset { dst: DevicePtr, value: u8, bytes: usize },
    Record { event: u64, generation: u64 },
    Wait { event: u64, generation: u64 },
}

#[derive(Default)]
struct EventState {
    /// Generation of the latest record queued, and of the latest that ran.
    recorded: u64,
    done: u64,
}

struct State {
    rng: u64,
    capacity: usize,
    used: usize,
    /// Device allocations: address → layout.
    allocations: BTreeMap<u64, Layout>,
    pinned: BTreeMap<usize, Layout>,
    queues: [VecDeque<Op>; 2],
    events: HashMap<u64, EventState>,
    next_event: u64,
    max_dynamic_shared: HashMap<String, usize>,
    /// The first kernel error: every later call fails with it.
    error: Option<String>,
    launches: u64,
}

fn queue(s: Stream) -> usize {
    match s {
        Stream::Compute => 0,
        Stream::Copy => 1,
    }
}

impl State {
    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(2685821657736338717)
    }

    fn check(&self) -> Result<()> {
        match &self.error {
            Some(e) => bail!("emulated device: {e}"),
            None => Ok(()),
        }
    }

    fn ready(&self, q: usize) -> bool {
        match self.queues[q].front() {
            None => false,
            Some(Op::Wait { event, generation }) => {
                self.events.get(event).is_none_or(|e| e.done >= *generation)
            }
            Some(_) => true,
        }
    }

    /// Whether `addr .. addr + bytes` lies in one live allocation.
    fn in_device_memory(&self, addr: u64, bytes: usize) -> bool {
        self.allocations
            .range(..=addr)
            .next_back()
            .is_some_and(|(&base, layout)| addr + bytes as u64 <= base + layout.size() as u64)
    }

    fn is_pinned(&self, addr: usize) -> bool {
        self.pinned.range(..=addr).next_back().is_some_and(|(&base, layout)| addr < base + layout.size())
    }
}

impl EmulatedDevice {
    /// The emulator in library `lib`, with `capacity` bytes of device memory and random choices from
    /// `seed`.
    pub fn new(lib: &Path, capacity: u64, seed: u64) -> Result<EmulatedDevice> {
        // SAFETY: the library is the emulator built by compile.rs; its initializers register kernels.
        let lib = unsafe { Library::new(lib) }.with_context(|| format!("loading {}", lib.display()))?;
        // SAFETY: the signature is that of emu_launch in scheduler.cpp.
        let launch: LaunchFn = unsafe { *lib.get::<LaunchFn>(b"emu_launch\0")? };
        // SAFETY: the signature is that of emu_has_kernel in scheduler.cpp.
        let has_kernel: HasKernelFn = unsafe { *lib.get::<HasKernelFn>(b"emu_has_kernel\0")? };
        let info = DeviceInfo {
            ordinal: 0,
            name: "the CPU emulator".to_string(),
            // The oldest architecture mixtral-q supports, and its 64 KiB limit of shared memory per block.
            compute_capability: (7, 5),
            total_bytes: capacity,
            free_bytes: capacity,
            max_shared_bytes: 64 << 10,
        };
        let state = State {
            rng: seed | 1,
            capacity: capacity as usize,
            used: 0,
            allocations: BTreeMap::new(),
            pinned: BTreeMap::new(),
            queues: [VecDeque::new(), VecDeque::new()],
            events: HashMap::new(),
            next_event: 1,
            max_dynamic_shared: HashMap::new(),
            error: None,
            launches: 0,
        };
        Ok(EmulatedDevice { launch, has_kernel, info, state: Mutex::new(state), _lib: lib })
    }

    /// Kernels launched so far.
    pub fn launches(&self) -> u64 {
        self.state.lock().unwrap().launches
    }

    /// Bytes of device memory allocated now.
    pub fn used_bytes(&self) -> usize {
        self.state.lock().unwrap().used
    }

    fn enqueue(&self, stream: Stream, op: Op) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.check()?;
        st.queues[queue(stream)].push_back(op);
        // Now and then run some ready work early, so that work not ordered by an event can also run
        // before what the host queues next.
        let eager = st.random() % 4;
        for _ in 0..eager {
            if !self.step(&mut st)? {
                break;
            }
        }
        Ok(())
    }

    /// Runs one ready operation of a random stream; false when none is ready.
    fn step(&self, st: &mut State) -> Result<bool> {
        let ready: Vec<usize> = (0..st.queues.len()).filter(|&q| st.ready(q)).collect();
        if ready.is_empty() {
            return Ok(false);
        }
        let q = ready[(st.random() % ready.len() as u64) as usize];
        let op = st.queues[q].pop_front().expect("a ready queue is not empty");
        if let Err(e) = self.run(st, op) {
            st.error = Some(format!("{e:#}"));
            st.check()?;
        }
        Ok(true)
    }

    /// Runs queued work until `done` holds.
    fn run_until(&self, st: &mut State, done: impl Fn(&State) -> bool) -> Result<()> {
        st.check()?;
        while !done(st) {
            ensure!(
                self.step(st)?,
                "emulated device: queued work waits for an event that can never complete"
            );
        }
        Ok(())
    }

    fn run_all(&self, st: &mut State) -> Result<()> {
        self.run_until(st, |s| s.queues.iter().all(VecDeque::is_empty))
    }

    fn run(&self, st: &mut State, op: Op) -> Result<()> {
        match op {
            Op::Launch { kernel, cfg, args } => self.run_kernel(st, &kernel, &cfg, &args),
            Op::Copy { dst, src, bytes } => {
                ensure!(
                    st.in_device_memory(dst, bytes),
                    "a copy of {bytes} bytes to {dst:#x}: not device memory"
                );
                let from = match &src {
                    Source::Snapshot(v) => v.as_ptr(),
                    Source::Pinned(addr) => *addr as *const u8,
                };
                // SAFETY: the destination lies in a live allocation (checked); the source is our snapshot or
                // pinned memory the caller keeps alive until the copy has run.
                unsafe { std::ptr::copy_nonoverlapping(from, dst as *mut u8, bytes) };
                Ok(())
            }
            Op::Memset { dst, value, bytes } => {
                ensure!(
                    st.in_device_memory(dst, bytes),
                    "a memset of {bytes} bytes at {dst:#x}: not device memory"
                );
                // SAFETY: as for copies.
                unsafe { std::ptr::write_bytes(dst as *mut u8, value, bytes) };
                Ok(())
            }
            Op::Record { event, generation } => {
                if let Some(e) = st.events.get_mut(&event) {
                    e.done = e.done.max(generation);
                }
                Ok(())
            }
            Op::Wait { .. } => Ok(()),
        }
    }

    fn run_kernel(&self, st: &mut State, kernel: &str, cfg: &LaunchConfig, args: &[KernelArg]) -> Result<()> {
        let allowed = st.max_dynamic_shared.get(kernel).copied().unwrap_or(DEFAULT_DYNAMIC_SHARED);
        ensure!(
            cfg.shared_bytes as usize <= allowed,
            "{kernel}: {} bytes of dynamic shared memory, but the kernel may use {allowed} \
             (set_max_dynamic_shared)",
            cfg.shared_bytes
        );
        let mut slots: Vec<[u8; 8]> = Vec::with_capacity(args.len());
        let mut descs = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            let (bytes, size) = a.bytes();
            let (kind, pointee) = match *a {
                KernelArg::Ptr { addr, elem_bytes } => {
                    ensure!(
                        addr == 0 || st.in_device_memory(addr, 1),
                        "{kernel} argument {i} ({addr:#x}) does not point into device memory"
                    );
                    (0, elem_bytes)
                }
                KernelArg::I32(_) | KernelArg::I64(_) => (1, 0),
                KernelArg::F32(_) => (2, 0),
            };
            slots.push(bytes);
            descs.push((kind, size as u32, pointee));
        }
        let emu_args: Vec<EmuArg> = slots
            .iter()
            .zip(&descs)
            .map(|(slot, &(kind, size, pointee_size))| EmuArg {
                value: slot.as_ptr() as *const c_void,
                kind,
                size,
                pointee_size,
            })
            .collect();
        let name = CString::new(kernel)?;
        let grid = [cfg.grid.0, cfg.grid.1, cfg.grid.2];
        let block = [cfg.block.0, cfg.block.1, cfg.block.2];
        let mut error = vec![0 as c_char; 4096];
        let seed = st.random();
        st.launches += 1;
        // SAFETY: every pointer is valid for the call; the kernel's buffers are live device memory (the
        // launch wrappers checked their sizes, this device their addresses).
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                cfg.shared_bytes,
                self.info.max_shared_bytes as u32,
                emu_args.as_ptr(),
                emu_args.len() as u32,
                seed,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if rc != 0 {
            // SAFETY: emu_launch wrote a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned();
            bail!("{msg}");
        }
        Ok(())
    }
}

impl Device for EmulatedDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        let mut st = self.state.lock().unwrap();
        st.check()?;
        let rounded = bytes.max(1).next_multiple_of(ALIGN);
        ensure!(
            st.used + rounded <= st.capacity,
            "out of memory: {bytes} bytes requested, {} of {} free on the emulated device",
            st.capacity - st.used,
            st.capacity
        );
        let layout = Layout::from_size_align(rounded, ALIGN)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        ensure!(!ptr.is_null(), "host allocation of {rounded} bytes failed");
        // Unwritten device memory reads as NaN.
        // SAFETY: `ptr` is valid for `rounded` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0xFF, rounded) };
        st.used += rounded;
        st.allocations.insert(ptr as u64, layout);
        Ok(ptr as u64)
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        let mut st = self.state.lock().unwrap();
        let _ = self.run_all(&mut st);
        if let Some(layout) = st.allocations.remove(&ptr) {
            st.used -= layout.size();
            std::alloc::dealloc(ptr as *mut u8, layout);
        }
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<*mut u8> {
        let mut st = self.state.lock().unwrap();
        let layout = Layout::from_size_align(bytes.max(1), 64)?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        ensure!(!ptr.is_null(), "host allocation of {bytes} bytes failed");
        st.pinned.insert(ptr as usize, layout);
        Ok(ptr)
    }

    unsafe fn free_pinned(&self, ptr: *mut u8) {
        let mut st = self.state.lock().unwrap();
        let _ = self.run_all(&mut st);
        if let Some(layout) = st.pinned.remove(&(ptr as usize)) {
            std::alloc::dealloc(ptr, layout);
        }
    }

    unsafe fn copy_htod(&self, stream: Stream, dst: DevicePtr, src: *const u8, bytes: usize) -> Result<()> {
        let pinned = {
            let st = self.state.lock().unwrap();
            st.is_pinned(src as usize)
        };
        let src = if pinned {
            Source::Pinned(src as usize)
        } else {
            Source::Snapshot(std::slice::from_raw_parts(src, bytes).to_vec())
        };
        self.enqueue(stream, Op::Copy { dst, src, bytes })
    }

    unsafe fn copy_dtoh(&self, stream: Stream, dst: *mut u8, src: DevicePtr, bytes: usize) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let q = queue(stream);
        self.run_until(&mut st, |s| s.queues[q].is_empty())?;
        ensure!(st.in_device_memory(src, bytes), "a copy of {bytes} bytes from {src:#x}: not device memory");
        std::ptr::copy_nonoverlapping(src as *const u8, dst, bytes);
        Ok(())
    }

    unsafe fn memset(&self, stream: Stream, dst: DevicePtr, value: u8, bytes: usize) -> Result<()> {
        self.enqueue(stream, Op::Memset { dst, value, bytes })
    }

    unsafe fn launch(
        &self,
        stream: Stream,
        kernel: &str,
        cfg: &LaunchConfig,
        args: &[KernelArg],
    ) -> Result<()> {
        self.enqueue(stream, Op::Launch { kernel: kernel.to_string(), cfg: *cfg, args: args.to_vec() })
    }

    fn set_max_dynamic_shared(&self, kernel: &str, bytes: usize) -> Result<()> {
        let name = CString::new(kernel)?;
        // SAFETY: a NUL-terminated name.
        ensure!(unsafe { (self.has_kernel)(name.as_ptr()) } != 0, "no kernel {kernel}");
        let mut st = self.state.lock().unwrap();
        ensure!(
            bytes <= self.info.max_shared_bytes,
            "{kernel}: {bytes} bytes of shared memory exceed the device's {}",
            self.info.max_shared_bytes
        );
        st.max_dynamic_shared.insert(kernel.to_string(), bytes);
        Ok(())
    }

    fn create_event(&self) -> Result<EventId> {
        let mut st = self.state.lock().unwrap();
        let id = st.next_event;
        st.next_event += 1;
        st.events.insert(id, EventState::default());
        Ok(EventId(id))
    }

    unsafe fn destroy_event(&self, event: EventId) {
        let mut st = self.state.lock().unwrap();
        let _ = self.run_all(&mut st);
        st.events.remove(&event.0);
    }

    fn record_event(&self, event: EventId, stream: Stream) -> Result<()> {
        let generation = {
            let mut st = self.state.lock().unwrap();
            let e = st.events.get_mut(&event.0).context("recording a destroyed event")?;
            e.recorded += 1;
            e.recorded
        };
        self.enqueue(stream, Op::Record { event: event.0, generation })
    }

    fn wait_event(&self, stream: Stream, event: EventId) -> Result<()> {
        let generation = {
            let st = self.state.lock().unwrap();
            st.events.get(&event.0).context("waiting for a destroyed event")?.recorded
        };
        self.enqueue(stream, Op::Wait { event: event.0, generation })
    }

    fn synchronize_event(&self, event: EventId) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        self.run_until(&mut st, |s| s.events.get(&event.0).is_none_or(|e| e.done >= e.recorded))
    }

    fn synchronize(&self, stream: Stream) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let q = queue(stream);
        self.run_until(&mut st, |s| s.queues[q].is_empty())
    }
}
