//! The placement plan: given a VRAM budget, what lives on the GPU and what stays in host memory.
//!
//! First the parts every token needs: attention, norms, routers, embeddings, output head, the f16 KV
//! cache and the activation scratch. Then experts one by one (expert 0 of every layer, then expert 1 of
//! every layer, ...: each layer keeps a similar share resident) while they fit, after reserving enough
//! cache slots for the experts left in host memory (at least the `n_experts_used` that one layer needs at
//! once); memory left over becomes more slots. Pure arithmetic: the engine allocates what the plan says.

use std::fmt;

pub mod fit;
pub mod predict;

use anyhow::{bail, Context, Result};

use crate::model::names::{self, LayerTensor};
use crate::model::weights::{ExpertWeights, ModelWeights};
use crate::model::ModelConfig;
use crate::quantize::{tensor_types, Target};

/// VRAM left free by default for the CUDA context, the driver and fragmentation.
pub const DEFAULT_RESERVE: u64 = 768 << 20;

/// Alignment of each matrix inside an expert's buffer (kernels use 16-byte loads; 256 = cudaMalloc's).
pub const ALIGN: usize = 256;

/// The default budget on a device with `free_bytes` of free VRAM.
pub fn default_budget(free_bytes: u64) -> u64 {
    free_bytes.saturating_sub(DEFAULT_RESERVE)
}

/// Where an expert's three matrices (gate, up, down) sit in its one device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertLayout {
    pub offsets: [usize; 3],
    pub bytes: usize,
}

impl ExpertLayout {
    pub fn of(expert: &ExpertWeights) -> ExpertLayout {
        Self::from_sizes([expert.gate.data.len(), expert.up.data.len(), expert.down.data.len()])
    }

    pub fn from_sizes(sizes: [usize; 3]) -> ExpertLayout {
        let mut offsets = [0; 3];
        let mut end = 0;
        for (o, s) in offsets.iter_mut().zip(sizes) {
            *o = end;
            end = (end + s).next_multiple_of(ALIGN);
        }
        ExpertLayout { offsets, bytes: end }
    }
}

/// Byte counts the plan is made from.
#[derive(Clone, Debug)]
pub struct ModelSizes {
    /// Everything but the experts: attention, norms, routers, token embeddings, output head.
    pub dense: u64,
    /// The token embeddings' share of `dense` (a token reads one row of it, not all).
    pub token_embd: u64,
    /// `[layer][expert]`: bytes of each expert's buffer (see [`ExpertLayout`]).
    pub experts: Vec<Vec<u64>>,
    pub kv_cache: u64,
    /// Activations and other per-call buffers of the engine.
    pub scratch: u64,
    pub n_experts_used: usize,
}

impl ModelSizes {
    /// The sizes of a loaded model with a KV cache of `ctx` tokens and `scratch` bytes of buffers.
    pub fn of(weights: &ModelWeights, cfg: &ModelConfig, ctx: usize, scratch: u64) -> ModelSizes {
        let norms = (2 * cfg.n_layers + 1) * cfg.hidden_size * 4;
        let mut dense = weights.token_embd.data.len() + weights.output.data.len() + norms;
        for l in &weights.layers {
            dense += [l.attn_q, l.attn_k, l.attn_v, l.attn_output, l.router]
                .iter()
                .map(|m| m.data.len())
                .sum::<usize>();
        }
        ModelSizes {
            dense: dense as u64,
            token_embd: weights.token_embd.data.len() as u64,
            experts: weights
                .layers
                .iter()
                .map(|l| l.experts.iter().map(|e| ExpertLayout::of(e).bytes as u64).collect())
                .collect(),
            kv_cache: kv_cache_bytes(cfg, ctx),
            scratch,
            n_experts_used: cfg.n_experts_used,
        }
    }
}

impl ModelSizes {
    /// The sizes a `cfg` model quantized for `target` will have (the quantizer's own type choices),
    /// without the file: what `plan --shape` works from.
    pub fn predicted(cfg: &ModelConfig, target: Target, ctx: usize, scratch: u64) -> Result<ModelSizes> {
        let mut dense = 0u64;
        let mut token_embd = 0u64;
        // `[layer][matrix]`: one expert's gate, up and down bytes.
        let mut expert_parts = vec![[0usize; 3]; cfg.n_layers];
        for (name, dims, ty) in tensor_types(cfg, target) {
            let row = ty.bytes_for(dims[0] as usize).with_context(|| format!("{name}: rows of {ty}"))?;
            let rows: u64 = dims[1..].iter().product();
            let bytes = row as u64 * rows;
            match names::split_layer_tensor(&name) {
                Some((l, t)) if t.is_expert() => {
                    let k = match t {
                        LayerTensor::FfnGateExps => 0,
                        LayerTensor::FfnUpExps => 1,
                        _ => 2,
                    };
                    expert_parts[l][k] = (bytes / cfg.n_experts as u64) as usize;
                }
                _ => {
                    dense += bytes;
                    if name == names::TOKEN_EMBD {
                        token_embd = bytes;
                    }
                }
            }
        }
        Ok(ModelSizes {
            dense,
            token_embd,
            experts: expert_parts
                .iter()
                .map(|parts| vec![ExpertLayout::from_sizes(*parts).bytes as u64; cfg.n_experts])
                .collect(),
            kv_cache: kv_cache_bytes(cfg, ctx),
            scratch,
            n_experts_used: cfg.n_experts_used,
        })
    }

    /// Bytes of all experts.
    pub fn all_experts(&self) -> u64 {
        self.experts.iter().flatten().sum()
    }
}

/// The (layer, expert) pairs most routed to first, from `experts[token][layer]` (a routing trace):
/// the order [`Plan::with_priority`] places experts in. Ties (and experts never routed to) keep the
/// spread order: expert 0 of every layer, then expert 1, ...
pub fn by_frequency(experts: &[Vec<Vec<usize>>], n_layers: usize, n_experts: usize) -> Vec<(usize, usize)> {
    let mut count = vec![vec![0u64; n_experts]; n_layers];
    for token in experts {
        for (l, ids) in token.iter().enumerate().take(n_layers) {
            for &e in ids.iter().filter(|&&e| e < n_experts) {
                count[l][e] += 1;
            }
        }
    }
    let mut order: Vec<(usize, usize)> =
        (0..n_experts).flat_map(|e| (0..n_layers).map(move |l| (l, e))).collect();
    // A stable sort keeps the spread order among equals.
    order.sort_by_key(|&(l, e)| std::cmp::Reverse(count[l][e]));
    order
}

/// Bytes of an f16 KV cache of `ctx` tokens.
pub fn kv_cache_bytes(cfg: &ModelConfig, ctx: usize) -> u64 {
    2 * cfg.n_layers as u64 * ctx as u64 * cfg.kv_dim() as u64 * 2
}

/// What lives where.
#[derive(Clone, Debug)]
pub struct Plan {
    pub budget: u64,
    pub dense: u64,
    pub kv_cache: u64,
    pub scratch: u64,
    /// `[layer][expert]`: true when the expert is uploaded at load and stays in VRAM.
    pub resident: Vec<Vec<bool>>,
    pub resident_bytes: u64,
    /// VRAM slots that host-resident experts are copied into on demand (0 when all are resident).
    pub n_slots: usize,
    pub slot_bytes: u64,
}

impl Plan {
    pub fn new(sizes: &ModelSizes, budget: u64) -> Result<Plan> {
        Self::with_gpu_layers(sizes, budget, None)
    }

    /// Like [`Plan::new`], with the experts of only the first `gpu_layers` layers allowed to stay in
    /// VRAM (llama.cpp's `-ngl N`: N layers' weights on the GPU). Attention, norms, routers and the KV
    /// cache of every layer are on the GPU regardless (the engine computes them there); the experts of
    /// the other layers stay in host memory and are streamed through the cache slots.
    pub fn with_gpu_layers(sizes: &ModelSizes, budget: u64, gpu_layers: Option<usize>) -> Result<Plan> {
        Self::with_priority(sizes, budget, gpu_layers, None)
    }

    /// Like [`Plan::with_gpu_layers`], placing experts in the order `priority` gives ((layer, expert)
    /// pairs, e.g. [`by_frequency`] of a routing trace: the experts routed to most stay in VRAM);
    /// without it, spread over the layers by index.
    pub fn with_priority(
        sizes: &ModelSizes,
        budget: u64,
        gpu_layers: Option<usize>,
        priority: Option<&[(usize, usize)]>,
    ) -> Result<Plan> {
        let gpu_layers = gpu_layers.unwrap_or(usize::MAX);
        let base = sizes.dense + sizes.kv_cache + sizes.scratch;
        let all_experts: u64 = sizes.experts.iter().flatten().sum();
        let largest = sizes.experts.iter().flatten().copied().max().unwrap_or(0);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut plan = Plan {
            budget,
            dense: sizes.dense,
            kv_cache: sizes.kv_cache,
            scratch: sizes.scratch,
            resident: sizes.experts.iter().map(|l| vec![false; l.len()]).collect(),
            resident_bytes: 0,
            n_slots: 0,
            slot_bytes: 0,
        };
        if base + all_experts <= budget && gpu_layers >= sizes.experts.len() {
            plan.resident.iter_mut().flatten().for_each(|r| *r = true);
            plan.resident_bytes = all_experts;
            return Ok(plan);
        }
        let min_slots = sizes.n_experts_used.max(1) as u64;
        if base + min_slots * largest > budget {
            bail!(
                "a VRAM budget of {:.2} GiB is too small: attention, KV cache and buffers take {:.2} GiB, \
                 plus {:.2} GiB for {min_slots} expert slots (use a smaller --ctx, or the CPU)",
                gib(budget),
                gib(base),
                gib(min_slots * largest)
            );
        }
        let mut left = budget - base - min_slots * largest;
        let n_experts = sizes.experts.iter().map(Vec::len).max().unwrap_or(0);
        let spread: Vec<(usize, usize)> =
            (0..n_experts).flat_map(|e| (0..sizes.experts.len()).map(move |l| (l, e))).collect();
        for &(l, e) in priority.unwrap_or(&spread) {
            if l >= gpu_layers || plan.resident.get(l).and_then(|r| r.get(e)) != Some(&false) {
                continue;
            }
            let bytes = sizes.experts[l][e];
            if bytes <= left {
                left -= bytes;
                plan.resident[l][e] = true;
                plan.resident_bytes += bytes;
            }
        }
        plan.slot_bytes = largest;
        plan.n_slots = (min_slots + left / largest.max(1)) as usize;
        Ok(plan)
    }

    pub fn resident_experts(&self) -> usize {
        self.resident.iter().flatten().filter(|&&r| r).count()
    }

    /// Experts in VRAM, per layer.
    pub fn resident_per_layer(&self) -> Vec<usize> {
        self.resident.iter().map(|l| l.iter().filter(|&&r| r).count()).collect()
    }

    pub fn total_experts(&self) -> usize {
        self.resident.iter().map(Vec::len).sum()
    }

    pub fn all_resident(&self) -> bool {
        self.n_slots == 0
    }

    /// VRAM the plan uses in total.
    pub fn vram_bytes(&self) -> u64 {
        self.dense
            + self.kv_cache
            + self.scratch
            + self.resident_bytes
            + self.n_slots as u64 * self.slot_bytes
    }
}

/// The summary printed at load.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        writeln!(f, "VRAM plan: {:.2} of {:.2} GiB budget", gib(self.vram_bytes()), gib(self.budget))?;
        writeln!(
            f,
            "  attention, norms, routers, embeddings, output: {:.2} GiB; KV cache (f16): {:.2} GiB; buffers: {:.2} GiB",
            gib(self.dense),
            gib(self.kv_cache),
            gib(self.scratch)
        )?;
        write!(
            f,
            "  experts in VRAM: {} of {} ({:.2} GiB)",
            self.resident_experts(),
            self.total_experts(),
            gib(self.resident_bytes)
        )?;
        if self.n_slots > 0 {
            write!(
                f,
                "; the other {} stay in host memory, streamed through {} cache slots ({:.2} GiB)",
                self.total_experts() - self.resident_experts(),
                self.n_slots,
                gib(self.n_slots as u64 * self.slot_bytes)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::GgmlType;
    use crate::model::names::LayerTensor;

    const GIB: u64 = 1 << 30;

    /// A Mixtral as llama.cpp's Q4_K_M lays it out (experts Q4_K, attention q Q4_K, k/v Q8_0,
    /// output Q5_K, embeddings Q4_K, head Q6_K), with a 4096-token context.
    fn q4_k_m_sizes(cfg: &ModelConfig) -> ModelSizes {
        let bytes = |ty: GgmlType, rows: usize, cols: usize| (rows * ty.bytes_for(cols).unwrap()) as u64;
        let (h, f) = (cfg.hidden_size, cfg.ffn_size);
        let attn = bytes(GgmlType::Q4_K, cfg.q_dim(), h)
            + 2 * bytes(GgmlType::Q8_0, cfg.kv_dim(), h)
            + bytes(GgmlType::Q5_K, h, cfg.q_dim())
            + bytes(GgmlType::F32, cfg.n_experts, h);
        let dense = cfg.n_layers as u64 * attn
            + bytes(GgmlType::Q4_K, cfg.vocab_size, h)
            + bytes(GgmlType::Q6_K, cfg.vocab_size, h);
        let shape = cfg.layer_tensor_shape(LayerTensor::FfnGateExps);
        assert_eq!(shape, vec![f, h]);
        let expert = ExpertLayout::from_sizes([
            bytes(GgmlType::Q4_K, f, h) as usize,
            bytes(GgmlType::Q4_K, f, h) as usize,
            bytes(GgmlType::Q4_K, h, f) as usize,
        ]);
        ModelSizes {
            dense,
            token_embd: bytes(GgmlType::Q4_K, cfg.vocab_size, h),
            experts: vec![vec![expert.bytes as u64; cfg.n_experts]; cfg.n_layers],
            kv_cache: kv_cache_bytes(cfg, 4096),
            scratch: 256 << 20,
            n_experts_used: cfg.n_experts_used,
        }
    }

    fn mixtral_sizes() -> ModelSizes {
        q4_k_m_sizes(&ModelConfig::mixtral_8x7b(32))
    }

    #[test]
    fn mixtral_expert_is_about_99_mb_and_kv_cache_128_kib_per_token() {
        let s = mixtral_sizes();
        let e = s.experts[0][0] as f64 / 1e6;
        assert!((e - 99.1).abs() < 0.5, "{e} MB");
        assert_eq!(s.kv_cache, 4096 * 128 * 1024);
    }

    #[test]
    fn a_24_gb_card_keeps_some_experts_on_the_host() {
        let s = mixtral_sizes();
        let plan = Plan::new(&s, 24 * GIB).unwrap();
        let resident = plan.resident_experts();
        assert!(resident > 150 && resident < 256, "{resident}");
        assert!(plan.n_slots >= 2);
        assert!(plan.vram_bytes() <= 24 * GIB);
        // Nothing more fits: one more expert would break the budget.
        assert!(plan.vram_bytes() + s.experts[0][0] > 24 * GIB);
        // Spread over the layers: every layer keeps within one expert of the others.
        let per_layer = plan.resident_per_layer();
        let (lo, hi) = (per_layer.iter().min().unwrap(), per_layer.iter().max().unwrap());
        assert!(hi - lo <= 1, "{per_layer:?}");
        let summary = plan.to_string();
        assert!(summary.contains(&format!("experts in VRAM: {resident} of 256")), "{summary}");
        assert!(summary.contains("host memory"), "{summary}");
    }

    #[test]
    fn an_80_gb_card_holds_everything() {
        let s = mixtral_sizes();
        let plan = Plan::new(&s, 80 * GIB).unwrap();
        assert!(plan.all_resident());
        assert_eq!(plan.resident_experts(), 256);
        assert_eq!(plan.n_slots, 0);
        assert!(plan.vram_bytes() < 80 * GIB && plan.vram_bytes() > 24 * GIB);
        assert!(!plan.to_string().contains("host memory"));
    }

    #[test]
    fn a_small_budget_streams_every_expert_and_a_tiny_one_is_refused() {
        let s = mixtral_sizes();
        let base = s.dense + s.kv_cache + s.scratch;
        let plan = Plan::new(&s, base + 2 * s.experts[0][0] + 10).unwrap();
        assert_eq!((plan.resident_experts(), plan.n_slots), (0, 2));
        let plan = Plan::new(&s, base + 5 * s.experts[0][0]).unwrap();
        assert_eq!(plan.resident_experts() + plan.n_slots, 5);
        let err = Plan::new(&s, base).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
    }

    #[test]
    fn gpu_layers_keep_only_those_layers_experts_resident() {
        let s = mixtral_sizes();
        // 80 GB holds everything, but -ngl 10 keeps the experts of layers 0-9 only.
        let plan = Plan::with_gpu_layers(&s, 80 * GIB, Some(10)).unwrap();
        let per_layer = plan.resident_per_layer();
        assert_eq!(per_layer, [vec![8; 10], vec![0; 22]].concat());
        assert!(!plan.all_resident() && plan.n_slots >= 2);
        assert!(plan.to_string().contains("experts in VRAM: 80 of 256"), "{plan}");
        // More layers than the model has: as without the limit; a small budget still limits.
        let all = Plan::with_gpu_layers(&s, 80 * GIB, Some(99)).unwrap();
        assert!(all.all_resident());
        let small = Plan::with_gpu_layers(&s, 24 * GIB, Some(32)).unwrap();
        assert_eq!(small.resident_experts(), Plan::new(&s, 24 * GIB).unwrap().resident_experts());
        let none = Plan::with_gpu_layers(&s, 80 * GIB, Some(0)).unwrap();
        assert_eq!(none.resident_experts(), 0);
    }

    #[test]
    fn sizes_of_a_real_file_account_for_every_tensor() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llamacpp/tiny-q4_k_m.gguf");
        let model = crate::model::weights::Model::load(&path).unwrap();
        let w = model.weights().unwrap();
        let s = ModelSizes::of(&w, &model.config, 64, 0);
        let unpadded: usize = w
            .layers
            .iter()
            .flat_map(|l| &l.experts)
            .map(|e| e.gate.data.len() + e.up.data.len() + e.down.data.len())
            .sum();
        let file_total: u64 = model.file.tensors.iter().map(|t| t.n_bytes()).sum();
        assert_eq!(s.dense + unpadded as u64, file_total);
        let padded: u64 = s.experts.iter().flatten().sum();
        assert!(padded >= unpadded as u64 && padded < unpadded as u64 + 3 * 256 * 16);
        assert_eq!(s.kv_cache, kv_cache_bytes(&model.config, 64));
        let all = Plan::new(&s, u64::MAX).unwrap();
        assert!(all.all_resident());
    }

    /// Mixtral-8x22B (56 layers, hidden 6144, FFN 16384, 48/8 heads, vocab 32768) through the same
    /// arithmetic: its shapes come from the config alone.
    #[test]
    fn mixtral_8x22b_in_the_placement_arithmetic() {
        let cfg = ModelConfig::mixtral_8x22b(56);
        assert_eq!(
            (cfg.n_layers, cfg.hidden_size, cfg.ffn_size, cfg.n_heads, cfg.n_kv_heads),
            (56, 6144, 16384, 48, 8)
        );
        let p = cfg.n_params() as f64 / 1e9;
        assert!((p - 140.6).abs() < 0.2, "{p}B parameters");
        let s = q4_k_m_sizes(&cfg);
        // One expert: 3 matrices of 16384x6144 at 4.5 bits = 169.9 MB; 448 of them.
        let e = s.experts[0][0] as f64 / 1e6;
        assert!((e - 169.9).abs() < 0.5, "{e} MB");
        assert_eq!(s.experts.iter().flatten().count(), 448);
        // KV cache: 56 layers x 1024 (8 KV heads x 128) x 2 (k, v) x 2 bytes = 224 KiB per token.
        assert_eq!(s.kv_cache, 4096 * 224 * 1024);
        let all_experts: u64 = s.experts.iter().flatten().sum();
        assert!((all_experts as f64 / GIB as f64 - 70.9).abs() < 0.1);
        // 75.4 GiB in all: an 80 GiB budget holds everything, 64 GiB leaves about 70 experts out.
        assert!(Plan::new(&s, 80 * GIB).unwrap().all_resident());
        let h = Plan::new(&s, 64 * GIB).unwrap();
        assert!(!h.all_resident() && (370..390).contains(&h.resident_experts()), "{}", h.resident_experts());
        // A 24 GB card: attention and the rest take ~4.5 GiB, so about 120 experts fit, spread evenly.
        let plan = Plan::new(&s, 24 * GIB).unwrap();
        let resident = plan.resident_experts();
        assert!((100..140).contains(&resident), "{resident}");
        assert!(plan.vram_bytes() <= 24 * GIB && plan.vram_bytes() + s.experts[0][0] > 24 * GIB);
        let per_layer = plan.resident_per_layer();
        assert!(per_layer.iter().max().unwrap() - per_layer.iter().min().unwrap() <= 1, "{per_layer:?}");
    }

    #[test]
    fn layout_aligns_every_matrix() {
        let l = ExpertLayout::from_sizes([1000, 256, 10]);
        assert_eq!(l.offsets, [0, 1024, 1280]);
        assert_eq!(l.bytes, 1536);
    }
}
