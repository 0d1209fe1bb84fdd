//! Every CUDA kernel file compiles with NVRTC for every supported architecture. Needs NVRTC but no GPU:
//! it runs in CI, where `.ci/run` installs the `nvidia-cuda-nvrtc-cu12` wheel. Without NVRTC it fails.

use mixtral_q::engine::cuda::kernels;
use mixtral_q::engine::cuda::nvrtc::Nvrtc;

const ARCHS: [u32; 5] = [75, 80, 86, 89, 90];

fn nvrtc() -> &'static Nvrtc {
    match Nvrtc::get() {
        Ok(n) => n,
        Err(e) => {
            panic!("{e:#}\nRun `bash .ci/run` (it installs NVRTC into .venv and sets MIXTRAL_Q_PYTHON).")
        }
    }
}

#[test]
fn every_kernel_compiles_for_every_architecture() {
    let nvrtc = nvrtc();
    eprintln!("NVRTC {:?} from {}", nvrtc.version(), nvrtc.path().display());
    // One thread per architecture: NVRTC is thread-safe and each compile takes seconds.
    std::thread::scope(|s| {
        for arch in ARCHS {
            s.spawn(move || {
                for (name, source) in kernels::SOURCES {
                    let cubin = kernels::compile(name, source, arch).unwrap_or_else(|e| panic!("{e:#}"));
                    // An ELF image (cubin), not PTX text.
                    assert_eq!(&cubin[..4], b"\x7fELF", "{name} sm_{arch}");
                    assert!(cubin.len() > 1000, "{name} sm_{arch}: {} bytes", cubin.len());
                }
            });
        }
    });
}

#[test]
fn compiled_kernels_contain_every_entry_point() {
    nvrtc();
    for (name, source) in kernels::SOURCES {
        let cubin = kernels::compile(name, source, 80).unwrap();
        for kernel in kernels::kernel_names(name) {
            // Entry points are extern "C", so their names appear verbatim in the ELF symbol table.
            let needle = format!("\0{kernel}\0");
            assert!(
                cubin.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{kernel} missing from {name}"
            );
        }
    }
}

#[test]
fn the_disk_cache_returns_what_was_compiled_and_compile_errors_name_the_line() {
    nvrtc();
    let dir = tempfile::tempdir().unwrap();
    // SAFETY (of set_var): no other thread of this test binary reads MIXTRAL_Q_CACHE.
    unsafe { std::env::set_var("MIXTRAL_Q_CACHE", dir.path()) };
    assert_eq!(kernels::cache_dir().unwrap(), dir.path().join("kernels"));
    let (name, source) = kernels::SOURCES[2];
    let first = kernels::cubin(name, source, 86).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path().join("kernels")).unwrap().collect();
    assert_eq!(files.len(), 1);
    let path = files[0].as_ref().unwrap().path();
    assert!(path.file_name().unwrap().to_string_lossy().contains("sm_86"));
    // A second call reads the file: prove it by planting different bytes there.
    std::fs::write(&path, b"cached").unwrap();
    assert_eq!(kernels::cubin(name, source, 86).unwrap(), b"cached");
    assert_ne!(first, b"cached");
    let err = kernels::compile("broken.cu", "extern \"C\" __global__ void k() { undefined_thing(); }", 80)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("undefined_thing") && msg.contains("sm_80"), "{msg}");
}
