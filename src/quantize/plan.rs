//! Which ggml type each tensor gets, for each `--type`.
//!
//! `q4_k` follows llama.cpp's Q4_K_M where it costs nothing (attention is under 2% of Mixtral's
//! weights): Q8_0 for attn_k/attn_v of an 8-expert model, Q5_K for attn_output, Q6_K for the output
//! head; every expert matrix is Q4_K, which sets the file size (~4.5 bits per weight).

use crate::format::GgmlType;
use crate::model::names::{self, LayerTensor};

/// The `--type` of `mixtral-q quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "f16")]
    F16,
    #[value(name = "f32")]
    F32,
}

impl Target {
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Target::F32 => 0,
            Target::F16 => 1,
            Target::Q4_0 => 2,
            Target::Q8_0 => 7,
            Target::Q4K => 15, // MOSTLY_Q4_K_M
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Q4K => "q4_k",
            Target::Q4_0 => "q4_0",
            Target::Q8_0 => "q8_0",
            Target::F16 => "f16",
            Target::F32 => "f32",
        }
    }
}

/// What a GGUF tensor is, for choosing its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    TokenEmbd,
    Output,
    /// Norms: always F32.
    Norm,
    Layer(LayerTensor),
}

impl TensorRole {
    /// The role of a GGUF tensor name as `ModelConfig::gguf_tensors` spells them.
    pub fn of(name: &str) -> TensorRole {
        match name {
            names::TOKEN_EMBD => TensorRole::TokenEmbd,
            names::OUTPUT => TensorRole::Output,
            names::OUTPUT_NORM => TensorRole::Norm,
            _ => {
                let suffix = name.split('.').nth(2).unwrap_or("");
                match LayerTensor::ALL.iter().find(|t| t.suffix() == suffix) {
                    Some(LayerTensor::AttnNorm | LayerTensor::FfnNorm) | None => TensorRole::Norm,
                    Some(t) => TensorRole::Layer(*t),
                }
            }
        }
    }
}

/// The type for a tensor of `role` whose rows hold `row_len` values, in a model with `n_experts`.
pub fn tensor_type(target: Target, role: TensorRole, row_len: usize, n_experts: usize) -> GgmlType {
    use GgmlType as G;
    let wanted = match (target, role) {
        (_, TensorRole::Norm) | (_, TensorRole::Layer(LayerTensor::FfnGateInp)) => return G::F32,
        (Target::F32, _) => G::F32,
        (Target::F16, _) => G::F16,
        (Target::Q8_0, _) => G::Q8_0,
        (Target::Q4_0, TensorRole::Output) => G::Q6_K,
        (Target::Q4_0, _) => G::Q4_0,
        (Target::Q4K, TensorRole::Output) => G::Q6_K,
        (Target::Q4K, TensorRole::Layer(LayerTensor::AttnK | LayerTensor::AttnV)) if n_experts == 8 => {
            G::Q8_0
        }
        (Target::Q4K, TensorRole::Layer(LayerTensor::AttnOutput)) => G::Q5_K,
        (Target::Q4K, _) => G::Q4_K,
    };
    fit_row(wanted, row_len)
}

/// A type whose blocks divide `row_len`: K-quants fall back to a 32-block type of similar precision
/// (as llama.cpp does), 32-block types to F16.
pub fn fit_row(wanted: GgmlType, row_len: usize) -> GgmlType {
    use GgmlType as G;
    if row_len % wanted.block_len() == 0 {
        return wanted;
    }
    let fallback = match wanted {
        G::Q2_K | G::Q3_K | G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        _ => G::F16,
    };
    if row_len % fallback.block_len() == 0 {
        fallback
    } else {
        G::F16
    }
}

/// Every GGUF tensor of a `cfg` model quantized for `target`: name, ggml dims and type (what
/// `quantize` writes; `plan` sizes a model from it without the file).
pub fn tensor_types(cfg: &crate::model::ModelConfig, target: Target) -> Vec<(String, Vec<u64>, GgmlType)> {
    cfg.gguf_tensors()
        .into_iter()
        .map(|(name, dims)| {
            let ty = tensor_type(target, TensorRole::of(&name), dims[0] as usize, cfg.n_experts);
            (name, dims, ty)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_plan_for_mixtral() {
        let t = |name: &str| tensor_type(Target::Q4K, TensorRole::of(name), 4096, 8);
        assert_eq!(t("blk.0.ffn_gate_exps.weight"), GgmlType::Q4_K);
        assert_eq!(t("blk.31.ffn_down_exps.weight"), GgmlType::Q4_K);
        assert_eq!(t("blk.3.attn_q.weight"), GgmlType::Q4_K);
        assert_eq!(t("blk.3.attn_k.weight"), GgmlType::Q8_0);
        assert_eq!(t("blk.3.attn_output.weight"), GgmlType::Q5_K);
        assert_eq!(t("blk.3.ffn_gate_inp.weight"), GgmlType::F32);
        assert_eq!(t("blk.3.attn_norm.weight"), GgmlType::F32);
        assert_eq!(t("output.weight"), GgmlType::Q6_K);
        assert_eq!(t("token_embd.weight"), GgmlType::Q4_K);
    }

    #[test]
    fn rows_that_blocks_do_not_divide_fall_back() {
        assert_eq!(fit_row(GgmlType::Q4_K, 224), GgmlType::Q5_0);
        assert_eq!(fit_row(GgmlType::Q6_K, 128), GgmlType::Q8_0);
        assert_eq!(fit_row(GgmlType::Q5_K, 96), GgmlType::Q5_1);
        assert_eq!(fit_row(GgmlType::Q4_0, 100), GgmlType::F16);
        assert_eq!(fit_row(GgmlType::Q4_K, 100), GgmlType::F16);
        assert_eq!(fit_row(GgmlType::F32, 7), GgmlType::F32);
    }
}
