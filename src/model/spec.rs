//! The architecture as data: what each layer of a model is made of, derived from its config
//! ([`ModelConfig::layer`](super::ModelConfig::layer)), so that the forward pass is written once for
//! every layer kind instead of once per model. Attention is the same in every layer (grouped-query,
//! RoPE; its geometry is in the config); the feed-forward part is a dense SwiGLU FFN or a mixture of
//! experts.

/// One layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerSpec {
    pub ffn: FfnSpec,
}

/// The feed-forward part of a layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FfnSpec {
    /// One SwiGLU FFN `down(silu(gate x) * up x)` of this width (a dense llama layer).
    Dense { ffn_size: usize },
    /// A router and experts.
    Moe(MoeSpec),
}

/// A sparse mixture of SwiGLU experts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeSpec {
    pub n_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Width of each expert's FFN.
    pub expert_ffn_size: usize,
    /// Width of the shared experts (one SwiGLU FFN every token goes through, added to the routed
    /// experts' output with weight 1, as DeepSeek-MoE and Qwen-MoE have); `None` for Mixtral.
    pub shared_ffn_size: Option<usize>,
    pub gating: Gating,
}

/// How router logits become expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts, keep the top k; with `renormalize` their weights are divided by
    /// their sum (= a softmax over the k largest logits: Mixtral), else they stay the softmax's.
    Softmax { renormalize: bool },
}

impl Gating {
    /// Mixtral's gating.
    pub const MIXTRAL: Gating = Gating::Softmax { renormalize: true };
}
