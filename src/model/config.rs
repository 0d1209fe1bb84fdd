//! Model hyperparameters: read from a Hugging Face `config.json` or from GGUF metadata, the layer
//! specs derived from them (the architecture as data, see [`super::spec`]) and the shapes of every
//! tensor (the one place shapes are defined).

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::names::{self, LayerTensor};
use super::spec::{FfnSpec, Gating, LayerSpec, MoeSpec};
use crate::format::gguf::Metadata;

/// Hyperparameters of a llama-family model: Mixtral, and the layer kinds of [`super::spec`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    /// Model width (4096 for Mixtral-8x7B).
    pub hidden_size: usize,
    /// Hidden size of one expert's FFN (14336), or of every layer's FFN when `n_experts` is 0.
    pub ffn_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Experts per MoE layer; 0: a dense model (every layer one FFN of `ffn_size`).
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    /// The first this many layers have a dense FFN of `dense_ffn_size` (llama.cpp's
    /// `leading_dense_block_count`, as in DeepSeek-MoE); 0 for Mixtral.
    pub n_leading_dense: usize,
    pub dense_ffn_size: usize,
    /// Width of the shared experts of every MoE layer (0: none, as in Mixtral).
    pub shared_ffn_size: usize,
    pub gating: Gating,
}

impl ModelConfig {
    /// Mixtral-8x7B's shapes with `n_layers` layers (for `synth`).
    pub fn mixtral_8x7b(n_layers: usize) -> ModelConfig {
        ModelConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            ffn_size: 14336,
            n_layers,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            n_experts: 8,
            n_experts_used: 2,
            context_length: 32768,
            rope_theta: 1e6,
            rms_norm_eps: 1e-5,
            n_leading_dense: 0,
            dense_ffn_size: 14336,
            shared_ffn_size: 0,
            gating: Gating::MIXTRAL,
        }
    }

    /// Mixtral-8x22B's shapes with `n_layers` layers (the real model has 56): 48 query heads per 8
    /// KV heads, FFN 16384, vocabulary 32768, context 65536.
    pub fn mixtral_8x22b(n_layers: usize) -> ModelConfig {
        ModelConfig {
            vocab_size: 32768,
            hidden_size: 6144,
            ffn_size: 16384,
            n_heads: 48,
            n_kv_heads: 8,
            head_dim: 128,
            context_length: 65536,
            dense_ffn_size: 16384,
            ..ModelConfig::mixtral_8x7b(n_layers)
        }
    }

    /// What layer `l` is made of.
    pub fn layer(&self, l: usize) -> LayerSpec {
        let ffn = if self.n_experts == 0 {
            FfnSpec::Dense { ffn_size: self.ffn_size }
        } else if l < self.n_leading_dense {
            FfnSpec::Dense { ffn_size: self.dense_ffn_size }
        } else {
            FfnSpec::Moe(MoeSpec {
                n_experts: self.n_experts,
                top_k: self.n_experts_used,
                expert_ffn_size: self.ffn_size,
                shared_ffn_size: (self.shared_ffn_size > 0).then_some(self.shared_ffn_size),
                gating: self.gating,
            })
        };
        LayerSpec { ffn }
    }

    /// Whether every layer is a Mixtral layer (a routed MoE with softmax top-k renormalized, no shared
    /// experts): what the weight loader and the CUDA engine handle today.
    pub fn is_mixtral(&self) -> bool {
        (0..self.n_layers).all(|l| match self.layer(l).ffn {
            FfnSpec::Moe(m) => m.shared_ffn_size.is_none() && m.gating == Gating::MIXTRAL,
            FfnSpec::Dense { .. } => false,
        })
    }

    /// Reads `config.json` of a Hugging Face checkpoint; only the Mixtral architecture is accepted.
    pub fn from_hf_config_file(path: &Path) -> Result<ModelConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_config(&json).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_hf_config(json: &serde_json::Value) -> Result<ModelConfig> {
        let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        if model_type != "mixtral" {
            bail!("model_type is {model_type:?}; only Mixtral checkpoints (model_type \"mixtral\") are supported");
        }
        let int = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .with_context(|| format!("config key {key:?} is missing or not a non-negative integer"))
        };
        let float = |key: &str, default: f64| -> Result<f32> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|v| v as f32)
                    .with_context(|| format!("config key {key:?} is not a number")),
            }
        };
        let hidden_size = int("hidden_size")?;
        let n_heads = int("num_attention_heads")?;
        let head_dim = match json.get("head_dim") {
            Some(v) if !v.is_null() => int("head_dim")?,
            _ => hidden_size / n_heads.max(1),
        };
        if json.get("tie_word_embeddings").and_then(|v| v.as_bool()) == Some(true) {
            bail!("tie_word_embeddings = true is not a Mixtral checkpoint layout we support");
        }
        let ffn_size = int("intermediate_size")?;
        let cfg = ModelConfig {
            vocab_size: int("vocab_size")?,
            hidden_size,
            ffn_size,
            n_layers: int("num_hidden_layers")?,
            n_heads,
            n_kv_heads: int("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            n_experts: int("num_local_experts")?,
            n_experts_used: int("num_experts_per_tok")?,
            context_length: int("max_position_embeddings").unwrap_or(32768),
            rope_theta: float("rope_theta", 1e6)?,
            rms_norm_eps: float("rms_norm_eps", 1e-5)?,
            n_leading_dense: 0,
            dense_ffn_size: ffn_size,
            shared_ffn_size: 0,
            gating: Gating::MIXTRAL,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the `llama.*` keys that llama.cpp writes for Mixtral, and llama.cpp's MoE keys for the
    /// other layer kinds (`expert_feed_forward_length`, `leading_dense_block_count`,
    /// `expert_shared_count`/`expert_shared_feed_forward_length`, `expert_weights_norm`,
    /// `expert_gating_func`). A dense llama model (no `expert_count`) reads as all-dense layers.
    pub fn from_gguf(meta: &Metadata) -> Result<ModelConfig> {
        let arch = meta.get_str("general.architecture").unwrap_or("");
        if arch != "llama" {
            bail!(
                "general.architecture is {arch:?}; only Mixtral in llama.cpp's \"llama\" layout is supported"
            );
        }
        let key = |k: &str| format!("llama.{k}");
        let int = |k: &str| -> Result<usize> {
            meta.get_u64(&key(k))
                .map(|v| v as usize)
                .with_context(|| format!("GGUF key {:?} is missing or not an integer", key(k)))
        };
        let opt = |k: &str| meta.get_u64(&key(k)).map(|v| v as usize);
        let n_experts = opt("expert_count").unwrap_or(0);
        let hidden_size = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let head_dim = opt("attention.key_length").unwrap_or(hidden_size / n_heads.max(1));
        let vocab_size = match opt("vocab_size") {
            Some(v) => v,
            None => meta
                .get_array("tokenizer.ggml.tokens")
                .map(|a| a.len())
                .context("neither llama.vocab_size nor tokenizer.ggml.tokens is present")?,
        };
        let dense_ffn_size = int("feed_forward_length")?;
        let ffn_size = if n_experts > 0 { opt("expert_feed_forward_length") } else { None };
        let ffn_size = ffn_size.unwrap_or(dense_ffn_size);
        let shared_ffn_size = match opt("expert_shared_feed_forward_length") {
            Some(width) => width,
            None => opt("expert_shared_count").unwrap_or(0) * ffn_size,
        };
        let gating = match opt("expert_gating_func").unwrap_or(1) {
            1 => Gating::Softmax { renormalize: meta.get_bool(&key("expert_weights_norm")).unwrap_or(true) },
            other => bail!("llama.expert_gating_func = {other}: only softmax gating (1) is supported"),
        };
        let cfg = ModelConfig {
            vocab_size,
            hidden_size,
            ffn_size,
            n_layers: int("block_count")?,
            n_heads,
            n_kv_heads: opt("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            n_experts,
            n_experts_used: if n_experts > 0 { int("expert_used_count")? } else { 0 },
            context_length: opt("context_length").unwrap_or(32768),
            rope_theta: meta.get_f64("llama.rope.freq_base").unwrap_or(1e4) as f32,
            rms_norm_eps: meta.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            n_leading_dense: if n_experts > 0 { opt("leading_dense_block_count").unwrap_or(0) } else { 0 },
            dense_ffn_size,
            shared_ffn_size,
            gating,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `llama.*` metadata for this config (what `from_gguf` reads back).
    pub fn to_gguf(&self, meta: &mut Metadata) {
        use crate::format::gguf::MetaValue::{String as S, F32, U32};
        meta.set("general.architecture", S("llama".into()));
        meta.set("llama.vocab_size", U32(self.vocab_size as u32));
        meta.set("llama.context_length", U32(self.context_length as u32));
        meta.set("llama.embedding_length", U32(self.hidden_size as u32));
        meta.set("llama.block_count", U32(self.n_layers as u32));
        meta.set("llama.feed_forward_length", U32(self.ffn_size as u32));
        meta.set("llama.rope.dimension_count", U32(self.head_dim as u32));
        meta.set("llama.attention.head_count", U32(self.n_heads as u32));
        meta.set("llama.attention.head_count_kv", U32(self.n_kv_heads as u32));
        if self.head_dim * self.n_heads != self.hidden_size {
            meta.set("llama.attention.key_length", U32(self.head_dim as u32));
            meta.set("llama.attention.value_length", U32(self.head_dim as u32));
        }
        if self.n_experts > 0 {
            meta.set("llama.expert_count", U32(self.n_experts as u32));
            meta.set("llama.expert_used_count", U32(self.n_experts_used as u32));
            // Mixtral needs none of these: its files keep llama.cpp's plain Mixtral metadata.
            if self.n_leading_dense > 0 {
                meta.set("llama.leading_dense_block_count", U32(self.n_leading_dense as u32));
            }
            if self.dense_ffn_size != self.ffn_size {
                meta.set("llama.feed_forward_length", U32(self.dense_ffn_size as u32));
                meta.set("llama.expert_feed_forward_length", U32(self.ffn_size as u32));
            }
            if self.shared_ffn_size > 0 {
                meta.set("llama.expert_shared_feed_forward_length", U32(self.shared_ffn_size as u32));
            }
            let Gating::Softmax { renormalize } = self.gating;
            if !renormalize {
                meta.set("llama.expert_weights_norm", crate::format::gguf::MetaValue::Bool(false));
            }
        }
        meta.set("llama.rope.freq_base", F32(self.rope_theta));
        meta.set("llama.attention.layer_norm_rms_epsilon", F32(self.rms_norm_eps));
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("FFN size", self.ffn_size),
            ("layer count", self.n_layers),
            ("head count", self.n_heads),
            ("KV head count", self.n_kv_heads),
            ("head dim", self.head_dim),
        ];
        for (what, v) in positive {
            if v == 0 {
                bail!("{what} is 0");
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            bail!("{} query heads are not a multiple of {} KV heads", self.n_heads, self.n_kv_heads);
        }
        if self.head_dim % 2 != 0 {
            bail!("head dim {} is odd; RoPE needs pairs", self.head_dim);
        }
        if self.n_experts > 0 && self.n_experts_used == 0 {
            bail!("experts per token is 0");
        }
        if self.n_experts_used > self.n_experts {
            bail!("{} experts per token but only {} experts", self.n_experts_used, self.n_experts);
        }
        if self.n_leading_dense > self.n_layers {
            bail!("{} leading dense layers but only {} layers", self.n_leading_dense, self.n_layers);
        }
        // Guards against hostile files: every size must stay well inside usize arithmetic, and the
        // per-layer lists built from a config before any tensor is read (the quantizer's plan) must stay
        // small: a config.json claiming a million layers made them take over a GiB (found by tests/fuzz).
        let limits = [
            self.vocab_size,
            self.hidden_size,
            self.ffn_size,
            self.dense_ffn_size,
            self.shared_ffn_size,
            self.n_heads,
            self.head_dim,
        ];
        if limits.iter().any(|&v| v > 1 << 20) || self.n_experts > 1024 || self.n_layers > 1024 {
            bail!("implausible model size ({self:?})");
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Row-major shape of one layer tensor as the model uses it; for experts, one expert's matrix
    /// (`[rows, cols]`, output-major). Norms are `[hidden]`.
    pub fn layer_tensor_shape(&self, t: LayerTensor) -> Vec<usize> {
        let (h, f) = (self.hidden_size, self.ffn_size);
        match t {
            LayerTensor::AttnNorm | LayerTensor::FfnNorm => vec![h],
            LayerTensor::AttnQ => vec![self.q_dim(), h],
            LayerTensor::AttnK | LayerTensor::AttnV => vec![self.kv_dim(), h],
            LayerTensor::AttnOutput => vec![h, self.q_dim()],
            LayerTensor::FfnGateInp => vec![self.n_experts, h],
            LayerTensor::FfnGateExps | LayerTensor::FfnUpExps => vec![f, h],
            LayerTensor::FfnDownExps => vec![h, f],
        }
    }

    /// Every tensor of the GGUF file with its shape in ggml order (innermost first), the order
    /// llama.cpp's converter writes them in. Merged expert tensors are `[cols, rows, n_experts]`.
    pub fn gguf_tensors(&self) -> Vec<(String, Vec<u64>)> {
        let ggml = |shape: &[usize]| shape.iter().rev().map(|&d| d as u64).collect::<Vec<_>>();
        let mut out = vec![(names::TOKEN_EMBD.to_string(), ggml(&[self.vocab_size, self.hidden_size]))];
        for layer in 0..self.n_layers {
            for t in LayerTensor::ALL {
                let mut dims = ggml(&self.layer_tensor_shape(t));
                if t.is_expert() {
                    dims.push(self.n_experts as u64);
                }
                out.push((t.gguf_name(layer), dims));
            }
        }
        out.push((names::OUTPUT_NORM.to_string(), ggml(&[self.hidden_size])));
        out.push((names::OUTPUT.to_string(), ggml(&[self.vocab_size, self.hidden_size])));
        out
    }

    /// Parameter count.
    pub fn n_params(&self) -> u64 {
        self.gguf_tensors().iter().map(|(_, d)| d.iter().product::<u64>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_8x7b_has_46_7b_parameters() {
        let p = ModelConfig::mixtral_8x7b(32).n_params() as f64 / 1e9;
        assert!((p - 46.7).abs() < 0.05, "{p}");
    }

    #[test]
    fn gguf_metadata_round_trips() {
        let cfg = ModelConfig::mixtral_8x7b(2);
        let mut meta = Metadata::new();
        cfg.to_gguf(&mut meta);
        assert_eq!(ModelConfig::from_gguf(&meta).unwrap(), cfg);
    }

    #[test]
    fn mixtral_8x22b_round_trips_and_every_layer_is_a_mixtral_moe() {
        let cfg = ModelConfig::mixtral_8x22b(56);
        let mut meta = Metadata::new();
        cfg.to_gguf(&mut meta);
        assert_eq!(ModelConfig::from_gguf(&meta).unwrap(), cfg);
        assert!(cfg.is_mixtral());
        let moe = MoeSpec {
            n_experts: 8,
            top_k: 2,
            expert_ffn_size: 16384,
            shared_ffn_size: None,
            gating: Gating::MIXTRAL,
        };
        assert!((0..56).all(|l| cfg.layer(l) == LayerSpec { ffn: FfnSpec::Moe(moe) }));
    }

    /// llama.cpp's keys for the other layer kinds: a dense llama (no expert keys), leading dense
    /// blocks with their own FFN width, shared experts, gating without renormalization.
    #[test]
    fn layer_specs_from_llama_cpp_keys() {
        use crate::format::gguf::MetaValue::{Bool, U32};
        let mixtral = ModelConfig::mixtral_8x7b(4);
        let mut meta = Metadata::new();
        mixtral.to_gguf(&mut meta);
        let mut dense = Metadata::new();
        ModelConfig { n_experts: 0, n_experts_used: 0, ..mixtral.clone() }.to_gguf(&mut dense);
        assert!(dense.get("llama.expert_count").is_none());
        let dense = ModelConfig::from_gguf(&dense).unwrap();
        assert_eq!(dense.layer(3).ffn, FfnSpec::Dense { ffn_size: 14336 });
        assert!(!dense.is_mixtral());

        meta.set("llama.leading_dense_block_count", U32(1));
        meta.set("llama.feed_forward_length", U32(10944));
        meta.set("llama.expert_feed_forward_length", U32(1408));
        meta.set("llama.expert_shared_count", U32(2));
        meta.set("llama.expert_weights_norm", Bool(false));
        let cfg = ModelConfig::from_gguf(&meta).unwrap();
        assert_eq!(cfg.layer(0).ffn, FfnSpec::Dense { ffn_size: 10944 });
        let FfnSpec::Moe(moe) = cfg.layer(1).ffn else { panic!("layer 1 is a MoE layer") };
        assert_eq!((moe.expert_ffn_size, moe.shared_ffn_size), (1408, Some(2816)));
        assert_eq!(moe.gating, Gating::Softmax { renormalize: false });
        let mut again = Metadata::new();
        cfg.to_gguf(&mut again);
        assert_eq!(ModelConfig::from_gguf(&again).unwrap(), cfg);

        meta.set("llama.expert_gating_func", U32(2));
        let err = ModelConfig::from_gguf(&meta).unwrap_err().to_string();
        assert!(err.contains("gating"), "{err}");
    }

    #[test]
    fn rejects_other_architectures() {
        let json = serde_json::json!({"model_type": "llama", "hidden_size": 8});
        let err = ModelConfig::from_hf_config(&json).unwrap_err().to_string();
        assert!(err.contains("llama"), "{err}");
    }
}
