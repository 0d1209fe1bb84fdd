//! Builds the CPU emulator of the kernels: each kernel file as NVRTC gets it (`kernels::prelude()` and
//! `kernels::SOURCES`, the text embedded in the binary) compiled as C++ by g++ against
//! kernels/emulator/cuda.h, with kernels/emulator/scheduler.cpp, into one shared library that
//! registers every kernel `kernels::kernel_names` lists. AddressSanitizer and UBSan are on unless
//! `MIXTRAL_Q_EMULATOR_SANITIZE=0`. The library is cached under the target directory by a hash of
//! everything that goes into it, so only the first test run after a change compiles (~10-20 s).

use std::path::{Path, PathBuf};
use std::process::Command;

use mixtral_q::engine::cuda::kernels;

/// One translation unit: a file name and its kernel source without the prelude.
pub struct Unit {
    pub name: String,
    pub source: String,
    pub kernels: Vec<String>,
}

/// The kernel files of the engine.
pub fn engine_units() -> Vec<Unit> {
    kernels::SOURCES
        .iter()
        .map(|(name, source)| Unit {
            name: name.to_string(),
            source: source.to_string(),
            kernels: kernels::kernel_names(name),
        })
        .collect()
}

pub fn sanitized() -> bool {
    std::env::var("MIXTRAL_Q_EMULATOR_SANITIZE").map_or(true, |v| v != "0")
}

/// Flags of every object; `sanitize` adds the sanitizers (the kernels' objects and the link).
fn flags(sanitize: bool) -> Vec<&'static str> {
    let mut f = vec![
        "-std=c++17",
        "-O2",
        "-g",
        "-fPIC",
        "-fno-omit-frame-pointer",
        // No FMA contraction, no fast math: the same rounding on every machine.
        "-ffp-contract=off",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Werror",
    ];
    if sanitize {
        f.extend(["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]);
    }
    f
}

/// Flags of the scheduler: not instrumented (it is not under test, and its inner loops are the
/// emulator's hot path), but told that the kernels are, so that it announces its stack switches to ASan.
fn scheduler_flags() -> Vec<&'static str> {
    let mut f = flags(false);
    if sanitized() {
        f.push("-DEMU_ASAN=1");
    }
    f
}

fn emulator_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels/emulator")
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".to_string())
}

/// The library for `units` (built now or found in the cache): its path.
pub fn build(tag: &str, units: &[Unit]) -> PathBuf {
    let header = emulator_dir().join("cuda.h");
    let scheduler = emulator_dir().join("scheduler.cpp");
    let version = Command::new(compiler()).arg("--version").output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): the CUDA kernels' CPU emulator needs g++ (`.ci/run` installs it)",
            compiler()
        )
    });
    let generated: Vec<(String, String)> =
        units.iter().map(|u| (u.name.replace(".cu", ".cpp"), translation_unit(u))).collect();
    let mut key = Fnv::new();
    for part in [std::fs::read(&header).unwrap(), std::fs::read(&scheduler).unwrap(), version.stdout] {
        key.add(&part);
    }
    key.add(flags(sanitized()).join(" ").as_bytes());
    key.add(scheduler_flags().join(" ").as_bytes());
    for (name, text) in &generated {
        key.add(name.as_bytes());
        key.add(text.as_bytes());
    }
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emulator");
    let dir = root.join(format!("{tag}-{:016x}", key.0));
    let lib = dir.join("libkernels.so");
    if lib.exists() {
        return lib;
    }
    std::fs::create_dir_all(&root).unwrap();
    let tmp = tempfile::tempdir_in(&root).unwrap();
    let started = std::time::Instant::now();
    let mut objects = vec![tmp.path().join("scheduler.o")];
    let mut jobs = vec![(scheduler.clone(), objects[0].clone(), scheduler_flags())];
    for (name, text) in &generated {
        let src = tmp.path().join(name);
        std::fs::write(&src, text).unwrap();
        let obj = src.with_extension("o");
        objects.push(obj.clone());
        jobs.push((src, obj, flags(sanitized())));
    }
    std::thread::scope(|s| {
        let handles: Vec<_> =
            jobs.iter().map(|(src, obj, flags)| s.spawn(|| compile(&header, src, obj, flags))).collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    let mut link = Command::new(compiler());
    link.args(flags(sanitized()))
        .arg("-shared")
        .arg("-o")
        .arg(tmp.path().join("libkernels.so"))
        .args(&objects);
    run(link, "linking the emulator");
    eprintln!("built the kernel emulator ({tag}) in {:.1} s", started.elapsed().as_secs_f64());
    // Another test process may have built the same library meanwhile: either copy will do.
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(lib.exists(), "{} missing after the build", lib.display());
    lib
}

fn compile(header: &Path, src: &Path, obj: &Path, flags: &[&str]) {
    let mut cmd = Command::new(compiler());
    cmd.args(flags)
        .arg("-I")
        .arg(emulator_dir())
        .arg("-include")
        .arg(header)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj);
    run(cmd, &format!("compiling {}", src.display()));
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The C++ the emulator compiles for one kernel file: prelude and source with `#line` markers (so that
/// sanitizer reports and error messages name kernels/*.cu lines), `__shared__` declarations turned into
/// per-block allocations, and one registration per kernel name.
pub fn translation_unit(u: &Unit) -> String {
    let mut out = String::new();
    out.push_str("#line 1 \"kernels/common.cuh\"\n");
    out.push_str(&rewrite_shared(kernels::prelude(), "common.cuh"));
    out.push_str(&format!("\n#line 1 \"kernels/{}\"\n", u.name));
    out.push_str(&rewrite_shared(&u.source, &u.name));
    out.push('\n');
    for k in &u.kernels {
        out.push_str(&format!("EMU_REGISTER_KERNEL({k})\n"));
    }
    out
}

/// `__shared__ T name[N]...;` → `auto& name = emu::shared<T[N]..., __COUNTER__>();` and
/// `extern __shared__ T name[];` → `T* const name = emu::dynamic_shared<T>();`, each on its own line
/// (see kernels/emulator/cuda.h). Any other use of `__shared__` outside a comment is an error.
pub fn rewrite_shared(source: &str, file: &str) -> String {
    source
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let code = line.split("//").next().unwrap_or("");
            if !code.contains("__shared__") {
                return line.to_string();
            }
            let indent = &line[..line.len() - line.trim_start().len()];
            let decl = code.trim();
            let fail =
                || panic!("kernels/{file}:{}: cannot emulate this __shared__ declaration: {line}", i + 1);
            let Some(decl) = decl.strip_suffix(';') else { fail() };
            let (is_extern, rest) =
                match (decl.strip_prefix("extern __shared__ "), decl.strip_prefix("__shared__ ")) {
                    (Some(r), _) => (true, r),
                    (None, Some(r)) => (false, r),
                    (None, None) => fail(),
                };
            // `T name[dims]`: the name is the last identifier before the first '['.
            let (head, dims) = rest.split_at(rest.find('[').unwrap_or(rest.len()));
            let head = head.trim_end();
            let name_start = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |p| p + 1);
            let (ty, name) = (head[..name_start].trim(), &head[name_start..]);
            if ty.is_empty() || name.is_empty() {
                fail();
            }
            if is_extern {
                if dims != "[]" {
                    fail();
                }
                format!("{indent}{ty}* const {name} = emu::dynamic_shared<{ty}>();")
            } else {
                format!("{indent}auto& {name} = emu::shared<{ty}{dims}, __COUNTER__>();")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// FNV-1a, 64 bits, over parts separated by a zero byte.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }

    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().chain(&[0u8]) {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
}
