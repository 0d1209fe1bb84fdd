//! The CUDA kernels on the CPU, for tests: kernels/*.cu compiled as C++ against kernels/emulator/cuda.h
//! (compile.rs) behind an emulated [`Device`] (device.rs), so that the launch wrappers, the expert cache
//! and the CUDA engine run unchanged in CI without a GPU.
//!
//! Each emulated test runs in a child process (the test binary again, filtered to that one test) with
//! AddressSanitizer's runtime preloaded: the sanitized emulator library is loaded into a Rust program
//! that is not, and ASan must be the first library of the process. A sanitizer report aborts the child;
//! the parent test then fails with the child's output.
#![allow(dead_code)]

pub mod compile;
pub mod device;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use mixtral_q::engine::cuda::Gpu;

pub use self::device::EmulatedDevice;

/// Set in the child: the library to load.
const LIB_VAR: &str = "MIXTRAL_Q_EMULATOR_LIB";
/// Set in the child: the test it runs.
const CHILD_VAR: &str = "MIXTRAL_Q_EMULATOR_CHILD";

/// The engine's kernels, built once per test process.
pub fn engine_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| match std::env::var_os(LIB_VAR) {
        Some(p) => PathBuf::from(p),
        None => compile::build("engine", &compile::engine_units()),
    })
    .clone()
}

/// A seed for the emulator's random choices: `MIXTRAL_Q_EMULATOR_SEED`, else a fresh one (printed, so
/// that a failing order can be replayed).
pub fn seed() -> u64 {
    let seed =
        std::env::var("MIXTRAL_Q_EMULATOR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("emulator seed {seed} (MIXTRAL_Q_EMULATOR_SEED={seed} repeats this run's choices)");
    seed
}

/// An emulated device with the engine's kernels and `capacity` bytes of memory.
pub fn device(capacity: u64) -> Arc<EmulatedDevice> {
    Arc::new(EmulatedDevice::new(&engine_library(), capacity, seed()).unwrap_or_else(|e| panic!("{e:#}")))
}

/// [`Gpu`] over an emulated device of `capacity` bytes.
pub fn gpu(capacity: u64) -> Gpu {
    Gpu::on(device(capacity)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `body` as test `name` (its full path as the test harness names it) in a child process with the
/// sanitizer runtimes (see the module doc); `library` is built in this process first, so that children
/// only load it.
pub fn in_child(name: &str, library: impl FnOnce() -> PathBuf, body: impl FnOnce()) {
    if std::env::var(CHILD_VAR).is_ok_and(|v| v == name) {
        body();
        return;
    }
    let out = run_child(name, &library());
    // The harness's "1 passed" line proves the child ran the test rather than an empty filter.
    let ran = out.stdout.contains("test result: ok. 1 passed");
    assert!(out.success && ran, "{name} failed in the emulator:\n{}\n{}", out.stdout, out.stderr);
}

/// Like [`in_child`] for a body that must fail (a planted fault that a sanitizer aborts the process
/// for): returns the child's output (`None` in the child itself), asserting that it failed.
pub fn failing_child(
    name: &str,
    library: impl FnOnce() -> PathBuf,
    body: impl FnOnce(),
) -> Option<ChildOutput> {
    if std::env::var(CHILD_VAR).is_ok_and(|v| v == name) {
        body();
        return None;
    }
    let out = run_child(name, &library());
    assert!(!out.success, "{name} should have failed in the emulator:\n{}\n{}", out.stdout, out.stderr);
    Some(out)
}

pub struct ChildOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

fn run_child(name: &str, lib: &std::path::Path) -> ChildOutput {
    let out = child(name, lib).output().unwrap_or_else(|e| panic!("cannot start the child of {name}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("{stderr}");
    ChildOutput { success: out.status.success(), stdout, stderr }
}

/// The command that runs test `name` alone in a child, with ASan preloaded when the library is sanitized.
pub fn child(name: &str, lib: &std::path::Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(CHILD_VAR, name).env(LIB_VAR, lib);
    if compile::sanitized() {
        cmd.env("LD_PRELOAD", asan_runtime())
            // Rust's runtime leaks on purpose at exit; the fibers' stacks are switched by hand.
            .env("ASAN_OPTIONS", "detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=1")
            .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
    }
    cmd
}

/// The path of g++'s AddressSanitizer runtime.
fn asan_runtime() -> PathBuf {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    let out = Command::new(&cxx).arg("-print-file-name=libasan.so").output().expect("g++ -print-file-name");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let path = path.canonicalize().unwrap_or_else(|_| {
        panic!("{cxx} has no libasan.so ({}): install libasan for the emulator's tests", path.display())
    });
    path
}
