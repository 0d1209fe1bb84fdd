//! The ggml tensor types: one descriptor per type ([`TypeInfo`]) holds everything the rest of the
//! crate asks about a type — GGUF id, name, block geometry, which activations its dot products take
//! and the suffix of its CUDA kernels. Adding a type means adding its row to [`ggml_types!`] below,
//! plus its codec (`format::codec`) and kernels (`engine::cpu::dot`, `kernels/`); every other table
//! (the types the engines run, the CUDA kernel names, the file-type report) is derived from here.

use std::mem::size_of;

use anyhow::{bail, Result};

use crate::format::codec::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K,
    BlockQ8_0, BlockQ8_1, QK_K,
};

/// Values per block of the 32-value types (ggml's `QK4_0`, `QK8_0`, ...).
const QK: usize = 32;

/// What a dot product with weights of a type multiplies them with (ggml's `vec_dot_type`): the
/// engines quantize each activation row once into this form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    /// Plain f32 (float weights).
    F32,
    /// 8-bit blocks of 32 values (for the 32-value types).
    Q8_0,
    /// 8-bit blocks of 256 values with 16-value sums (for the K-quants).
    Q8K,
}

/// Everything about one ggml type.
#[derive(Clone, Copy, Debug)]
pub struct TypeInfo {
    pub ty: GgmlType,
    /// Lower-case name as llama.cpp prints it ("q4_K", "f32", ...).
    pub name: &'static str,
    /// Values per block.
    pub block_len: usize,
    /// Bytes per block: the size of the codec's `#[repr(C)]` block struct.
    pub block_bytes: usize,
    /// The activations the engines' dot products take; `None`: the engines cannot compute with it
    /// (the file may still hold it: `info` reports it, loading a model that needs it fails).
    pub activations: Option<ActivationKind>,
    /// Suffix of the type's CUDA kernels (`matvec_q4_k`), as in `FOR_EACH_WEIGHT_TYPE` of common.cuh.
    pub cuda_suffix: Option<&'static str>,
    /// Values one CUDA kernel step decodes (`BLOCK` in common.cuh): rows must be whole steps.
    pub cuda_block_len: usize,
}

/// Defines [`GgmlType`] (discriminants = GGUF ids) and its descriptor table from one row per type:
/// `Variant = id, "name", block_len, block struct, activations, CUDA suffix, CUDA block length;`.
macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, $len:expr, $block:ty, $acts:expr, $cuda:expr, $cuda_len:expr;)+) => {
        /// A ggml tensor type. Discriminants are the ids stored in GGUF tensor infos.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $($variant = $id,)+
        }

        /// The descriptors, in the order of [`GgmlType::ALL`].
        const TYPES: &[TypeInfo] = &[$(TypeInfo {
            ty: GgmlType::$variant,
            name: $name,
            block_len: $len,
            block_bytes: size_of::<$block>(),
            activations: $acts,
            cuda_suffix: $cuda,
            cuda_block_len: $cuda_len,
        },)+];
    };
}

use ActivationKind as A;

ggml_types! {
    F32 = 0,   "f32",  1,    f32,       Some(A::F32),  Some("f32"),  4;
    F16 = 1,   "f16",  1,    u16,       Some(A::F32),  Some("f16"),  8;
    Q4_0 = 2,  "q4_0", QK,   BlockQ4_0, Some(A::Q8_0), Some("q4_0"), QK;
    Q4_1 = 3,  "q4_1", QK,   BlockQ4_1, Some(A::Q8_0), Some("q4_1"), QK;
    Q5_0 = 6,  "q5_0", QK,   BlockQ5_0, Some(A::Q8_0), Some("q5_0"), QK;
    Q5_1 = 7,  "q5_1", QK,   BlockQ5_1, Some(A::Q8_0), Some("q5_1"), QK;
    Q8_0 = 8,  "q8_0", QK,   BlockQ8_0, Some(A::Q8_0), Some("q8_0"), QK;
    Q8_1 = 9,  "q8_1", QK,   BlockQ8_1, None,          None,         QK;
    Q2_K = 10, "q2_K", QK_K, BlockQ2K,  Some(A::Q8K),  Some("q2_k"), QK_K;
    Q3_K = 11, "q3_K", QK_K, BlockQ3K,  Some(A::Q8K),  Some("q3_k"), QK_K;
    Q4_K = 12, "q4_K", QK_K, BlockQ4K,  Some(A::Q8K),  Some("q4_k"), QK_K;
    Q5_K = 13, "q5_K", QK_K, BlockQ5K,  Some(A::Q8K),  Some("q5_k"), QK_K;
    Q6_K = 14, "q6_K", QK_K, BlockQ6K,  Some(A::Q8K),  Some("q6_k"), QK_K;
    Q8_K = 15, "q8_K", QK_K, BlockQ8K,  None,          None,         QK_K;
    BF16 = 30, "bf16", 1,    u16,       Some(A::F32),  Some("bf16"), 8;
}

impl GgmlType {
    /// Every type, in descriptor order.
    pub const ALL: [GgmlType; TYPES.len()] = {
        let mut all = [GgmlType::F32; TYPES.len()];
        let mut i = 0;
        while i < TYPES.len() {
            all[i] = TYPES[i].ty;
            i += 1;
        }
        all
    };

    /// The types the engines compute with (those with an [`ActivationKind`]).
    pub const COMPUTABLE: [GgmlType; count_computable()] = {
        let mut out = [GgmlType::F32; count_computable()];
        let (mut i, mut n) = (0, 0);
        while i < TYPES.len() {
            if TYPES[i].activations.is_some() {
                out[n] = TYPES[i].ty;
                n += 1;
            }
            i += 1;
        }
        out
    };

    /// This type's descriptor.
    pub const fn info(self) -> &'static TypeInfo {
        let mut i = 0;
        while i < TYPES.len() {
            if TYPES[i].ty as u32 == self as u32 {
                return &TYPES[i];
            }
            i += 1;
        }
        panic!("every GgmlType has a descriptor")
    }

    /// The type with GGUF id `id`; an error names ids we do not know (IQ types, for instance).
    pub fn from_id(id: u32) -> Result<GgmlType> {
        match TYPES.iter().find(|t| t.ty as u32 == id) {
            Some(t) => Ok(t.ty),
            None => bail!("unsupported ggml tensor type id {id}"),
        }
    }

    pub const fn id(self) -> u32 {
        self as u32
    }

    /// Values per block.
    pub const fn block_len(self) -> usize {
        self.info().block_len
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        self.info().block_bytes
    }

    /// Whether values are stored in blocks with scales (ggml's `ggml_is_quantized`): everything but
    /// F32, F16 and BF16.
    pub const fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes taken by `n` values; `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_len()).then(|| n / self.block_len() * self.block_bytes())
    }

    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }

    /// Lower-case name as llama.cpp prints it ("q4_K", "f32", ...).
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The activations the engines multiply this type with, or None when they cannot.
    pub fn activations(self) -> Option<ActivationKind> {
        self.info().activations
    }
}

const fn count_computable() -> usize {
    let (mut i, mut n) = (0, 0);
    while i < TYPES.len() {
        if TYPES[i].activations.is_some() {
            n += 1;
        }
        i += 1;
    }
    n
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_fail() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
            assert_eq!(t.info().ty, t);
        }
        assert!(GgmlType::from_id(16).is_err()); // IQ2_XXS
        assert!(GgmlType::from_id(u32::MAX).is_err());
    }

    #[test]
    fn sizes_match_ggml_common() {
        assert_eq!(GgmlType::Q4_K.bytes_for(4096), Some(16 * 144));
        assert_eq!(GgmlType::Q4_0.bytes_for(64), Some(36));
        assert_eq!(GgmlType::Q4_K.bytes_for(224), None);
        assert!((GgmlType::Q4_K.bits_per_weight() - 4.5).abs() < 1e-12);
        let bytes = |t: GgmlType| t.block_bytes();
        assert_eq!(GgmlType::ALL.map(bytes), [4, 2, 18, 20, 22, 24, 34, 36, 84, 110, 144, 176, 210, 292, 2]);
    }

    #[test]
    fn computable_types_have_cuda_kernels_that_divide_their_blocks() {
        assert_eq!(GgmlType::COMPUTABLE.len(), 13);
        for t in GgmlType::ALL {
            let info = t.info();
            assert_eq!(info.activations.is_some(), info.cuda_suffix.is_some(), "{t}");
            assert!(info.cuda_block_len.is_multiple_of(info.block_len), "{t}");
            assert_eq!(GgmlType::COMPUTABLE.contains(&t), info.activations.is_some());
        }
    }
}
