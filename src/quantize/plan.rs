//! Which ggml type each tensor gets, for each `--type`.
//!
//! The mixes are llama.cpp's file types, by the names `llama-quantize` takes (case-insensitive), with
//! the per-tensor rules of its `llama_tensor_get_type` (src/llama-quant.cpp) for a Mixtral-style model:
//! the rules that apply to K-quant mixes and Q4_0/Q8_0, without an importance matrix. For an 8-expert
//! model attn_k and attn_v are Q8_0 in every quantized mix (attention is under 2% of Mixtral's weights,
//! so spending bits there is nearly free), the output head Q6_K (Q8_0 in Q8_0), and ffn_down gets more
//! bits in part of the layers in the _M/_L mixes and Q2_K. One rule is ours: the Q2_K-Q4_K mixes move
//! a step of precision from the output head to the token embeddings at the same size (`head_step`).
//! The user overrides any tensor's type as with llama-quantize (`TypeOverrides`).
//!
//! Q2_K_S is the mix for a 16 GB card: by `plan`'s memory model Mixtral-8x7B in it fits a 16 GiB
//! budget entirely on the GPU with a 4K context (15.67 GiB with the f16 KV cache and the engine's
//! buffers), where plain Q2_K leaves 17 of the 256 experts in host memory. It is llama.cpp's own mix,
//! so we take it rather than define one: its rules are every matrix Q2_K (attn_output too, where Q2_K
//! gets Q5_K for 8 experts) but ffn_down of the first eighth of the layers (Q4_K), attn_k/attn_v (Q8_0
//! for 8 experts) and the head (Q6_K; ours: Q5_K, with Q3_K embeddings). The default budget, which
//! keeps 768 MiB of the card free, holds it only with a ~600-token context; 4K there would take more
//! than any sensible mix of our types gives up (every expert matrix Q2_K with Q2_K_S's attention is still 15.26 GiB). llama.cpp
//! refuses to make Q2_K_S without an importance matrix (its Q2_K tensors in a Q2_K_S file "require"
//! one); ours is made with one when `--imatrix` gives it, else by our plain block search, and
//! `quantize` says so.
//!
//! `q4_k` is ours, not an alias of Q4_K_M: Q4_K_M's attention, embeddings and head (Q8_0
//! attn_k/attn_v, Q5_K attn_output, token_embd and output) but every expert matrix Q4_K, ffn_down
//! included, which keeps the file ~5% smaller than Q4_K_M (the trade measured in the README).
//!
//! A row length that a K-quant's 256-value blocks do not divide falls back to a 32-value type
//! (`fit_row`).

use clap::ValueEnum;

use crate::format::GgmlType;
use crate::model::names::{self, LayerTensor};

/// The `--type` of `mixtral-q quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "Q2_K")]
    Q2K,
    #[value(name = "Q2_K_S")]
    Q2KS,
    #[value(name = "Q3_K_S")]
    Q3KS,
    #[value(name = "Q3_K_M")]
    Q3KM,
    #[value(name = "Q3_K_L")]
    Q3KL,
    #[value(name = "Q4_K_S")]
    Q4KS,
    #[value(name = "Q4_K_M")]
    Q4KM,
    #[value(name = "Q5_K_S")]
    Q5KS,
    #[value(name = "Q5_K_M")]
    Q5KM,
    #[value(name = "Q6_K")]
    Q6K,
    #[value(name = "Q8_0")]
    Q8_0,
    #[value(name = "Q4_0")]
    Q4_0,
    #[value(name = "F16")]
    F16,
    #[value(name = "BF16")]
    BF16,
    #[value(name = "F32")]
    F32,
}

impl Target {
    /// `general.file_type`: llama.cpp's `llama_ftype` (`q4_k` reports Q4_K_M, the mix it derives from).
    pub fn file_type(self) -> u32 {
        use Target::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q8_0 => 7,
            Q2K => 10,
            Q2KS => 21,
            Q3KS => 11,
            Q3KM => 12,
            Q3KL => 13,
            Q4KS => 14,
            Q4KM | Q4K => 15,
            Q5KS => 16,
            Q5KM => 17,
            Q6K => 18,
            BF16 => 32,
        }
    }

    /// The name `--type` takes (as clap lists it).
    pub fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }

    /// llama.cpp's default type of the mix (`default_type` in `llama_model_quantize_impl`).
    pub fn base_type(self) -> GgmlType {
        use GgmlType as G;
        use Target::*;
        match self {
            F32 => G::F32,
            F16 => G::F16,
            BF16 => G::BF16,
            Q4_0 => G::Q4_0,
            Q8_0 => G::Q8_0,
            Q2K | Q2KS => G::Q2_K,
            Q3KS | Q3KM | Q3KL => G::Q3_K,
            Q4KS | Q4KM | Q4K => G::Q4_K,
            Q5KS | Q5KM => G::Q5_K,
            Q6K => G::Q6_K,
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
    /// A layer's tensor, with the layer's index.
    Layer(LayerTensor, usize),
}

impl TensorRole {
    /// The role of a GGUF tensor name as `ModelConfig::gguf_tensors` spells them.
    pub fn of(name: &str) -> TensorRole {
        match name {
            names::TOKEN_EMBD => TensorRole::TokenEmbd,
            names::OUTPUT => TensorRole::Output,
            names::OUTPUT_NORM => TensorRole::Norm,
            _ => {
                let mut parts = name.split('.');
                let layer = parts.nth(1).and_then(|l| l.parse().ok());
                let suffix = parts.next().unwrap_or("");
                match (LayerTensor::ALL.iter().find(|t| t.suffix() == suffix), layer) {
                    (Some(LayerTensor::AttnNorm | LayerTensor::FfnNorm) | None, _) | (_, None) => {
                        TensorRole::Norm
                    }
                    (Some(t), Some(layer)) => TensorRole::Layer(*t, layer),
                }
            }
        }
    }
}

/// What the rules ask of the model.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub n_layers: usize,
    pub n_experts: usize,
    /// Query heads per KV head.
    pub n_gqa: usize,
}

impl ModelShape {
    pub fn of(cfg: &crate::model::ModelConfig) -> ModelShape {
        ModelShape {
            n_layers: cfg.n_layers,
            n_experts: cfg.n_experts,
            n_gqa: cfg.n_heads / cfg.n_kv_heads.max(1),
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third in between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// Ours, not llama.cpp's: in the K-quant mixes under Q5_K the token embeddings get the K-quant one
/// step above the base type (returned here) and the output head Q5_K instead of llama.cpp's Q6_K.
/// Both tensors are `[vocab, hidden]`, so the file does not grow: the embeddings gain 0.81-1.06 bits
/// per weight, the head gives 1.06 back. No importance matrix can help the embeddings (a row lookup
/// has no input to weight), and on the trained demo model they were half of every mix's KL
/// divergence; the trade lowered the KL by 15-36% in every mix it applies to, with an importance
/// matrix and without (README, "Quantizer"). `--token-embedding-type` and `--output-tensor-type`
/// give llama.cpp's head back.
fn head_step(base: GgmlType) -> Option<GgmlType> {
    use GgmlType as G;
    match base {
        G::Q2_K => Some(G::Q3_K),
        G::Q3_K => Some(G::Q4_K),
        G::Q4_K => Some(G::Q5_K),
        // Q5_K_S/M measured worse by KL without an importance matrix (+6-7%), so they keep llama.cpp's.
        _ => None,
    }
}

/// The type for a tensor of `role` whose rows hold `row_len` values.
pub fn tensor_type(target: Target, role: TensorRole, row_len: usize, shape: ModelShape) -> GgmlType {
    fit_row(wanted_type(target, role, shape), row_len)
}

/// `llama_tensor_get_type` for our mixes, before the row-length fallback.
fn wanted_type(target: Target, role: TensorRole, shape: ModelShape) -> GgmlType {
    use GgmlType as G;
    use LayerTensor as L;
    use Target::*;
    let base = target.base_type();
    let eight_experts = shape.n_experts == 8;
    let n = shape.n_layers;
    match role {
        // 1-D tensors and the router are never quantized.
        TensorRole::Norm | TensorRole::Layer(L::FfnGateInp, _) => G::F32,
        // llama.cpp applies its rules only to quantized mixes.
        _ if base.block_len() == 1 => base,
        TensorRole::Output if base == G::Q8_0 => G::Q8_0,
        // Ours, not llama.cpp's (see `head_step`): the head one step under llama.cpp's Q6_K.
        TensorRole::Output if head_step(base).is_some() => G::Q5_K,
        TensorRole::Output => G::Q6_K,
        TensorRole::TokenEmbd => head_step(base).unwrap_or(base),
        // "For the 8-expert model, bumping this to Q8_0 trades just ~128MB."
        TensorRole::Layer(L::AttnV | L::AttnK, _) if eight_experts => G::Q8_0,
        TensorRole::Layer(L::AttnV, layer) => match target {
            Q2K | Q2KS if shape.n_gqa >= 4 => G::Q4_K,
            Q2K => G::Q3_K,
            Q3KM if layer < 2 => G::Q5_K,
            Q3KM => G::Q4_K,
            Q3KL => G::Q5_K,
            Q4KM | Q5KM if use_more_bits(layer, n) => G::Q6_K,
            Q4KS if layer < 4 => G::Q5_K,
            _ => base,
        },
        // Q2_K_S is not in llama.cpp's list for 8 experts: its attn_output stays Q2_K.
        TensorRole::Layer(L::AttnOutput, _) if eight_experts => match target {
            Q2K | Q3KS | Q3KM | Q4KS | Q4KM | Q4K => G::Q5_K,
            _ => base,
        },
        TensorRole::Layer(L::AttnOutput, _) => match target {
            Q2K => G::Q3_K,
            Q3KM => G::Q4_K,
            Q3KL => G::Q5_K,
            Q4K => G::Q5_K,
            _ => base,
        },
        TensorRole::Layer(L::FfnDownExps, layer) => match target {
            Q2K => G::Q3_K,
            Q2KS if layer < n / 8 => G::Q4_K,
            Q3KM if layer < n / 16 => G::Q5_K,
            Q3KM => G::Q4_K,
            Q3KL => G::Q5_K,
            Q4KM | Q5KM if use_more_bits(layer, n) => G::Q6_K,
            Q4KS if layer < n / 8 => G::Q5_K,
            _ => base,
        },
        TensorRole::Layer(_, _) => base,
    }
}

/// A type whose blocks divide `row_len`: K-quants fall back to a 32-block type of similar precision
/// (as llama.cpp does), 32-block types to F16.
pub fn fit_row(wanted: GgmlType, row_len: usize) -> GgmlType {
    use GgmlType as G;
    if row_len.is_multiple_of(wanted.block_len()) {
        return wanted;
    }
    let fallback = match wanted {
        G::Q2_K | G::Q3_K | G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        _ => G::F16,
    };
    if row_len.is_multiple_of(fallback.block_len()) {
        fallback
    } else {
        G::F16
    }
}

/// Per-tensor types chosen over a mix's rules: llama-quantize's `--token-embedding-type`,
/// `--output-tensor-type` and `--tensor-type PATTERN=TYPE`. Norms and routers are never quantized,
/// so nothing overrides them; an overridden type still falls back when its blocks do not divide the
/// rows (`fit_row`).
#[derive(Clone, Debug, Default)]
pub struct TypeOverrides {
    pub token_embd: Option<GgmlType>,
    pub output: Option<GgmlType>,
    /// A regular expression searched for in the GGUF tensor name, and its type. Later entries win
    /// when several match, as in llama.cpp, and over `token_embd` and `output`.
    pub tensors: Vec<(regex::Regex, GgmlType)>,
}

impl TypeOverrides {
    /// The type of tensor `name` (rows of `row_len` values) whose mix gives it `ty`.
    pub fn apply(&self, name: &str, row_len: usize, ty: GgmlType) -> GgmlType {
        let role = TensorRole::of(name);
        if matches!(role, TensorRole::Norm | TensorRole::Layer(LayerTensor::FfnGateInp, _)) {
            return ty;
        }
        let by_role = match role {
            TensorRole::TokenEmbd => self.token_embd,
            TensorRole::Output => self.output,
            _ => None,
        };
        let by_pattern = self.tensors.iter().rev().find(|(re, _)| re.is_match(name)).map(|(_, t)| *t);
        match by_pattern.or(by_role) {
            Some(wanted) => fit_row(wanted, row_len),
            None => ty,
        }
    }
}

/// A type a user names (`q6_k`, `Q8_0`, `f16`; case-insensitive): one the quantizer writes and the
/// engines compute with.
pub fn parse_type(name: &str) -> Result<GgmlType, String> {
    let usable = || {
        GgmlType::ALL
            .into_iter()
            .filter(|t| crate::format::codec::can_quantize(*t) && t.activations().is_some())
    };
    usable().find(|t| t.name().eq_ignore_ascii_case(name.trim())).ok_or_else(|| {
        let names: Vec<&str> = usable().map(|t| t.name()).collect();
        format!("unknown tensor type `{name}` (one of {})", names.join(", "))
    })
}

/// `--tensor-type PATTERN=TYPE`: a regular expression over GGUF tensor names and a type.
pub fn parse_tensor_override(arg: &str) -> Result<(regex::Regex, GgmlType), String> {
    let (pattern, ty) =
        arg.rsplit_once('=').ok_or_else(|| format!("`{arg}`: expected PATTERN=TYPE, e.g. ffn_down=q6_k"))?;
    let re = regex::Regex::new(pattern).map_err(|e| format!("`{pattern}`: not a regular expression: {e}"))?;
    Ok((re, parse_type(ty)?))
}

/// Every GGUF tensor of a `cfg` model quantized for `target`: name, ggml dims and type (what
/// `quantize` writes; `plan` sizes a model from it without the file).
pub fn tensor_types(cfg: &crate::model::ModelConfig, target: Target) -> Vec<(String, Vec<u64>, GgmlType)> {
    cfg.gguf_tensors()
        .into_iter()
        .map(|(name, dims)| {
            let ty = tensor_type(target, TensorRole::of(&name), dims[0] as usize, ModelShape::of(cfg));
            (name, dims, ty)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mixtral-8x7B: 32 layers, 8 experts, 4 query heads per KV head.
    const MIXTRAL: ModelShape = ModelShape { n_layers: 32, n_experts: 8, n_gqa: 4 };

    fn t(target: Target, name: &str) -> GgmlType {
        tensor_type(target, TensorRole::of(name), 4096, MIXTRAL)
    }

    /// The ffn_down type of each of the 32 layers.
    fn ffn_down(target: Target) -> Vec<GgmlType> {
        (0..32).map(|l| t(target, &format!("blk.{l}.ffn_down_exps.weight"))).collect()
    }

    /// The layers `use_more_bits` picks for 32 layers, written out: the first and last 4, and
    /// 6, 9, ..., 27.
    const MORE_BITS: [usize; 16] = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];

    #[test]
    fn q4_k_plan_for_mixtral() {
        use GgmlType as G;
        let t = |name: &str| t(Target::Q4K, name);
        assert_eq!(t("blk.0.ffn_gate_exps.weight"), G::Q4_K);
        assert_eq!(t("blk.31.ffn_down_exps.weight"), G::Q4_K);
        assert_eq!(t("blk.3.attn_q.weight"), G::Q4_K);
        assert_eq!(t("blk.3.attn_k.weight"), G::Q8_0);
        assert_eq!(t("blk.3.attn_output.weight"), G::Q5_K);
        assert_eq!(t("blk.3.ffn_gate_inp.weight"), G::F32);
        assert_eq!(t("blk.3.attn_norm.weight"), G::F32);
        assert_eq!(t("output.weight"), G::Q5_K);
        assert_eq!(t("token_embd.weight"), G::Q5_K);
    }

    /// llama.cpp's Q2_K_S for Mixtral-8x7B, one assertion per rule.
    #[test]
    fn q2_k_s_plan_for_mixtral_8x7b() {
        use GgmlType as G;
        let t = |name: &str| t(Target::Q2KS, name);
        assert_eq!(Target::Q2KS.file_type(), 21);
        // The base type: the matrices no rule names.
        assert_eq!(t("blk.9.attn_q.weight"), G::Q2_K);
        assert_eq!(t("blk.9.ffn_gate_exps.weight"), G::Q2_K);
        assert_eq!(t("blk.9.ffn_up_exps.weight"), G::Q2_K);
        // 8 experts: attn_k and attn_v Q8_0 (attn_v's Q4_K for GQA is overridden).
        assert_eq!(t("blk.9.attn_k.weight"), G::Q8_0);
        assert_eq!(t("blk.9.attn_v.weight"), G::Q8_0);
        // Not in the 8-expert Q5_K list: attn_output keeps the base type (plain Q2_K's is Q5_K).
        assert_eq!(t("blk.9.attn_output.weight"), G::Q2_K);
        assert_eq!(
            tensor_type(Target::Q2K, TensorRole::of("blk.9.attn_output.weight"), 4096, MIXTRAL),
            G::Q5_K
        );
        // ffn_down: Q4_K in the first 32 / 8 = 4 layers, Q2_K after (plain Q2_K: Q3_K everywhere).
        let first_four: Vec<G> = (0..32).map(|l| if l < 4 { G::Q4_K } else { G::Q2_K }).collect();
        assert_eq!(ffn_down(Target::Q2KS), first_four);
        // Ours: embeddings a step up, the head a step under llama.cpp's Q6_K; norms and routers unquantized.
        assert_eq!(t("token_embd.weight"), G::Q3_K);
        assert_eq!(t("output.weight"), G::Q5_K);
        assert_eq!(t("blk.9.ffn_gate_inp.weight"), G::F32);
        assert_eq!(t("blk.9.ffn_norm.weight"), G::F32);
        assert_eq!(t("output_norm.weight"), G::F32);
        // Without 8 experts, attn_v is Q4_K for 4+ query heads per KV head, else the base type.
        let four = ModelShape { n_experts: 4, ..MIXTRAL };
        let mha = ModelShape { n_experts: 4, n_gqa: 1, ..MIXTRAL };
        let attn_v = TensorRole::of("blk.2.attn_v.weight");
        assert_eq!(tensor_type(Target::Q2KS, attn_v, 4096, four), G::Q4_K);
        assert_eq!(tensor_type(Target::Q2KS, attn_v, 4096, mha), G::Q2_K);
        assert_eq!(tensor_type(Target::Q2KS, TensorRole::of("blk.2.attn_k.weight"), 4096, four), G::Q2_K);
    }

    #[test]
    fn llama_cpp_mixes_for_mixtral_8x7b() {
        use GgmlType as G;
        use Target::*;
        // (mix, attn_q/gate/up, attn_output, token_embd, output); llama.cpp's token_embd is the base
        // type and its output Q6_K (Q8_0 in Q8_0): ours differs in the Q2_K-Q4_K mixes (`head_step`).
        let rows = [
            (Q2K, G::Q2_K, G::Q5_K, G::Q3_K, G::Q5_K),
            (Q3KS, G::Q3_K, G::Q5_K, G::Q4_K, G::Q5_K),
            (Q3KM, G::Q3_K, G::Q5_K, G::Q4_K, G::Q5_K),
            (Q3KL, G::Q3_K, G::Q3_K, G::Q4_K, G::Q5_K),
            (Q4KS, G::Q4_K, G::Q5_K, G::Q5_K, G::Q5_K),
            (Q4KM, G::Q4_K, G::Q5_K, G::Q5_K, G::Q5_K),
            (Q5KS, G::Q5_K, G::Q5_K, G::Q5_K, G::Q6_K),
            (Q5KM, G::Q5_K, G::Q5_K, G::Q5_K, G::Q6_K),
            (Q6K, G::Q6_K, G::Q6_K, G::Q6_K, G::Q6_K),
            (Q8_0, G::Q8_0, G::Q8_0, G::Q8_0, G::Q8_0),
            (Q4_0, G::Q4_0, G::Q4_0, G::Q4_0, G::Q6_K),
        ];
        for (mix, base, attn_output, token_embd, output) in rows {
            for name in ["blk.7.attn_q.weight", "blk.7.ffn_gate_exps.weight", "blk.7.ffn_up_exps.weight"] {
                assert_eq!(t(mix, name), base, "{mix:?} {name}");
            }
            assert_eq!(t(mix, "token_embd.weight"), token_embd, "{mix:?}");
            assert_eq!(t(mix, "blk.7.attn_output.weight"), attn_output, "{mix:?}");
            assert_eq!(t(mix, "output.weight"), output, "{mix:?}");
            for l in [0, 13, 31] {
                assert_eq!(t(mix, &format!("blk.{l}.attn_k.weight")), G::Q8_0, "{mix:?}");
                assert_eq!(t(mix, &format!("blk.{l}.attn_v.weight")), G::Q8_0, "{mix:?}");
                assert_eq!(t(mix, &format!("blk.{l}.ffn_gate_inp.weight")), G::F32, "{mix:?}");
                assert_eq!(t(mix, &format!("blk.{l}.ffn_norm.weight")), G::F32, "{mix:?}");
            }
        }
        let more_bits = |hi: G, lo: G| -> Vec<G> {
            (0..32).map(|l| if MORE_BITS.contains(&l) { hi } else { lo }).collect()
        };
        let first =
            |k: usize, hi: G, lo: G| -> Vec<G> { (0..32).map(|l| if l < k { hi } else { lo }).collect() };
        assert_eq!(ffn_down(Q2K), vec![G::Q3_K; 32]);
        assert_eq!(ffn_down(Q3KS), vec![G::Q3_K; 32]);
        assert_eq!(ffn_down(Q3KM), first(2, G::Q5_K, G::Q4_K));
        assert_eq!(ffn_down(Q3KL), vec![G::Q5_K; 32]);
        assert_eq!(ffn_down(Q4KS), first(4, G::Q5_K, G::Q4_K));
        assert_eq!(ffn_down(Q4KM), more_bits(G::Q6_K, G::Q4_K));
        assert_eq!(ffn_down(Q5KS), vec![G::Q5_K; 32]);
        assert_eq!(ffn_down(Q5KM), more_bits(G::Q6_K, G::Q5_K));
        assert_eq!(ffn_down(Q6K), vec![G::Q6_K; 32]);
        assert_eq!(ffn_down(Q4_0), vec![G::Q4_0; 32]);
        for (mix, ty) in [(F16, G::F16), (BF16, G::BF16), (F32, G::F32)] {
            for name in
                ["token_embd.weight", "output.weight", "blk.3.attn_k.weight", "blk.30.ffn_down_exps.weight"]
            {
                assert_eq!(t(mix, name), ty, "{mix:?} {name}");
            }
            assert_eq!(t(mix, "blk.3.ffn_gate_inp.weight"), G::F32);
        }
    }

    /// Our embeddings/head trade never makes a file bigger than llama.cpp's mix: the two tensors have
    /// the same shape, and the embeddings gain at most what the head gives back.
    #[test]
    fn the_head_trade_keeps_llama_cpp_s_size() {
        for &mix in Target::value_variants() {
            let bytes = |ty: GgmlType| ty.bytes_for(32000 * 4096).unwrap();
            let ours = bytes(t(mix, "token_embd.weight")) + bytes(t(mix, "output.weight"));
            let output = if mix.base_type() == GgmlType::Q8_0 { GgmlType::Q8_0 } else { GgmlType::Q6_K };
            let llama =
                if mix.base_type().is_quantized() { bytes(mix.base_type()) + bytes(output) } else { ours };
            assert!(ours <= llama, "{mix:?}: {ours} > {llama}");
        }
    }

    #[test]
    fn overrides_win_over_the_mix_and_the_last_pattern_wins() {
        use GgmlType as G;
        let o = TypeOverrides {
            token_embd: Some(G::Q8_0),
            output: Some(G::Q6_K),
            tensors: vec![
                parse_tensor_override("ffn_down=q6_k").unwrap(),
                parse_tensor_override(r"blk\.1\.ffn_down=Q8_0").unwrap(),
                parse_tensor_override("output=f16").unwrap(),
                parse_tensor_override("norm=q4_0").unwrap(),
                parse_tensor_override("gate_inp=q4_0").unwrap(),
            ],
        };
        let apply = |name: &str, row_len| o.apply(name, row_len, t(Target::Q4KM, name));
        assert_eq!(apply("token_embd.weight", 4096), G::Q8_0);
        // A pattern beats the flag, as in llama.cpp.
        assert_eq!(apply("output.weight", 4096), G::F16);
        assert_eq!(apply("blk.0.ffn_down_exps.weight", 14336), G::Q6_K);
        assert_eq!(apply("blk.1.ffn_down_exps.weight", 14336), G::Q8_0);
        assert_eq!(apply("blk.1.ffn_up_exps.weight", 4096), G::Q4_K);
        // Norms and routers stay F32; a type whose blocks do not divide the rows falls back.
        assert_eq!(apply("blk.1.attn_norm.weight", 4096), G::F32);
        assert_eq!(apply("blk.1.ffn_gate_inp.weight", 4096), G::F32);
        assert_eq!(o.apply("blk.0.ffn_down_exps.weight", 224, G::Q5_0), G::Q8_0);
    }

    #[test]
    fn type_names_parse_like_llama_quantize_s() {
        assert_eq!(parse_type("q5_K"), Ok(GgmlType::Q5_K));
        assert_eq!(parse_type("Q8_0"), Ok(GgmlType::Q8_0));
        assert_eq!(parse_type("BF16"), Ok(GgmlType::BF16));
        for bad in ["q8_k", "q8_1", "q7_k", ""] {
            let err = parse_type(bad).unwrap_err();
            assert!(err.contains("unknown tensor type") && err.contains("q4_K"), "{err}");
        }
        assert!(parse_tensor_override("ffn_down").unwrap_err().contains("PATTERN=TYPE"));
        assert!(parse_tensor_override("ffn_(down=q6_k").unwrap_err().contains("not a regular expression"));
        assert!(parse_tensor_override("ffn_down=q9_k").unwrap_err().contains("unknown tensor type"));
    }

    #[test]
    fn attention_rules_without_eight_experts() {
        use GgmlType as G;
        let shape = ModelShape { n_layers: 32, n_experts: 4, n_gqa: 4 };
        let t = |mix, name: &str| tensor_type(mix, TensorRole::of(name), 4096, shape);
        assert_eq!(t(Target::Q3KM, "blk.1.attn_v.weight"), G::Q5_K);
        assert_eq!(t(Target::Q3KM, "blk.2.attn_v.weight"), G::Q4_K);
        assert_eq!(t(Target::Q3KM, "blk.2.attn_k.weight"), G::Q3_K);
        assert_eq!(t(Target::Q3KM, "blk.2.attn_output.weight"), G::Q4_K);
        assert_eq!(t(Target::Q2K, "blk.2.attn_v.weight"), G::Q4_K);
        assert_eq!(t(Target::Q4KM, "blk.6.attn_v.weight"), G::Q6_K);
        assert_eq!(t(Target::Q4KM, "blk.7.attn_v.weight"), G::Q4_K);
    }

    #[test]
    fn names_are_llama_cpp_s_case_insensitive_with_their_file_types() {
        use crate::format::FileType;
        for &mix in Target::value_variants() {
            let name = mix.name();
            assert_eq!(Target::from_str(&name.to_lowercase(), true), Ok(mix), "{name}");
            assert_eq!(Target::from_str(&name.to_uppercase(), true), Ok(mix), "{name}");
            let ft =
                FileType::from_id(mix.file_type() as u64).unwrap_or_else(|| panic!("{name}: no file type"));
            if mix != Target::Q4K {
                let expected = if mix == Target::F32 { "ALL_F32".into() } else { format!("MOSTLY_{name}") };
                assert_eq!(ft.name, expected);
            }
        }
        assert_eq!(Target::Q4K.file_type(), Target::Q4KM.file_type());
        assert!(Target::from_str("q3_k_xl", true).is_err());
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
