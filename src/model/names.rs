//! Tensor names in GGUF (llama.cpp's converter) and in Hugging Face checkpoints.

pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";
pub const OUTPUT: &str = "output.weight";

/// The per-layer tensors of a Mixtral block, as GGUF names them (`blk.N.<suffix>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnNorm,
    /// The router: `[n_experts, hidden]`.
    FfnGateInp,
    /// w1 of all experts, stacked expert-major.
    FfnGateExps,
    /// w3 of all experts.
    FfnUpExps,
    /// w2 of all experts.
    FfnDownExps,
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 10] = [
        LayerTensor::AttnNorm,
        LayerTensor::AttnQ,
        LayerTensor::AttnK,
        LayerTensor::AttnV,
        LayerTensor::AttnOutput,
        LayerTensor::FfnNorm,
        LayerTensor::FfnGateInp,
        LayerTensor::FfnGateExps,
        LayerTensor::FfnUpExps,
        LayerTensor::FfnDownExps,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            LayerTensor::AttnNorm => "attn_norm",
            LayerTensor::AttnQ => "attn_q",
            LayerTensor::AttnK => "attn_k",
            LayerTensor::AttnV => "attn_v",
            LayerTensor::AttnOutput => "attn_output",
            LayerTensor::FfnNorm => "ffn_norm",
            LayerTensor::FfnGateInp => "ffn_gate_inp",
            LayerTensor::FfnGateExps => "ffn_gate_exps",
            LayerTensor::FfnUpExps => "ffn_up_exps",
            LayerTensor::FfnDownExps => "ffn_down_exps",
        }
    }

    /// GGUF name, e.g. `blk.3.attn_q.weight`.
    pub fn gguf_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.suffix())
    }

    /// For the merged expert tensors: the name of one expert's slice in the older per-expert
    /// layout (`blk.N.ffn_gate.E.weight`), as 2023 conversions store it.
    pub fn per_expert_gguf_name(self, layer: usize, expert: usize) -> Option<String> {
        let base = match self {
            LayerTensor::FfnGateExps => "ffn_gate",
            LayerTensor::FfnUpExps => "ffn_up",
            LayerTensor::FfnDownExps => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{base}.{expert}.weight"))
    }

    pub fn is_expert(self) -> bool {
        matches!(self, LayerTensor::FfnGateExps | LayerTensor::FfnUpExps | LayerTensor::FfnDownExps)
    }

    /// Hugging Face name of this tensor (for experts: of expert `expert`).
    pub fn hf_name(self, layer: usize, expert: usize) -> String {
        let p = format!("model.layers.{layer}");
        match self {
            LayerTensor::AttnNorm => format!("{p}.input_layernorm.weight"),
            LayerTensor::AttnQ => format!("{p}.self_attn.q_proj.weight"),
            LayerTensor::AttnK => format!("{p}.self_attn.k_proj.weight"),
            LayerTensor::AttnV => format!("{p}.self_attn.v_proj.weight"),
            LayerTensor::AttnOutput => format!("{p}.self_attn.o_proj.weight"),
            LayerTensor::FfnNorm => format!("{p}.post_attention_layernorm.weight"),
            LayerTensor::FfnGateInp => format!("{p}.block_sparse_moe.gate.weight"),
            LayerTensor::FfnGateExps => format!("{p}.block_sparse_moe.experts.{expert}.w1.weight"),
            LayerTensor::FfnUpExps => format!("{p}.block_sparse_moe.experts.{expert}.w3.weight"),
            LayerTensor::FfnDownExps => format!("{p}.block_sparse_moe.experts.{expert}.w2.weight"),
        }
    }
}

/// The layer and tensor of a GGUF layer tensor name (`blk.3.attn_q.weight` → 3, AttnQ).
pub fn split_layer_tensor(name: &str) -> Option<(usize, LayerTensor)> {
    let mut parts = name.strip_prefix("blk.")?.strip_suffix(".weight")?.splitn(2, '.');
    let layer = parts.next()?.parse().ok()?;
    let suffix = parts.next()?;
    LayerTensor::ALL.into_iter().find(|t| t.suffix() == suffix).map(|t| (layer, t))
}

/// The layer, tensor and expert of a per-expert GGUF name (`blk.3.ffn_gate.5.weight` → 3,
/// FfnGateExps, 5): the older layout's names, which the quantizer also uses to name one expert's slab
/// of a merged tensor.
pub fn split_per_expert(name: &str) -> Option<(usize, LayerTensor, usize)> {
    let parts: Vec<&str> = name.strip_prefix("blk.")?.strip_suffix(".weight")?.split('.').collect();
    let [layer, _, expert] = parts[..] else { return None };
    let (layer, expert) = (layer.parse().ok()?, expert.parse().ok()?);
    // Formatting the candidate back rejects non-canonical spellings such as `blk.03`.
    LayerTensor::ALL
        .into_iter()
        .find(|t| t.per_expert_gguf_name(layer, expert).as_deref() == Some(name))
        .map(|t| (layer, t, expert))
}

pub const HF_TOKEN_EMBD: &str = "model.embed_tokens.weight";
pub const HF_OUTPUT_NORM: &str = "model.norm.weight";
pub const HF_OUTPUT: &str = "lm_head.weight";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_expert_names_round_trip() {
        for t in LayerTensor::ALL.into_iter().filter(|t| t.is_expert()) {
            let name = t.per_expert_gguf_name(7, 3).unwrap();
            assert_eq!(split_per_expert(&name), Some((7, t, 3)), "{name}");
        }
        for name in ["blk.7.ffn_gate_exps.weight", "blk.07.ffn_gate.3.weight", "blk.7.attn_q.3.weight", "x"] {
            assert_eq!(split_per_expert(name), None, "{name}");
        }
    }
}
