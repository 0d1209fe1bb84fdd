//! Token sampling in llama.cpp's order: repeat penalty, top-k, top-p, min-p, temperature, draw.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. Defaults are llama.cpp's, except the seed: a fixed default (so runs are
/// reproducible unless the caller picks another seed).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 (or below): greedy, the highest logit (lowest id on ties).
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1.0: off.
    pub top_p: f32,
    /// 0.0: off. Keeps tokens with probability ≥ min_p × the top probability.
    pub min_p: f32,
    /// 1.0: off. Positive logits of recent tokens are divided by it, negative ones multiplied.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the repeat penalty looks at (0: none).
    pub repeat_last_n: usize,
    pub seed: u64,
}

pub const DEFAULT_SEED: u64 = 0x5EED;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: DEFAULT_SEED,
        }
    }
}

/// A sampling setting outside its range: which field, and the rule it breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidSampling {
    /// The field of [`SamplingParams`] (the REPL and the server name it their own way).
    pub field: &'static str,
    pub rule: &'static str,
}

impl std::fmt::Display for InvalidSampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.rule)
    }
}

impl std::error::Error for InvalidSampling {}

impl SamplingParams {
    /// The ranges every front end accepts (the REPL's `/set` and `/load`, the server's requests).
    pub fn check(&self) -> Result<(), InvalidSampling> {
        let invalid = |field, rule| Err(InvalidSampling { field, rule });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return invalid("temperature", "must be a number ≥ 0 (0 is greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", "must be in [0, 1]");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return invalid("repeat_penalty", "must be a number > 0 (1 is off)");
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// A candidate token and its logit.
type Candidate = (u32, f32);

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The next token given the logits over the vocabulary and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut candidates: Vec<Candidate> =
            logits.iter().enumerate().map(|(id, &l)| (id as u32, l)).collect();
        self.apply_repeat_penalty(&mut candidates, history);
        if self.params.temperature <= 0.0 {
            return candidates
                .iter()
                .copied()
                .reduce(|best, c| if c.1 > best.1 { c } else { best })
                .map_or(0, |c| c.0);
        }
        sort_top(&mut candidates, self.params.top_k);
        top_p(&mut candidates, self.params.top_p);
        min_p(&mut candidates, self.params.min_p);
        for c in candidates.iter_mut() {
            c.1 /= self.params.temperature;
        }
        let probs = softmax(&candidates);
        let mut r = self.rng.random::<f32>();
        for (c, p) in candidates.iter().zip(&probs) {
            if r < *p {
                return c.0;
            }
            r -= p;
        }
        // Rounding left r just above the total: the last candidate.
        candidates.last().map_or(0, |c| c.0)
    }

    fn apply_repeat_penalty(&self, candidates: &mut [Candidate], history: &[u32]) {
        let penalty = self.params.repeat_penalty;
        if penalty == 1.0 || self.params.repeat_last_n == 0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(self.params.repeat_last_n)..];
        for &id in recent.iter().collect::<HashSet<_>>() {
            if let Some(c) = candidates.get_mut(id as usize) {
                c.1 = if c.1 > 0.0 { c.1 / penalty } else { c.1 * penalty };
            }
        }
    }
}

/// Sorts by logit, highest first (lowest id on ties), keeping the top `k` (0: all).
fn sort_top(candidates: &mut Vec<Candidate>, k: usize) {
    let by_logit = |a: &Candidate, b: &Candidate| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, by_logit);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(by_logit);
}

/// Keeps the smallest head of the (sorted) candidates whose probability reaches `p`.
fn top_p(candidates: &mut Vec<Candidate>, p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(candidates);
    let mut cumulative = 0.0;
    let mut keep = candidates.len();
    for (i, prob) in probs.iter().enumerate() {
        cumulative += prob;
        if cumulative >= p {
            keep = i + 1;
            break;
        }
    }
    candidates.truncate(keep);
}

/// Keeps candidates with probability ≥ `p` × the top one's, i.e. logit ≥ top logit + ln p.
fn min_p(candidates: &mut Vec<Candidate>, p: f32) {
    if p <= 0.0 {
        return;
    }
    let Some(&(_, top)) = candidates.first() else { return };
    let threshold = top + p.ln();
    candidates.retain(|c| c.1 >= threshold);
}

/// Probabilities of sorted candidates (the first holds the highest logit).
fn softmax(candidates: &[Candidate]) -> Vec<f32> {
    let max = candidates.first().map_or(0.0, |c| c.1);
    let exps: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_field() {
        assert_eq!(SamplingParams::default().check(), Ok(()));
        let with = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.check().map_err(|e| e.field)
        };
        assert_eq!(with(&|p| p.temperature = 0.0), Ok(()));
        assert_eq!(with(&|p| p.temperature = -0.5), Err("temperature"));
        assert_eq!(with(&|p| p.temperature = f32::INFINITY), Err("temperature"));
        assert_eq!(with(&|p| p.top_p = 1.0), Ok(()));
        assert_eq!(with(&|p| p.top_p = 0.0), Err("top_p"));
        assert_eq!(with(&|p| p.top_p = f32::NAN), Err("top_p"));
        assert_eq!(with(&|p| p.min_p = -0.1), Err("min_p"));
        assert_eq!(with(&|p| p.repeat_penalty = 0.0), Err("repeat_penalty"));
    }
}
