//! NVRTC, the CUDA runtime compiler, bound by hand with `libloading`: the library is looked up in
//! more places than cudarc's loader knows (the `nvidia-cuda-nvrtc-cu12` and `nvidia-cuda-nvrtc` (CUDA 13)
//! Python wheels in particular),
//! and only the handful of entry points that compile a program to a cubin are needed.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use libloading::Library;

/// The library file names on this platform: CUDA 12 first (a CUDA 13 driver runs its cubins too), then
/// CUDA 13 (hosts with only CUDA 13), then whatever `libnvrtc.so` is. The entry points used here are the
/// same in both.
const LIB_NAMES: [&str; 3] = ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"];

/// Where the wheels put the library under site-packages: `nvidia-cuda-nvrtc-cu12`, `nvidia-cuda-nvrtc` 13.
const WHEEL_PATHS: [&str; 2] = ["nvidia/cuda_nvrtc/lib/libnvrtc.so.12", "nvidia/cu13/lib/libnvrtc.so.13"];

/// How to get NVRTC, appended to every "not found" error.
pub const INSTALL_HINT: &str = "install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` \
     (or `nvidia-cuda-nvrtc` for CUDA 13; then point MIXTRAL_Q_NVRTC at \
     site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 or site-packages/nvidia/cu13/lib/libnvrtc.so.13, \
     or MIXTRAL_Q_PYTHON at that Python)";

type Program = *mut std::ffi::c_void;

/// The loaded library and its entry points (`nvrtcResult` is an `int`, 0 = success).
pub struct Nvrtc {
    path: PathBuf,
    version: (i32, i32),
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    create_program: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile_program: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int,
    get_log_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    get_log: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    get_cubin_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    get_cubin: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    destroy_program: unsafe extern "C" fn(*mut Program) -> c_int,
    /// Keeps the function pointers above valid.
    _lib: Library,
}

impl Nvrtc {
    /// The process-wide instance, loaded on first use.
    pub fn get() -> Result<&'static Nvrtc> {
        static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
        NVRTC
            .get_or_init(|| Nvrtc::load().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn load() -> Result<Nvrtc> {
        let mut tried = Vec::new();
        for candidate in candidates() {
            // SAFETY: loading NVRTC runs its initializers, which have no preconditions.
            match unsafe { Library::new(candidate.as_os_str()) } {
                Ok(lib) => {
                    return Nvrtc::bind(lib, candidate.clone())
                        .with_context(|| format!("{} is not a usable NVRTC", candidate.display()))
                }
                Err(_) => tried.push(candidate.display().to_string()),
            }
        }
        bail!("NVRTC (libnvrtc.so.12 or .13) not found (tried {}): {INSTALL_HINT}", tried.join(", "))
    }

    fn bind(lib: Library, path: PathBuf) -> Result<Nvrtc> {
        // SAFETY: the signatures are those of nvrtc.h (the same in CUDA 12 and 13), and `_lib` outlives
        // the pointers.
        unsafe {
            let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int =
                *lib.get("nvrtcVersion")?;
            let (mut major, mut minor) = (0, 0);
            let rc = version_fn(&mut major, &mut minor);
            if rc != 0 {
                bail!("nvrtcVersion failed with code {rc}");
            }
            Ok(Nvrtc {
                path,
                version: (major, minor),
                get_error_string: *lib.get("nvrtcGetErrorString")?,
                create_program: *lib.get("nvrtcCreateProgram")?,
                compile_program: *lib.get("nvrtcCompileProgram")?,
                get_log_size: *lib.get("nvrtcGetProgramLogSize")?,
                get_log: *lib.get("nvrtcGetProgramLog")?,
                get_cubin_size: *lib.get("nvrtcGetCUBINSize")?,
                get_cubin: *lib.get("nvrtcGetCUBIN")?,
                destroy_program: *lib.get("nvrtcDestroyProgram")?,
                _lib: lib,
            })
        }
    }

    /// `(major, minor)` of the loaded NVRTC.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compiles `source` (named `name` in messages) to a cubin for `sm_{arch}` (e.g. 90). The error
    /// carries NVRTC's log, which names the line of every problem.
    pub fn compile(&self, name: &str, source: &str, arch: u32, options: &[&str]) -> Result<Vec<u8>> {
        let c_source = CString::new(source).context("kernel source contains a NUL byte")?;
        let c_name = CString::new(name).context("kernel name contains a NUL byte")?;
        let mut all_options = vec![format!("--gpu-architecture=sm_{arch}")];
        all_options.extend(options.iter().map(|o| o.to_string()));
        let c_options = all_options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the program is destroyed on every path below.
        unsafe {
            self.check(
                (self.create_program)(
                    &mut prog,
                    c_source.as_ptr(),
                    c_name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
                "nvrtcCreateProgram",
            )?;
            let result = self.compile_created(prog, &option_ptrs);
            (self.destroy_program)(&mut prog);
            result.with_context(|| {
                format!("compiling {name} for sm_{arch} with NVRTC {}.{}", self.version.0, self.version.1)
            })
        }
    }

    unsafe fn compile_created(&self, prog: Program, options: &[*const c_char]) -> Result<Vec<u8>> {
        let rc = (self.compile_program)(prog, options.len() as c_int, options.as_ptr());
        if rc != 0 {
            bail!("{}:\n{}", self.error_string(rc), self.log(prog).trim_end());
        }
        let mut size = 0usize;
        self.check((self.get_cubin_size)(prog, &mut size), "nvrtcGetCUBINSize")?;
        let mut cubin = vec![0u8; size];
        self.check((self.get_cubin)(prog, cubin.as_mut_ptr().cast()), "nvrtcGetCUBIN")?;
        Ok(cubin)
    }

    unsafe fn log(&self, prog: Program) -> String {
        let mut size = 0usize;
        if (self.get_log_size)(prog, &mut size) != 0 || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        if (self.get_log)(prog, buf.as_mut_ptr().cast()) != 0 {
            return String::new();
        }
        String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string()
    }

    unsafe fn check(&self, rc: c_int, what: &str) -> Result<()> {
        if rc != 0 {
            bail!("{what} failed: {}", self.error_string(rc));
        }
        Ok(())
    }

    unsafe fn error_string(&self, rc: c_int) -> String {
        let s = (self.get_error_string)(rc);
        if s.is_null() {
            format!("NVRTC error {rc}")
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

/// Where NVRTC may be, in order: `$MIXTRAL_Q_NVRTC` (the library or its folder), the dynamic loader's
/// own search (LD_LIBRARY_PATH, ldconfig), the CUDA toolkit's folders, then the wheel in Python's
/// site-packages (`$MIXTRAL_Q_PYTHON`, else `python3`).
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("MIXTRAL_Q_NVRTC") {
        let p = PathBuf::from(p);
        if p.is_dir() {
            out.extend(LIB_NAMES.iter().map(|n| p.join(n)));
        } else {
            out.push(p);
        }
    }
    out.extend(LIB_NAMES.iter().map(PathBuf::from));
    let mut toolkits: Vec<PathBuf> =
        ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    toolkits.push(PathBuf::from("/usr/local/cuda"));
    for root in toolkits {
        for lib in ["lib64", "lib", "targets/x86_64-linux/lib"] {
            out.extend(LIB_NAMES.iter().map(|n| root.join(lib).join(n)));
        }
    }
    for site in python_site_packages() {
        out.extend(WHEEL_PATHS.iter().map(|p| site.join(p)));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The site-packages folders of `$MIXTRAL_Q_PYTHON` (else `python3`), empty when there is no Python.
fn python_site_packages() -> Vec<PathBuf> {
    let python = std::env::var_os("MIXTRAL_Q_PYTHON").unwrap_or_else(|| "python3".into());
    let script = "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))";
    match Command::new(&python).args(["-c", script]).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}
