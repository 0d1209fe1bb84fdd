//! Whether a model fits a card with nothing left in host memory, and up to what context: the longest
//! KV cache with which the placement plan keeps every expert resident (what `info` prints per preset).

use serde::Serialize;

use super::predict::PRESETS;
use super::{default_budget, kv_cache_bytes, ModelSizes, Plan, DEFAULT_RESERVE};
use crate::model::ModelConfig;

/// The longest context, at most `max_ctx` tokens, with which `sizes` (its KV cache resized to the
/// context) fits `budget` entirely on the GPU; `None` when not even one token does.
pub fn max_resident_context(
    sizes: &ModelSizes,
    cfg: &ModelConfig,
    budget: u64,
    max_ctx: usize,
) -> Option<usize> {
    let fits = |ctx: usize| {
        let sized = ModelSizes { kv_cache: kv_cache_bytes(cfg, ctx), ..sizes.clone() };
        Plan::new(&sized, budget).is_ok_and(|plan| plan.all_resident())
    };
    if max_ctx == 0 || !fits(1) {
        return None;
    }
    if fits(max_ctx) {
        return Some(max_ctx);
    }
    // A longer cache only takes more memory: bisect between a context that fits and one that does not.
    let (mut fitting, mut too_long) = (1, max_ctx);
    while too_long - fitting > 1 {
        let mid = fitting + (too_long - fitting) / 2;
        if fits(mid) {
            fitting = mid;
        } else {
            too_long = mid;
        }
    }
    Some(fitting)
}

/// How a model fits one preset's card.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CardFit {
    pub preset: &'static str,
    pub vram: u64,
    /// Longest context with the whole card as the budget (`plan --vram` of the card's size).
    pub whole_card: Option<usize>,
    /// Longest context with the default budget, the card less [`DEFAULT_RESERVE`] (what `plan
    /// --preset` and the CUDA engine use unless told otherwise).
    pub default_budget: Option<usize>,
}

/// The fit on every preset's card, contexts capped at the model's own context length.
pub fn preset_fits(sizes: &ModelSizes, cfg: &ModelConfig) -> Vec<CardFit> {
    PRESETS
        .iter()
        .map(|p| {
            let vram = p.machine().vram;
            CardFit {
                preset: p.name,
                vram,
                whole_card: max_resident_context(sizes, cfg, vram, cfg.context_length),
                default_budget: max_resident_context(sizes, cfg, default_budget(vram), cfg.context_length),
            }
        })
        .collect()
}

/// The reserve [`CardFit::default_budget`] leaves, in MiB (for what `info` prints).
pub const DEFAULT_RESERVE_MIB: u64 = DEFAULT_RESERVE >> 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::Target;

    const GIB: u64 = 1 << 30;
    const SCRATCH: u64 = 256 << 20;

    fn mixtral(target: Target) -> (ModelConfig, ModelSizes) {
        let cfg = ModelConfig::mixtral_8x7b(32);
        let sizes = ModelSizes::predicted(&cfg, target, 1, SCRATCH).unwrap();
        (cfg, sizes)
    }

    /// The bisection finds the context the arithmetic gives: what is left of the budget after the
    /// weights and buffers, in whole tokens of KV cache.
    #[test]
    fn the_longest_context_is_the_arithmetic() {
        let (cfg, sizes) = mixtral(Target::Q2KS);
        let weights = sizes.dense + sizes.all_experts() + sizes.scratch;
        let per_token = kv_cache_bytes(&cfg, 1);
        let by_hand = ((16 * GIB - weights) / per_token) as usize;
        assert_eq!(max_resident_context(&sizes, &cfg, 16 * GIB, 1 << 20), Some(by_hand));
        assert!(by_hand >= 4096, "{by_hand}");
        // Capped at the maximum asked for; nothing when the weights alone do not fit.
        assert_eq!(max_resident_context(&sizes, &cfg, 16 * GIB, 1000), Some(1000));
        assert_eq!(max_resident_context(&sizes, &cfg, weights, 1 << 20), None);
        assert_eq!(max_resident_context(&sizes, &cfg, weights + per_token, 1 << 20), Some(1));
    }

    #[test]
    fn q2_k_s_fits_the_16_gib_card_and_q2_k_does_not() {
        let (cfg, sizes) = mixtral(Target::Q2KS);
        let fits = preset_fits(&sizes, &cfg);
        let card = |name: &str| fits.iter().find(|f| f.preset == name).unwrap().clone();
        let sixteen = card("rtx4060ti-16g");
        assert_eq!(sixteen.vram, 16 * GIB);
        assert!(sixteen.whole_card.unwrap() >= 4096, "{sixteen:?}");
        // The default budget keeps 768 MiB free: the same card holds far less context then.
        assert!(sixteen.default_budget.unwrap() < sixteen.whole_card.unwrap(), "{sixteen:?}");
        assert_eq!(card("rtx3060").whole_card, None);
        assert_eq!(card("rtx4090").default_budget, Some(cfg.context_length));
        let (cfg, q2_k) = mixtral(Target::Q2K);
        assert_eq!(max_resident_context(&q2_k, &cfg, 16 * GIB, 4096), None);
    }
}
