//! The CUDA kernels: sources embedded in the binary, compiled at run time by NVRTC for the GPU present
//! and cached on disk, so that neither building nor running mixtral-q needs the CUDA toolkit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use super::nvrtc::Nvrtc;
use crate::format::GgmlType;

/// Types, f16 conversions and the ggml block decoders, shared by every kernel file.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Warps per matrix-vector block (matvec.cu); each warp computes `MATVEC_ROWS_PER_WARP` rows.
pub const MATVEC_WARPS: usize = 8;
pub const MATVEC_ROWS_PER_WARP: usize = 2;
/// The tile of matmul.cu: `MATMUL_BM` weight rows by `MATMUL_BN` tokens (4 warps, 2x2 over the tile).
pub const MATMUL_BM: usize = 64;
pub const MATMUL_BN: usize = 64;
pub const MATMUL_WARPS: usize = 4;
/// Warps per attention block (attention.cu).
pub const ATT_WARPS: usize = 4;
/// Upper bound on the experts the router kernel handles (ops.cu keeps one probability per expert in
/// registers, and the chosen set in a 64-bit mask).
pub const MAX_EXPERTS: usize = 64;

/// The constants above and the weight-type list as C macros: the one source of truth for what the
/// kernels are compiled with and what the launch wrappers assume.
pub fn constants_header() -> String {
    let mut h = String::from("// Generated from src/engine/cuda/kernels.rs: do not edit.\n");
    for (name, value) in [
        ("MATVEC_WARPS", MATVEC_WARPS),
        ("MATVEC_ROWS_PER_WARP", MATVEC_ROWS_PER_WARP),
        ("MATMUL_BM", MATMUL_BM),
        ("MATMUL_BN", MATMUL_BN),
        ("ATT_WARPS", ATT_WARPS),
        ("MAX_EXPERTS", MAX_EXPERTS),
    ] {
        let _ = writeln!(h, "#define {name} {value}");
    }
    h.push_str("#define FOR_EACH_WEIGHT_TYPE(MACRO)");
    for suffix in crate::model::weights::SUPPORTED_TYPES.iter().filter_map(|&t| type_suffix(t)) {
        // The block decoder of common.cuh for suffix `q4_k` is `TQ4_K`.
        let _ = write!(h, " \\\n    MACRO(T{}, {suffix})", suffix.to_uppercase());
    }
    h.push('\n');
    h
}

/// Prepended to every kernel file: the generated constants, then common.cuh.
pub fn prelude() -> &'static str {
    static PRELUDE: OnceLock<String> = OnceLock::new();
    PRELUDE.get_or_init(|| format!("{}{COMMON}", constants_header()))
}

/// Every kernel file: (name, source without the prelude).
pub const SOURCES: [(&str, &str); 4] = [
    ("matvec.cu", include_str!("../../../kernels/matvec.cu")),
    ("matmul.cu", include_str!("../../../kernels/matmul.cu")),
    ("ops.cu", include_str!("../../../kernels/ops.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
];

/// The architectures mixtral-q supports (`sm_75`, Turing, and newer: `mma.sync` m16n8k8 needs sm_75).
pub const MIN_ARCH: u32 = 75;

/// NVRTC options for every kernel. No fast-math: results are compared with the CPU engine.
const OPTIONS: [&str; 1] = ["--std=c++17"];

/// The full source NVRTC compiles for file `name` (the prelude, then the file).
pub fn full_source(source: &str) -> String {
    format!("{}\n{source}", prelude())
}

/// Compiles one kernel file for `sm_{arch}` (no cache).
pub fn compile(name: &str, source: &str, arch: u32) -> Result<Vec<u8>> {
    Nvrtc::get()?.compile(name, &full_source(source), arch, &OPTIONS)
}

/// The cubin of kernel file `name` for `sm_{arch}`: from the disk cache when the same source was
/// compiled for the same architecture by the same NVRTC, else compiled and stored there. A cache that
/// cannot be written is not an error (the kernels are just compiled again next time).
pub fn cubin(name: &str, source: &str, arch: u32) -> Result<Vec<u8>> {
    let nvrtc = Nvrtc::get()?;
    let key = cache_key(source, arch, nvrtc.version());
    let dir = cache_dir();
    let path =
        dir.as_ref().map(|d| d.join(format!("{}-sm_{arch}-{key:016x}.cubin", name.trim_end_matches(".cu"))));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let bytes = compile(name, source, arch)?;
    if let (Some(dir), Some(path)) = (&dir, &path) {
        let _ = store(dir, path, &bytes);
    }
    Ok(bytes)
}

/// Writes atomically (temporary file, then rename), so that a concurrent reader never sees half a cubin.
fn store(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.persist(path).with_context(|| format!("storing {}", path.display()))?;
    Ok(())
}

/// `kernels/` in the cache folder ([`crate::cache::cache_dir`]).
pub fn cache_dir() -> Option<PathBuf> {
    crate::cache::cache_dir().ok().map(|d| d.join("kernels"))
}

/// FNV-1a (64 bits) of everything that determines the cubin: the full source, the options, the
/// architecture and the NVRTC version. Stable across Rust releases, unlike `DefaultHasher`.
pub fn cache_key(source: &str, arch: u32, nvrtc_version: (i32, i32)) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let parts = [prelude(), source, &OPTIONS.join(" "), &format!("sm_{arch} nvrtc {nvrtc_version:?}")];
    for part in parts {
        for &b in part.as_bytes().iter().chain(&[0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// The kernel names of each kernel file (the per-type ones with their suffix).
pub fn kernel_names(file: &str) -> Vec<String> {
    let per_type = |prefix: &str| -> Vec<String> {
        crate::model::weights::SUPPORTED_TYPES
            .iter()
            .filter_map(|&t| type_suffix(t))
            .map(|s| format!("{prefix}_{s}"))
            .collect()
    };
    match file {
        "matvec.cu" => [per_type("matvec"), per_type("matvec_experts")].concat(),
        "matmul.cu" => per_type("matmul"),
        "ops.cu" => {
            let fixed = [
                "rms_norm",
                "rope",
                "swiglu",
                "add_in_place",
                "route_top_k",
                "moe_combine",
                "scatter_add",
                "kv_store",
            ];
            [fixed.iter().map(|s| s.to_string()).collect(), per_type("embed")].concat()
        }
        "attention.cu" => {
            let partial = ATTENTION_GROUPS
                .iter()
                .flat_map(|g| ATTENTION_HEAD_DIMS.iter().map(move |d| attention_partial_name(*g, *d)));
            partial.chain(["attention_merge".to_string()]).collect()
        }
        _ => Vec::new(),
    }
}

/// Query heads per KV head that attention.cu has kernels for (a smaller group uses the next size up).
pub const ATTENTION_GROUPS: [usize; 4] = [1, 2, 4, 8];
/// Head sizes attention.cu has kernels for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];

/// The attention kernel for `group` query heads per KV head (rounded up to an instantiated size).
pub fn attention_partial_name(group: usize, head_dim: usize) -> String {
    let g = ATTENTION_GROUPS.iter().copied().find(|&g| g >= group).unwrap_or(group);
    format!("attention_partial_g{g}_d{head_dim}")
}

/// Kernel-name suffix of a weight type (`matvec_q4_k`, ...), as in `FOR_EACH_WEIGHT_TYPE` of common.cuh.
pub fn type_suffix(ty: GgmlType) -> Option<&'static str> {
    ty.info().cuda_suffix
}

/// Values per kernel block of a weight type (`BLOCK` in common.cuh): rows must be whole blocks.
pub fn kernel_block_len(ty: GgmlType) -> usize {
    ty.info().cuda_block_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_source_arch_and_version() {
        let k = cache_key("a", 80, (12, 9));
        assert_eq!(k, cache_key("a", 80, (12, 9)));
        assert_ne!(k, cache_key("b", 80, (12, 9)));
        assert_ne!(k, cache_key("a", 86, (12, 9)));
        assert_ne!(k, cache_key("a", 80, (12, 8)));
    }

    #[test]
    fn the_generated_type_list_names_decoders_of_common_cuh() {
        let header = constants_header();
        for ty in crate::model::weights::SUPPORTED_TYPES {
            let suffix = type_suffix(ty).unwrap();
            let decoder = format!("T{}", suffix.to_uppercase());
            assert!(COMMON.contains(&format!("struct {decoder} {{")), "{ty}: no {decoder} in common.cuh");
            assert!(header.contains(&format!("MACRO({decoder}, {suffix})")), "{header}");
        }
        assert!(header.contains(&format!("#define MAX_EXPERTS {MAX_EXPERTS}\n")), "{header}");
    }

    #[test]
    fn every_supported_type_has_kernels() {
        for ty in crate::model::weights::SUPPORTED_TYPES {
            assert!(type_suffix(ty).is_some(), "{ty}");
        }
    }
}
