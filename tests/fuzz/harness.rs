//! The fuzzing loop on stable Rust: seeded mutations of seed inputs, each input run under
//! `catch_unwind` (a panic is a finding) and timed (over 2 s of CPU is a finding); a watchdog thread ends the
//! process on a hang, and the binary's allocator ends it on an allocation over 1 GiB (both save the
//! input first). Findings are written to `$CARGO_TARGET_TMPDIR/fuzz-findings/<target>/`; once fixed,
//! copy them to `tests/fuzz/regressions/<target>/`, where every run replays them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A reader under test: it gets the bytes of one input and must return (errors are fine) without
/// panicking, hanging or allocating more than the limit.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub mutate: Mutator,
    pub run: Reader,
}

/// A new input from a seed (all seeds given for splicing).
pub type Mutator = Box<dyn Fn(&mut Rng, &[u8], &[Vec<u8>]) -> Vec<u8>>;
/// Runs the readers on one input.
pub type Reader = Box<dyn Fn(&[u8])>;

/// An input taking more CPU time than this is a finding.
pub const SLOW: Duration = Duration::from_secs(2);
/// The watchdog ends the process when one input runs this long in wall time (it would otherwise
/// hang the test); generous, since a shared machine may starve the process.
const HANG: Duration = Duration::from_secs(120);

/// The input being run, for the allocator and the watchdog to save when they end the process.
pub static CURRENT_PTR: AtomicUsize = AtomicUsize::new(0);
pub static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since `EPOCH` when the current input started; 0 while idle.
static STARTED_MS: AtomicU64 = AtomicU64::new(0);

/// Held by each test of the fuzz binary: inputs are timed in process CPU time, so two tests must not
/// run at once.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn findings_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings").join(target)
}

/// A finding: what happened, and where the input was saved.
#[derive(Debug)]
pub struct Finding {
    pub what: String,
    pub saved: PathBuf,
}

pub struct Report {
    pub inputs: u64,
    pub seconds: f64,
    pub slowest: Duration,
    pub findings: Vec<Finding>,
}

/// Runs `target` on mutated inputs until `max_inputs` or `budget` is reached.
pub fn fuzz(target: &Target, seed: u64, max_inputs: u64, budget: Duration) -> Report {
    start_watchdog();
    let mut rng = Rng::new(seed ^ hash(target.name.as_bytes()));
    let start = Instant::now();
    let mut report = Report { inputs: 0, seconds: 0.0, slowest: Duration::ZERO, findings: Vec::new() };
    let mut slowest_input = Vec::new();
    while report.inputs < max_inputs && start.elapsed() < budget {
        let seed_input = &target.seeds[rng.below(target.seeds.len())];
        let input = (target.mutate)(&mut rng, seed_input, &target.seeds);
        report.inputs += 1;
        let before = report.slowest;
        if let Some(f) = run_one(target, &input, &mut report.slowest) {
            report.findings.push(f);
        }
        if report.slowest > before {
            slowest_input = input;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    // Kept for a look at what takes longest (not a finding below `SLOW`).
    let dir = findings_dir(target.name);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("slowest-input.bin"), &slowest_input);
    }
    report
}

/// Runs one input; a panic or a slow run is returned as a finding (the input saved). With
/// `MIXTRAL_Q_FUZZ_TRACE=FILE` every input is first written to FILE (to catch what ends the process
/// outright, such as a stack overflow: rerun with the same seed).
pub fn run_one(target: &Target, input: &[u8], slowest: &mut Duration) -> Option<Finding> {
    if let Some(trace) = std::env::var_os("MIXTRAL_Q_FUZZ_TRACE") {
        std::fs::write(trace, input).expect("cannot write the trace file");
    }
    CURRENT_PTR.store(input.as_ptr() as usize, Ordering::SeqCst);
    CURRENT_LEN.store(input.len(), Ordering::SeqCst);
    STARTED_MS.store(now_ms().max(1), Ordering::SeqCst);
    // CPU time, not wall time: on a shared machine a starved run is not a slow input.
    let t = process_cpu_time();
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let elapsed = process_cpu_time().saturating_sub(t);
    STARTED_MS.store(0, Ordering::SeqCst);
    CURRENT_LEN.store(0, Ordering::SeqCst);
    *slowest = (*slowest).max(elapsed);
    let what = match result {
        Err(panic) => format!("panic: {}", panic_message(&panic)),
        Ok(()) if elapsed > SLOW => format!("slow: {elapsed:?}"),
        Ok(()) => return None,
    };
    let saved = save(target.name, &what, input);
    Some(Finding { what, saved })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

fn save(target: &str, what: &str, input: &[u8]) -> PathBuf {
    let dir = findings_dir(target);
    std::fs::create_dir_all(&dir).expect("cannot create the findings folder");
    let kind = what.split(':').next().unwrap_or("finding");
    let path = dir.join(format!("{kind}-{:016x}.bin", hash(input)));
    std::fs::write(&path, input).expect("cannot save a finding");
    path
}

/// CPU time used by this process (all threads: the forward pass runs on rayon's). The tests of this
/// binary hold [`SERIAL`] so that only one input runs at a time.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Ends the process when an input runs longer than `HANG`, saving it first.
fn start_watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(250));
            let started = STARTED_MS.load(Ordering::SeqCst);
            if started != 0 && now_ms().saturating_sub(started) > HANG.as_millis() as u64 {
                let (ptr, len) = (CURRENT_PTR.load(Ordering::SeqCst), CURRENT_LEN.load(Ordering::SeqCst));
                // SAFETY: the fuzz loop keeps the input alive while it runs (it is stuck in it).
                let input = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
                let saved = save("hang", "hang", input);
                eprintln!("fuzz: an input ran for more than {HANG:?}; saved as {}", saved.display());
                std::process::abort();
            }
        });
    });
}

pub fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a: stable names for saved inputs.
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// xorshift64*: deterministic for a seed, so any run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that break size arithmetic.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    3,
    7,
    8,
    31,
    32,
    255,
    256,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    u64::MAX - 7,
];

/// 1 to 4 byte-level mutations; offsets fall in `focus` (e.g. a file's header) three times in four;
/// `dictionary` entries are inserted or written over the input.
pub fn mutate_bytes(
    rng: &mut Rng,
    input: &[u8],
    others: &[Vec<u8>],
    focus: usize,
    dictionary: &[&[u8]],
) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.chance(0.75) && focus > 0 { focus.min(out.len()) } else { out.len() };
        let at = rng.below(span.max(1));
        match rng.below(10) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                let random = rng.next() as u8;
                out[i] = *rng.pick(&[0, 1, 0x7f, 0x80, 0xff, random]);
            }
            2 | 3 => {
                let width = *rng.pick(&[1usize, 2, 4, 8]);
                let v = if rng.chance(0.8) { *rng.pick(&INTERESTING) } else { rng.next() };
                let v = if rng.chance(0.3) { v.wrapping_add(rng.below(3) as u64).wrapping_sub(1) } else { v };
                let bytes = v.to_le_bytes();
                for (i, b) in bytes[..width].iter().enumerate() {
                    if let Some(slot) = out.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            4 if !out.is_empty() => {
                let end = (at + 1 + rng.below(64)).min(out.len());
                out.drain(at.min(end)..end);
            }
            5 if !dictionary.is_empty() => {
                let word = rng.pick(dictionary);
                if rng.chance(0.5) {
                    out.splice(at..at, word.iter().copied());
                } else {
                    for (i, b) in word.iter().enumerate() {
                        if let Some(slot) = out.get_mut(at + i) {
                            *slot = *b;
                        }
                    }
                }
            }
            6 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            7 if !out.is_empty() => {
                let end = (at + 1 + rng.below(256)).min(out.len());
                let chunk = out[at.min(end)..end].to_vec();
                let to = rng.below(out.len());
                out.splice(to..to, chunk);
            }
            8 => out.truncate(rng.below(out.len() + 1)),
            _ => {
                let other = rng.pick(others);
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    out.truncate(at.min(out.len()));
                    out.extend_from_slice(&other[from..]);
                }
            }
        }
    }
    out
}
