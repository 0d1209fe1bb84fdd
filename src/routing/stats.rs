//! The routing analysis of the Mixtral paper (Jiang et al. 2024, §5) over a [`RoutingTrace`]:
//! how the tokens spread over the experts per layer (Fig. 7), and how often consecutive tokens go to
//! the same experts (Table 5), beside what chance gives.
//!
//! Chance is the paper's: tokens routed uniformly and independently, so two consecutive tokens share
//! their first choice with probability 1/E and share at least one of their top-k experts with
//! probability 1 − C(E−k, k)/C(E, k) (12.5% and 46.4% for 8 experts, top-2). A rate is *above chance*
//! when a one-sided binomial z-test over the consecutive pairs gives z > [`Z_ABOVE_CHANCE`].
//!
//! Uneven expert load raises the rates above that chance without any order in the routing (a popular
//! expert meets itself often), so each layer also gets a *shuffled* baseline: the rates expected if
//! its tokens kept their experts but came in random order. What lies above it comes from the order.
//!
//! Random weights are not at chance on real text either (measured on the tiny random model over
//! valid.txt: 16-20% first-choice repetition against 12.5%, above its shuffled baseline too): repeated
//! tokens route alike, and neighbours share most of their attention context. They come near chance
//! only for random tokens over a long context (13.5% there, at the shuffled baseline). [`NOTE`] says
//! so in the output.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use serde::Serialize;

use super::trace::RoutingTrace;

/// z-score above which a repetition rate counts as above chance (p < 0.0014, one-sided).
pub const Z_ABOVE_CHANCE: f64 = 3.0;

/// How to read the rates, printed with them.
pub const NOTE: &str = "Chance is uniform, independent routing. Random weights come near it only on random \
tokens over a long context; on real text they repeat above chance too (repeated tokens route alike, neighbours share their \
attention context), so compare a trained model with random weights on the same text, not with chance alone. \
\"Shuffled\" is the rate the layer's expert loads alone would give, the tokens in random order.";

#[derive(Clone, Debug, Serialize)]
pub struct RoutingStats {
    pub tokens: usize,
    /// Consecutive token pairs (tokens − 1): the sample size of the repetition rates.
    pub pairs: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Share of tokens per expert if routing were uniform: 1/E as first choice, k/E among the top-k.
    pub uniform_share_first: f64,
    pub uniform_share_any: f64,
    /// Chance rates of Table 5: same first choice 1/E; top-k sets sharing an expert 1 − C(E−k,k)/C(E,k).
    pub chance_repeat_first: f64,
    pub chance_repeat_any: f64,
    pub z_above_chance: f64,
    pub layers: Vec<LayerStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerStats {
    pub layer: usize,
    /// `[expert]`: share of tokens whose first choice is the expert (sums to 1).
    pub share_first: Vec<f64>,
    /// `[expert]`: share of tokens with the expert among their top-k (sums to k).
    pub share_any: Vec<f64>,
    /// Share of consecutive pairs with the same first choice.
    pub repeat_first: f64,
    /// Share of consecutive pairs whose top-k sets share at least one expert.
    pub repeat_any: f64,
    /// z-scores of the two rates against the chance rates.
    pub z_first: f64,
    pub z_any: f64,
    pub repeat_first_above_chance: bool,
    pub repeat_any_above_chance: bool,
    /// The rates expected with this layer's expert loads if the tokens came in random order.
    pub shuffled_repeat_first: f64,
    pub shuffled_repeat_any: f64,
}

impl LayerStats {
    pub fn above_chance(&self) -> bool {
        self.repeat_first_above_chance || self.repeat_any_above_chance
    }
}

/// P(two independent uniform top-k sets of `n_experts` share an expert) = 1 − C(E−k, k)/C(E, k).
pub fn chance_share_any(n_experts: usize, top_k: usize) -> f64 {
    if 2 * top_k > n_experts {
        return 1.0;
    }
    // C(E−k, k)/C(E, k) = Π_{i<k} (E−k−i)/(E−i).
    1.0 - (0..top_k).map(|i| (n_experts - top_k - i) as f64 / (n_experts - i) as f64).product::<f64>()
}

/// One-sided binomial z-score of `rate` over `n` trials against probability `p` (0 when p is 0 or 1).
fn z_score(rate: f64, p: f64, n: usize) -> f64 {
    let var = p * (1.0 - p) / n as f64;
    if var <= 0.0 {
        return 0.0;
    }
    (rate - p) / var.sqrt()
}

impl RoutingStats {
    pub fn of(trace: &RoutingTrace) -> Result<RoutingStats> {
        let n = trace.tokens.len();
        ensure!(n >= 2, "routing statistics need at least 2 tokens, the text has {n}");
        let (e, k) = (trace.n_experts, trace.top_k);
        let pairs = n - 1;
        let chance_first = 1.0 / e as f64;
        let chance_any = chance_share_any(e, k);
        let layers = (0..trace.n_layers)
            .map(|l| {
                let choices: Vec<&[usize]> = trace.layer(l).collect();
                let mut first = vec![0usize; e];
                let mut any = vec![0usize; e];
                for c in &choices {
                    first[c[0]] += 1;
                    for &x in *c {
                        any[x] += 1;
                    }
                }
                let shares = |counts: Vec<usize>| counts.into_iter().map(|c| c as f64 / n as f64).collect();
                let rate = |hit: &dyn Fn(&[usize], &[usize]) -> bool| {
                    choices.windows(2).filter(|w| hit(w[0], w[1])).count() as f64 / pairs as f64
                };
                let same_first = |a: &[usize], b: &[usize]| a[0] == b[0];
                let (repeat_first, repeat_any) = (rate(&same_first), rate(&shares_an_expert));
                let (shuffled_repeat_first, shuffled_repeat_any) = shuffled_rates(&choices, &first);
                let (z_first, z_any) =
                    (z_score(repeat_first, chance_first, pairs), z_score(repeat_any, chance_any, pairs));
                LayerStats {
                    layer: l,
                    share_first: shares(first),
                    share_any: shares(any),
                    repeat_first,
                    repeat_any,
                    z_first,
                    z_any,
                    repeat_first_above_chance: z_first > Z_ABOVE_CHANCE,
                    repeat_any_above_chance: z_any > Z_ABOVE_CHANCE,
                    shuffled_repeat_first,
                    shuffled_repeat_any,
                }
            })
            .collect();
        Ok(RoutingStats {
            tokens: n,
            pairs,
            n_experts: e,
            top_k: k,
            uniform_share_first: chance_first,
            uniform_share_any: k as f64 / e as f64,
            chance_repeat_first: chance_first,
            chance_repeat_any: chance_any,
            z_above_chance: Z_ABOVE_CHANCE,
            layers,
        })
    }

    /// Layers where a repetition rate is above chance.
    pub fn layers_above_chance(&self) -> Vec<usize> {
        self.layers.iter().filter(|l| l.above_chance()).map(|l| l.layer).collect()
    }

    /// What the repetition rates say, in a sentence or two, for the command's output.
    pub fn verdict(&self) -> String {
        let above: Vec<&LayerStats> = self.layers.iter().filter(|l| l.above_chance()).collect();
        if above.is_empty() {
            return format!(
                "Repetition is at chance in every layer (z <= {Z_ABOVE_CHANCE} over {} pairs): consecutive tokens are \
                 routed independently of each other, as random weights route random tokens; an expert cache gains \
                 nothing from recency on this text.",
                self.pairs
            );
        }
        let list = if above.len() == self.layers.len() && above.len() > 1 {
            format!("all {} layers", self.layers.len())
        } else {
            let ids = above.iter().map(|l| l.layer.to_string()).collect::<Vec<_>>();
            format!("layer{} {}", if ids.len() == 1 { "" } else { "s" }, ids.join(", "))
        };
        let mean =
            |f: &dyn Fn(&LayerStats) -> f64| above.iter().map(|l| f(l)).sum::<f64>() / above.len() as f64;
        format!(
            "Repetition is above chance in {list} (z > {Z_ABOVE_CHANCE} over {} pairs): an expert cache \
             keeping the previous token's experts hits more often than by chance. There, the same first choice \
             comes {:.1}% of the time and a shared expert {:.1}% (chance {:.1}% and {:.1}%; the expert loads alone, \
             in shuffled order, give {:.1}% and {:.1}%).",
            self.pairs,
            100.0 * mean(&|l| l.repeat_first),
            100.0 * mean(&|l| l.repeat_any),
            100.0 * self.chance_repeat_first,
            100.0 * self.chance_repeat_any,
            100.0 * mean(&|l| l.shuffled_repeat_first),
            100.0 * mean(&|l| l.shuffled_repeat_any),
        )
    }
}

fn shares_an_expert(a: &[usize], b: &[usize]) -> bool {
    a.iter().any(|x| b.contains(x))
}

/// The expected repetition rates of a random order of the same tokens (any two different positions):
/// same first choice Σ c_e(c_e − 1) / n(n − 1); sharing an expert, over the distinct top-k sets S, T
/// with counts c: Σ_{S∩T≠∅} c_S (c_T − [S = T]) / n(n − 1).
fn shuffled_rates(choices: &[&[usize]], first_counts: &[usize]) -> (f64, f64) {
    let n = choices.len() as f64;
    let ordered_pairs = n * (n - 1.0);
    let first = first_counts.iter().map(|&c| c as f64 * (c as f64 - 1.0)).sum::<f64>() / ordered_pairs;
    let mut sets: HashMap<Vec<usize>, usize> = HashMap::new();
    for c in choices {
        let mut s = c.to_vec();
        s.sort_unstable();
        *sets.entry(s).or_default() += 1;
    }
    let sets: Vec<(Vec<usize>, usize)> = sets.into_iter().collect();
    let mut any = 0.0;
    for (i, (s, cs)) in sets.iter().enumerate() {
        for (j, (t, ct)) in sets.iter().enumerate() {
            if shares_an_expert(s, t) {
                any += *cs as f64 * (*ct as f64 - if i == j { 1.0 } else { 0.0 });
            }
        }
    }
    (first, any / ordered_pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(layer0: &[[usize; 2]]) -> RoutingTrace {
        let experts = layer0.iter().map(|c| vec![c.to_vec()]).collect();
        let tokens = (0..layer0.len() as u32).collect();
        RoutingTrace::new("t", 1, 8, 2, tokens, Vec::new(), experts).unwrap()
    }

    #[test]
    fn chance_rates_of_the_paper() {
        assert!((chance_share_any(8, 2) - (1.0 - 15.0 / 28.0)).abs() < 1e-12); // 46.4%
        assert!((chance_share_any(8, 1) - 0.125).abs() < 1e-12);
        assert!(
            (chance_share_any(64, 6) - (1.0 - (59..=64).map(|x| (x - 6) as f64 / x as f64).product::<f64>()))
                .abs()
                < 1e-12
        );
        assert_eq!(chance_share_any(4, 3), 1.0);
    }

    #[test]
    fn counts_shares_and_repetitions() {
        // Pairs: (0,1)->(0,2) same first; (0,2)->(3,0) share 0; (3,0)->(4,5) nothing.
        let stats = RoutingStats::of(&trace(&[[0, 1], [0, 2], [3, 0], [4, 5]])).unwrap();
        let l = &stats.layers[0];
        assert_eq!(stats.pairs, 3);
        assert_eq!(l.share_first, [0.5, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0]);
        assert_eq!(l.share_any[0], 0.75);
        assert!((l.share_any.iter().sum::<f64>() - 2.0).abs() < 1e-12);
        assert!((l.repeat_first - 1.0 / 3.0).abs() < 1e-12);
        assert!((l.repeat_any - 2.0 / 3.0).abs() < 1e-12);
        // Shuffled: first choices {0,0,3,4}: 2 of 12 ordered pairs; sets {01,02,03,45}: 01/02/03 pairwise
        // share 0 (6 ordered pairs), 45 shares with none.
        assert!((l.shuffled_repeat_first - 2.0 / 12.0).abs() < 1e-12);
        assert!((l.shuffled_repeat_any - 6.0 / 12.0).abs() < 1e-12);
        assert!(RoutingStats::of(&trace(&[[0, 1]])).is_err());
    }

    #[test]
    fn sticky_routing_is_above_chance_and_a_rotation_is_not() {
        // The same pair for 200 tokens: every rate 1, far above chance.
        let sticky = RoutingStats::of(&trace(&[[2, 5]; 200])).unwrap();
        assert!(sticky.layers[0].repeat_first_above_chance && sticky.layers[0].repeat_any_above_chance);
        assert_eq!(sticky.layers_above_chance(), [0]);
        // Uniform load and no repetition at all: at chance (below, in fact).
        let rotation: Vec<[usize; 2]> = (0..200).map(|t| [(2 * t) % 8, (2 * t + 1) % 8]).collect();
        let rot = RoutingStats::of(&trace(&rotation)).unwrap();
        assert!(!rot.layers[0].above_chance());
        assert!(rot.verdict().contains("at chance in every layer"), "{}", rot.verdict());
        // One expert everywhere as first choice, second choices cycling: above the uniform chance, and
        // the shuffled order repeats as often (the load explains it).
        let loaded: Vec<[usize; 2]> = (0..200).map(|t| [0, 1 + t % 7]).collect();
        let s = RoutingStats::of(&trace(&loaded)).unwrap();
        assert!(s.layers[0].above_chance());
        assert!((s.layers[0].shuffled_repeat_first - 1.0).abs() < 1e-12);
        assert!(s.verdict().contains("above chance in layer 0 ("), "{}", s.verdict());
    }

    #[test]
    fn runs_of_experts_repeat_far_above_their_shuffled_order() {
        // Uniform load over the text, each pair of experts held for 5 tokens at a time.
        let runs: Vec<[usize; 2]> = (0..400).map(|t| [(t / 5) % 8, (t / 5 + 3) % 8]).collect();
        let l = &RoutingStats::of(&trace(&runs)).unwrap().layers[0];
        assert!((l.repeat_first - 320.0 / 399.0).abs() < 1e-12 && l.repeat_first_above_chance, "{l:?}");
        assert!(l.shuffled_repeat_first < 0.13 && l.shuffled_repeat_any < 0.5, "{l:?}");
    }
}
