//! Fuzzing every reader of bytes from a user's file, on stable Rust: the GGUF header, metadata and
//! tensor infos; the tokenizer rebuilt from GGUF metadata; the chat template; safetensors headers; a
//! checkpoint's config.json; and model config and weight handles from metadata, driven through the
//! forward pass (GGUFs whose shapes and types lie). See `harness.rs` for what counts as a finding.
//!
//! `cargo test --release --test fuzz` runs each target for a few seconds (CI). Longer runs:
//! `MIXTRAL_Q_FUZZ_SECONDS=600 MIXTRAL_Q_FUZZ_SEED=7 cargo test --release --test fuzz -- --nocapture`
//! (`MIXTRAL_Q_FUZZ_INPUTS` caps the inputs per target, `MIXTRAL_Q_FUZZ_TARGETS=gguf,model` picks targets).

mod harness;
mod targets;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mixtral_q::text::budget::BudgetedAllocator;

/// No single allocation, and no total held at once, may exceed this.
const ALLOCATION_LIMIT: usize = 1 << 30;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// The binary's allocator (chat templates' budget included), refusing allocations past the limit:
/// the input is saved and the process aborts, which fails the test.
struct LimitedAllocator;

impl LimitedAllocator {
    fn admit(size: usize) -> bool {
        LARGEST.fetch_max(size, Ordering::Relaxed);
        if size <= ALLOCATION_LIMIT && LIVE.load(Ordering::Relaxed) + size <= ALLOCATION_LIMIT {
            LIVE.fetch_add(size, Ordering::Relaxed);
            return true;
        }
        oversized(size);
        false
    }
}

/// Saves the current input and says so, allocating nothing (this runs inside the allocator).
fn oversized(size: usize) {
    const PATH: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/fuzz-oversized-allocation.bin\0");
    let (ptr, len) =
        (harness::CURRENT_PTR.load(Ordering::SeqCst), harness::CURRENT_LEN.load(Ordering::SeqCst));
    // SAFETY: PATH is NUL-terminated; the input buffer is alive while its run allocates; raw libc
    // calls only, since nothing here may allocate.
    unsafe {
        let fd = libc::open(PATH.as_ptr().cast(), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644);
        if fd >= 0 {
            libc::write(fd, ptr as *const libc::c_void, len);
            libc::close(fd);
        }
        let msg = b"fuzz: an allocation over the 1 GiB limit; the input is saved as fuzz-oversized-allocation.bin in CARGO_TARGET_TMPDIR\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
    let _ = size;
}

// SAFETY: forwards to BudgetedAllocator (the system allocator) with the caller's layout; refusing
// returns null, which callers handle (Rust aborts).
unsafe impl GlobalAlloc for LimitedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        BudgetedAllocator.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        BudgetedAllocator.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        BudgetedAllocator.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !Self::admit(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let new = BudgetedAllocator.realloc(ptr, layout, new_size);
        if new.is_null() {
            LIVE.fetch_sub(new_size.saturating_sub(layout.size()), Ordering::Relaxed);
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: LimitedAllocator = LimitedAllocator;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Panics print nothing while fuzzing (they are collected as findings).
fn quiet_panics<R>(f: impl FnOnce() -> R) -> R {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = f();
    std::panic::set_hook(hook);
    r
}

#[test]
fn fuzz_every_reader() {
    let _serial = harness::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _cleanup = targets::ScratchCleanup;
    let seconds = env_number("MIXTRAL_Q_FUZZ_SECONDS", 4);
    let max_inputs = env_number("MIXTRAL_Q_FUZZ_INPUTS", u64::MAX);
    let seed = env_number("MIXTRAL_Q_FUZZ_SEED", 1);
    let only = std::env::var("MIXTRAL_Q_FUZZ_TARGETS").ok();
    let mut total = 0;
    let mut findings = Vec::new();
    for target in targets::all() {
        if only.as_deref().is_some_and(|only| !only.split(',').any(|n| n == target.name)) {
            continue;
        }
        let report = quiet_panics(|| harness::fuzz(&target, seed, max_inputs, Duration::from_secs(seconds)));
        println!(
            "fuzz {:<14} {:>9} inputs in {:>6.1} s ({:>8.0}/s), slowest {:>7.1} ms, {} findings",
            target.name,
            report.inputs,
            report.seconds,
            report.inputs as f64 / report.seconds.max(1e-9),
            report.slowest.as_secs_f64() * 1e3,
            report.findings.len()
        );
        assert!(report.inputs > 0, "{}: no input ran", target.name);
        total += report.inputs;
        findings.extend(report.findings.into_iter().map(|f| (target.name, f)));
    }
    println!(
        "fuzz total: {total} inputs (seed {seed}), largest allocation {} MiB",
        LARGEST.load(Ordering::Relaxed) >> 20
    );
    if !findings.is_empty() {
        for (target, f) in &findings {
            eprintln!("{target}: {} ({})", f.what, f.saved.display());
        }
        panic!(
            "{} findings; fix them, then copy the saved inputs to tests/fuzz/regressions/<target>/",
            findings.len()
        );
    }
}

/// Every input the fuzzer ever found a problem with stays fixed.
#[test]
fn regression_inputs_stay_fixed() {
    let _serial = harness::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _cleanup = targets::ScratchCleanup;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/regressions");
    let mut replayed = 0;
    for dir in std::fs::read_dir(&root).expect("tests/fuzz/regressions") {
        let dir = dir.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let target =
            targets::by_name(&name).unwrap_or_else(|| panic!("{}: no fuzz target {name}", dir.display()));
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            let input = std::fs::read(&path).unwrap();
            let mut slowest = Duration::ZERO;
            if let Some(f) = quiet_panics(|| harness::run_one(&target, &input, &mut slowest)) {
                panic!("{}: {}", path.display(), f.what);
            }
            replayed += 1;
        }
    }
    println!("replayed {replayed} regression inputs");
}

/// The harness itself: a panicking or slow reader is reported, with its input saved.
#[test]
fn the_harness_reports_panics_and_slow_inputs() {
    let _serial = harness::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let target = harness::Target {
        name: "harness-self-test",
        seeds: vec![b"ab".to_vec()],
        mutate: Box::new(|rng, input, seeds| harness::mutate_bytes(rng, input, seeds, 0, &[b"!"])),
        run: Box::new(|input| {
            if input.contains(&b'!') {
                panic!("found the bang");
            }
            if input.starts_with(b"slow") {
                // Busy for more than SLOW of CPU time, however loaded the machine is.
                let t = harness::process_cpu_time();
                while harness::process_cpu_time() < t + harness::SLOW + Duration::from_millis(100) {
                    std::hint::black_box(0);
                }
            }
        }),
    };
    let report = quiet_panics(|| harness::fuzz(&target, 3, 2000, Duration::from_secs(30)));
    assert!(report.findings.iter().any(|f| f.what == "panic: found the bang"), "{:?}", report.findings);
    let f = &report.findings[0];
    assert!(std::fs::read(&f.saved).unwrap().contains(&b'!'));
    let mut slowest = Duration::ZERO;
    let slow = harness::run_one(&target, b"slow", &mut slowest).expect("a slow input is a finding");
    assert!(slow.what.starts_with("slow"), "{}", slow.what);
    let _ = std::fs::remove_dir_all(harness::findings_dir(target.name));
}
