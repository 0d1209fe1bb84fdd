//! The CPU emulator of the CUDA kernels catches what it claims to (README, tests/emulator): each test
//! plants one fault in a small kernel of its own (FAULTS below, built like kernels/*.cu) or in the order of
//! device work, and checks the emulator reports it. Sanitizer reports abort the process, so those tests
//! look at the output of the child process the test ran in.

mod emulator;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use mixtral_q::engine::cuda::{AttentionScratch, CudaEngine, ATT_MAX_SPLITS};
use mixtral_q::engine::cuda::{Device, DeviceBuffer, Event, KernelArg, LaunchConfig, PinnedBuffer, Stream};
use mixtral_q::engine::hybrid::MissChoice;
use mixtral_q::engine::Engine;
use mixtral_q::model::weights::Model;

use emulator::compile::{self, Unit};
use emulator::EmulatedDevice;

/// Kernels with one planted fault each (and `copy`, which has none).
const FAULTS: &str = r#"
extern "C" __global__ void copy(const float* src, float* dst, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i];
}

// Half of the block skips the barrier.
extern "C" __global__ void barrier_in_a_branch(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1.f;
}

// Both halves reach a barrier, but not the same one.
extern "C" __global__ void divergent_barriers(float* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.f;
}

// Lane 3 exits before the warp's shuffle.
extern "C" __global__ void shuffle_after_exit(float* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// A full-warp shuffle in a block whose second warp has only 16 threads.
extern "C" __global__ void shuffle_in_a_partial_warp(float* out) {
    out[threadIdx.x] = warp_sum(1.f);
}

// The mask names lanes 0-15, which read lanes 16-31.
extern "C" __global__ void shuffle_outside_the_mask(float* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 16);
}

// One float past a static shared array.
extern "C" __global__ void static_shared_overflow(float* out) {
    __shared__ float s[64];
    float* p = s;
    p[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = p[threadIdx.x];
}

// One float past the launch's dynamic shared memory.
extern "C" __global__ void dynamic_shared_overflow(float* out) {
    extern __shared__ float d[];
    d[threadIdx.x] = 1.f;
    out[threadIdx.x] = d[threadIdx.x];
}

// Past the end of a device buffer of n floats.
extern "C" __global__ void global_overflow(float* out, int n) {
    out[n + threadIdx.x] = 1.f;
}

// A 16-byte load from an address that is only 4-byte aligned.
extern "C" __global__ void misaligned_load(const float* in, float* out) {
    const uint4 v = load_16((const u8*)(in + 1));
    out[threadIdx.x] = __uint_as_float(v.x);
}

// Takes a long: launched with an int.
extern "C" __global__ void takes_a_long(float* out, long n) {
    if (threadIdx.x < n) out[threadIdx.x] = 1.f;
}
"#;

const KERNELS: [&str; 12] = [
    "copy",
    "barrier_in_a_branch",
    "divergent_barriers",
    "shuffle_after_exit",
    "shuffle_in_a_partial_warp",
    "shuffle_outside_the_mask",
    "static_shared_overflow",
    "dynamic_shared_overflow",
    "global_overflow",
    "misaligned_load",
    "takes_a_long",
    "warp_sum_of_lanes",
];

/// `warp_sum` over lane ids, correct: the shuffles' results, not only their checks, are emulated.
const CORRECT: &str = r#"
extern "C" __global__ void warp_sum_of_lanes(float* out) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = warp_sum((float)(threadIdx.x & 31));
}
"#;

fn faults_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| match std::env::var_os("MIXTRAL_Q_EMULATOR_LIB") {
        Some(p) => PathBuf::from(p),
        None => {
            let unit = Unit {
                name: "faults.cu".to_string(),
                source: format!("{FAULTS}\n{CORRECT}"),
                kernels: KERNELS.iter().map(|k| k.to_string()).collect(),
            };
            compile::build("faults", &[unit])
        }
    })
    .clone()
}

fn device() -> Arc<EmulatedDevice> {
    Arc::new(EmulatedDevice::new(&faults_library(), 1 << 30, emulator::seed()).unwrap())
}

fn launch(
    dev: &EmulatedDevice,
    kernel: &str,
    threads: u32,
    shared: u32,
    args: &[KernelArg],
) -> anyhow::Result<()> {
    let cfg = LaunchConfig { grid: (1, 1, 1), block: (threads, 1, 1), shared_bytes: shared };
    // SAFETY: the buffers are live device memory as long as the tests' kernels need.
    unsafe { dev.launch(Stream::Compute, kernel, &cfg, args) }?;
    dev.synchronize(Stream::Compute)
}

fn buffer(dev: &Arc<EmulatedDevice>, len: usize) -> DeviceBuffer<f32> {
    let dyn_dev: Arc<dyn Device> = dev.clone();
    DeviceBuffer::alloc(&dyn_dev, len).unwrap()
}

/// Runs `kernel` with one output buffer of 64 floats; returns the error message.
fn error_of(kernel: &str, threads: u32) -> String {
    let dev = device();
    let out = buffer(&dev, 64);
    let err = launch(&dev, kernel, threads, 0, &[out.view().arg()]).expect_err(kernel);
    let msg = format!("{err:#}");
    eprintln!("{kernel}: {msg}");
    msg
}

macro_rules! emulated {
    ($name:ident, $body:block) => {
        #[test]
        fn $name() {
            emulator::in_child(stringify!($name), faults_library, || $body);
        }
    };
}

/// A test whose child must abort with `expected` in its output (a sanitizer's report).
macro_rules! aborts {
    ($name:ident, $expected:expr, $body:block) => {
        #[test]
        fn $name() {
            if let Some(out) = emulator::failing_child(stringify!($name), faults_library, || $body) {
                for expected in $expected {
                    assert!(out.stderr.contains(expected), "no {expected:?} in:\n{}", out.stderr);
                }
            }
        }
    };
}

emulated!(shuffles_compute_the_right_values, {
    let dev = device();
    let out = buffer(&dev, 3 * 64);
    let cfg = LaunchConfig { grid: (3, 1, 1), block: (64, 1, 1), shared_bytes: 0 };
    // SAFETY: the buffer holds the 192 values the kernel writes.
    unsafe { dev.launch(Stream::Compute, "warp_sum_of_lanes", &cfg, &[out.view().arg()]) }.unwrap();
    let mut got = vec![0f32; 192];
    // SAFETY: `got` has room for the buffer.
    unsafe { dev.copy_dtoh(Stream::Compute, got.as_mut_ptr() as *mut u8, out.address(), 192 * 4) }.unwrap();
    assert!(got.iter().all(|&v| v == 496.0), "{got:?}");
});

emulated!(a_barrier_that_part_of_the_block_skips, {
    let msg = error_of("barrier_in_a_branch", 32);
    assert!(msg.contains("only part of the block") && msg.contains("faults.cu"), "{msg}");
});

emulated!(threads_at_different_barriers, {
    let msg = error_of("divergent_barriers", 32);
    assert!(msg.contains("divergent __syncthreads()"), "{msg}");
});

emulated!(a_shuffle_with_an_exited_lane, {
    let msg = error_of("shuffle_after_exit", 32);
    assert!(msg.contains("inactive lane") && msg.contains("lane 3"), "{msg}");
});

emulated!(a_full_warp_shuffle_in_a_partial_warp, {
    let msg = error_of("shuffle_in_a_partial_warp", 48);
    assert!(msg.contains("a block of 48 threads does not have"), "{msg}");
});

emulated!(a_shuffle_reading_outside_its_mask, {
    let msg = error_of("shuffle_outside_the_mask", 32);
    assert!(msg.contains("not in the mask"), "{msg}");
});

emulated!(a_kernel_argument_of_the_wrong_size, {
    let dev = device();
    let out = buffer(&dev, 64);
    let err = launch(&dev, "takes_a_long", 32, 0, &[out.view().arg(), KernelArg::I32(32)]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("parameter 1 is a 8-byte integer, the launch passed a 4-byte integer"), "{msg}");
    // The right size runs, and the error before did not stick to the device.
    let dev = device();
    let out = buffer(&dev, 64);
    launch(&dev, "takes_a_long", 32, 0, &[out.view().arg(), KernelArg::I64(32)]).unwrap();
});

emulated!(too_much_dynamic_shared_memory_without_opting_in, {
    let dev = device();
    let out = buffer(&dev, 64);
    let err = launch(&dev, "dynamic_shared_overflow", 32, 60 << 10, &[out.view().arg()]).unwrap_err();
    assert!(format!("{err:#}").contains("set_max_dynamic_shared"), "{err:#}");
});

aborts!(static_shared_memory_out_of_bounds, ["AddressSanitizer: heap-buffer-overflow", "faults.cu"], {
    let dev = device();
    let out = buffer(&dev, 65);
    let _ = launch(&dev, "static_shared_overflow", 65, 0, &[out.view().arg()]);
});

aborts!(dynamic_shared_memory_out_of_bounds, ["AddressSanitizer: heap-buffer-overflow", "faults.cu"], {
    let dev = device();
    let out = buffer(&dev, 64);
    let _ = launch(&dev, "dynamic_shared_overflow", 64, 63 * 4, &[out.view().arg()]);
});

aborts!(global_memory_out_of_bounds, ["AddressSanitizer: heap-buffer-overflow", "faults.cu"], {
    let dev = device();
    let out = buffer(&dev, 64);
    let _ = launch(&dev, "global_overflow", 32, 0, &[out.view().arg(), KernelArg::I32(64)]);
});

aborts!(a_misaligned_16_byte_load, ["misaligned address", "uint4"], {
    let dev = device();
    let (input, out) = (buffer(&dev, 64), buffer(&dev, 64));
    let _ = launch(&dev, "misaligned_load", 32, 0, &[input.view().arg(), out.view().arg()]);
});

const N: usize = 1024;

/// Queues a copy of `host` to `src` on the copy stream and the `copy` kernel from `src` to `dst` on the
/// compute stream, the kernel waiting for an event after the copy when `ordered`; returns what `dst` got.
fn copy_then_kernel(dev: &Arc<EmulatedDevice>, ordered: bool) -> Vec<f32> {
    let dyn_dev: Arc<dyn Device> = dev.clone();
    let (src, dst) = (buffer(dev, N), buffer(dev, N));
    let mut pinned = PinnedBuffer::new(&dyn_dev, N * 4).unwrap();
    let values: Vec<f32> = (0..N).map(|i| i as f32).collect();
    pinned.as_mut_slice().copy_from_slice(bytemuck::cast_slice(&values));
    let copied = Event::new(&dyn_dev).unwrap();
    // SAFETY: `pinned` outlives the copy (it is dropped after the download below).
    unsafe { dev.copy_htod(Stream::Copy, src.address(), pinned.as_ptr(), N * 4) }.unwrap();
    if ordered {
        copied.record(Stream::Copy).unwrap();
        copied.wait(Stream::Compute).unwrap();
    }
    let cfg = LaunchConfig { grid: (4, 1, 1), block: (256, 1, 1), shared_bytes: 0 };
    let args = [src.view().arg(), dst.view().arg(), KernelArg::I32(N as i32)];
    // SAFETY: both buffers hold N floats.
    unsafe { dev.launch(Stream::Compute, "copy", &cfg, &args) }.unwrap();
    let mut got = vec![0f32; N];
    // SAFETY: `got` has room for the buffer.
    unsafe { dev.copy_dtoh(Stream::Compute, got.as_mut_ptr() as *mut u8, dst.address(), N * 4) }.unwrap();
    got
}

emulated!(a_kernel_that_does_not_wait_for_its_input_reads_stale_memory, {
    let dev = device();
    let want: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let stale = (0..100).filter(|_| copy_then_kernel(&dev, false) != want).count();
    assert!(stale > 0, "100 unordered runs all read the copied values: the emulator did not reorder them");
    for _ in 0..20 {
        assert_eq!(copy_then_kernel(&dev, true), want, "ordered by an event");
    }
});

/// Copies pinned staging buffer contents 1.0, then refills the buffer with 2.0 (after waiting for the copy
/// when `ordered`): returns what the device got from the first copy.
fn refill_staging(dev: &Arc<EmulatedDevice>, ordered: bool) -> Vec<f32> {
    let dyn_dev: Arc<dyn Device> = dev.clone();
    let dst = buffer(dev, N);
    let mut staging = PinnedBuffer::new(&dyn_dev, N * 4).unwrap();
    let read = Event::new(&dyn_dev).unwrap();
    staging.as_mut_slice().copy_from_slice(bytemuck::cast_slice(&vec![1f32; N]));
    // SAFETY: `staging` outlives the copy.
    unsafe { dev.copy_htod(Stream::Copy, dst.address(), staging.as_ptr(), N * 4) }.unwrap();
    read.record(Stream::Copy).unwrap();
    if ordered {
        read.synchronize().unwrap();
    }
    staging.as_mut_slice().copy_from_slice(bytemuck::cast_slice(&vec![2f32; N]));
    let mut got = vec![0f32; N];
    dev.synchronize(Stream::Copy).unwrap();
    // SAFETY: `got` has room for the buffer.
    unsafe { dev.copy_dtoh(Stream::Compute, got.as_mut_ptr() as *mut u8, dst.address(), N * 4) }.unwrap();
    got
}

emulated!(refilling_a_staging_buffer_before_its_copy_ran_corrupts_the_copy, {
    let dev = device();
    let corrupt = (0..100).filter(|_| refill_staging(&dev, false) != vec![1f32; N]).count();
    assert!(corrupt > 0, "100 unordered refills never reached the queued copy: the emulator ran it early");
    for _ in 0..20 {
        assert_eq!(refill_staging(&dev, true), vec![1f32; N], "waited for the staging buffer's event");
    }
});

/// The CUDA engine's out-of-memory errors say which step ran out: at load, the first upload; while
/// running, the activations (allocated from a pool as the forward pass needs them).
#[test]
fn out_of_memory_errors_name_the_step() {
    emulator::in_child("out_of_memory_errors_name_the_step", emulator::engine_library, || {
        let model = Model::load(std::path::Path::new("tests/fixtures/llamacpp/tiny-q4_k_m.gguf")).unwrap();
        let plan = CudaEngine::on(emulator::gpu(1 << 30), &model, 32, None, MissChoice::Copy)
            .unwrap()
            .plan()
            .clone();
        let total = plan.dense + plan.kv_cache + plan.scratch + plan.resident_bytes;
        // Room for nothing: the first upload fails.
        let err = CudaEngine::on(emulator::gpu(0), &model, 32, Some(total), MissChoice::Copy)
            .err()
            .expect("out of memory");
        let msg = format!("{err:#}");
        eprintln!("{msg}");
        assert!(msg.contains("uploading RoPE's table") && msg.contains("out of memory"), "{msg}");
        // Room for the weights and the KV cache but not the activations: loading works, running fails,
        // and the engine stays usable (nothing was appended to the cache).
        // (The attention scratch is allocated at load, and a few small tables.)
        let cfg = &model.config;
        let at_load = AttentionScratch::bytes(ATT_MAX_SPLITS, cfg.n_heads, cfg.head_dim) + (16 << 10);
        let mut engine = CudaEngine::on(
            emulator::gpu(total - plan.scratch + at_load),
            &model,
            32,
            Some(total),
            MissChoice::Copy,
        )
        .unwrap();
        let tokens: Vec<u32> = (0..32).collect();
        let Err(err) = engine.forward(&tokens, true) else {
            panic!("32 tokens ran without room for their activations");
        };
        let msg = format!("{err:#}");
        eprintln!("{msg}");
        assert!(msg.contains("allocating activations") && msg.contains("out of memory"), "{msg}");
        assert_eq!(engine.position(), 0);
    });
}
