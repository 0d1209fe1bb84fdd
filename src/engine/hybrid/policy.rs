//! Residency policies for expert slots, and a simulator that replays router traces through them.
//!
//! A device holds `capacity` experts at a time, each identified by its (layer, expert) [`Key`]. At
//! every use of an expert the policy is asked whether it is resident (a *hit*); on a *miss* it decides
//! whether to copy the expert in (a *load*, evicting another when full) or let the host compute it.
//! Decode is what the slots are for (a prompt batch reads each expert once for many tokens), so the
//! simulator replays a trace as decode steps: one token at a time, its layers in order.
//!
//! The policies:
//! - [`Lru`]: evicts the expert used least recently; always loads on a miss.
//! - [`Lfu`]: counts each expert's uses with exponential decay per token (so the ranking follows the
//!   text), evicts the lowest count, and loads a missing expert only when its count beats the
//!   lowest resident count (otherwise the host computes it): no thrashing on one-off experts.
//! - [`StaticPopular`]: the `capacity` experts used most often in a trace, loaded once, never
//!   changed — the placement-plan baseline; it costs no copies after load.
//! - [`RandomEvict`]: evicts a (seeded) random resident expert: the baseline a real policy must beat.

use std::collections::HashMap;

use crate::engine::RouterTrace;

/// One expert slot's identity: (layer, expert id).
pub type Key = (usize, usize);

/// What a policy did for one use of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Resident: runs on the device.
    Hit,
    /// Not resident; copied into a slot (evicting another when full).
    Load,
    /// Not resident; computed on the host, residency unchanged.
    Host,
}

/// Decides which experts are resident in a device's slots.
pub trait Policy {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    /// One use of `key`.
    fn access(&mut self, key: Key) -> Access;
    /// The end of one decode step (a token through every layer): where decay happens.
    fn end_step(&mut self) {}
    /// The keys resident now (what a device's slots must hold after the last access).
    fn resident(&self) -> Vec<Key>;
}

/// Least recently used, with a fixed number of slots.
pub struct Lru {
    capacity: usize,
    /// Resident key → the time of its last use.
    last_use: HashMap<Key, u64>,
    now: u64,
}

impl Lru {
    pub fn new(capacity: usize) -> Lru {
        Lru { capacity, last_use: HashMap::new(), now: 0 }
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn access(&mut self, key: Key) -> Access {
        self.now += 1;
        if let Some(t) = self.last_use.get_mut(&key) {
            *t = self.now;
            return Access::Hit;
        }
        if self.capacity == 0 {
            return Access::Host;
        }
        if self.last_use.len() == self.capacity {
            // Ties cannot happen: every use has its own time.
            let oldest = self.last_use.iter().min_by_key(|(_, &t)| t).map(|(&k, _)| k);
            if let Some(oldest) = oldest {
                self.last_use.remove(&oldest);
            }
        }
        self.last_use.insert(key, self.now);
        Access::Load
    }

    fn resident(&self) -> Vec<Key> {
        self.last_use.keys().copied().collect()
    }
}

/// Least frequently used, counts decayed by `decay` per decode step (1.0: plain LFU).
pub struct Lfu {
    capacity: usize,
    decay: f64,
    /// Every key seen → its decayed use count (resident or not: a missing expert must earn a slot).
    score: HashMap<Key, f64>,
    resident: Vec<Key>,
}

impl Lfu {
    /// `decay` in (0, 1]: a use `n` steps ago counts `decay^n`.
    pub fn new(capacity: usize, decay: f64) -> Lfu {
        assert!(decay > 0.0 && decay <= 1.0, "LFU decay {decay} is outside (0, 1]");
        Lfu { capacity, decay, score: HashMap::new(), resident: Vec::new() }
    }
}

impl Policy for Lfu {
    fn name(&self) -> &'static str {
        if self.decay < 1.0 {
            "lfu-decay"
        } else {
            "lfu"
        }
    }

    fn access(&mut self, key: Key) -> Access {
        let s = {
            let s = self.score.entry(key).or_insert(0.0);
            *s += 1.0;
            *s
        };
        if self.resident.contains(&key) {
            return Access::Hit;
        }
        if self.capacity == 0 {
            return Access::Host;
        }
        if self.resident.len() < self.capacity {
            self.resident.push(key);
            return Access::Load;
        }
        // The resident expert with the lowest score (the earliest admitted among equals).
        let score = |k: &Key| self.score.get(k).copied().unwrap_or(0.0);
        let (victim, low) = self
            .resident
            .iter()
            .enumerate()
            .map(|(i, k)| (i, score(k)))
            .fold((0, f64::INFINITY), |best, cur| if cur.1 < best.1 { cur } else { best });
        if s > low {
            self.resident[victim] = key;
            Access::Load
        } else {
            Access::Host
        }
    }

    fn resident(&self) -> Vec<Key> {
        self.resident.clone()
    }

    fn end_step(&mut self) {
        if self.decay < 1.0 {
            for s in self.score.values_mut() {
                *s *= self.decay;
            }
        }
    }
}

/// A fixed set of experts (the most used ones of a trace), never changed.
pub struct StaticPopular {
    resident: Vec<Key>,
}

impl StaticPopular {
    /// The `capacity` keys used most often in `steps`; ties go to the lower (layer, expert).
    pub fn from_steps(steps: &[Vec<Key>], capacity: usize) -> StaticPopular {
        let mut counts: HashMap<Key, usize> = HashMap::new();
        for &k in steps.iter().flatten() {
            *counts.entry(k).or_default() += 1;
        }
        let mut keys: Vec<(Key, usize)> = counts.into_iter().collect();
        keys.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        StaticPopular { resident: keys.into_iter().take(capacity).map(|(k, _)| k).collect() }
    }

    /// The first `capacity` keys of `order` (most used first, e.g. `placement::by_frequency`).
    pub fn from_order(order: &[Key], capacity: usize) -> StaticPopular {
        StaticPopular { resident: order.iter().copied().take(capacity).collect() }
    }

    pub fn resident(&self) -> &[Key] {
        &self.resident
    }
}

impl Policy for StaticPopular {
    fn name(&self) -> &'static str {
        "static-popular"
    }

    fn access(&mut self, key: Key) -> Access {
        if self.resident.contains(&key) {
            Access::Hit
        } else {
            Access::Host
        }
    }

    fn resident(&self) -> Vec<Key> {
        self.resident.clone()
    }
}

/// Evicts a random resident expert (xorshift64, seeded: runs repeat).
pub struct RandomEvict {
    capacity: usize,
    resident: Vec<Key>,
    state: u64,
}

impl RandomEvict {
    pub fn new(capacity: usize, seed: u64) -> RandomEvict {
        RandomEvict { capacity, resident: Vec::new(), state: seed | 1 }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

impl Policy for RandomEvict {
    fn name(&self) -> &'static str {
        "random"
    }

    fn access(&mut self, key: Key) -> Access {
        if self.resident.contains(&key) {
            return Access::Hit;
        }
        if self.capacity == 0 {
            return Access::Host;
        }
        if self.resident.len() < self.capacity {
            self.resident.push(key);
        } else {
            let victim = (self.next() % self.capacity as u64) as usize;
            self.resident[victim] = key;
        }
        Access::Load
    }

    fn resident(&self) -> Vec<Key> {
        self.resident.clone()
    }
}

/// The outcome of a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub hits: usize,
    /// Misses that copied the expert into a slot.
    pub loads: usize,
    /// Misses computed on the host.
    pub host: usize,
}

impl SimStats {
    pub fn misses(&self) -> usize {
        self.loads + self.host
    }

    pub fn accesses(&self) -> usize {
        self.hits + self.misses()
    }

    /// Hits per access (0 for an empty replay).
    pub fn hit_rate(&self) -> f64 {
        if self.accesses() == 0 {
            0.0
        } else {
            self.hits as f64 / self.accesses() as f64
        }
    }
}

/// Router traces (one per forward call, `[layer][token]` → experts) as decode steps: per token in
/// order, the (layer, expert) keys it uses, layer by layer.
pub fn decode_steps(traces: &[RouterTrace]) -> Vec<Vec<Key>> {
    let mut steps = Vec::new();
    for trace in traces {
        let n_tokens = trace.iter().map(Vec::len).max().unwrap_or(0);
        for t in 0..n_tokens {
            let mut keys = Vec::new();
            for (l, layer) in trace.iter().enumerate() {
                if let Some(experts) = layer.get(t) {
                    keys.extend(experts.iter().map(|&e| (l, e)));
                }
            }
            steps.push(keys);
        }
    }
    steps
}

/// Replays `steps` through `policy`.
pub fn simulate(policy: &mut dyn Policy, steps: &[Vec<Key>]) -> SimStats {
    let mut stats = SimStats::default();
    for step in steps {
        for &key in step {
            match policy.access(key) {
                Access::Hit => stats.hits += 1,
                Access::Load => stats.loads += 1,
                Access::Host => stats.host += 1,
            }
        }
        policy.end_step();
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One layer, one expert per step: the classic cache sequences.
    fn single(ids: &[usize]) -> Vec<Vec<Key>> {
        ids.iter().map(|&e| vec![(0, e)]).collect()
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        // 2 slots: 0 L, 1 L, 0 H, 2 L (evicts 1), 1 L (evicts 0), 2 H, 0 L (evicts 1).
        let s = simulate(&mut Lru::new(2), &single(&[0, 1, 0, 2, 1, 2, 0]));
        assert_eq!(s, SimStats { hits: 2, loads: 5, host: 0 });
        // A cyclic pattern one longer than the cache never hits under LRU.
        let s = simulate(&mut Lru::new(2), &single(&[0, 1, 2, 0, 1, 2]));
        assert_eq!(s.hits, 0);
        assert_eq!(simulate(&mut Lru::new(0), &single(&[0, 0])), SimStats { hits: 0, loads: 0, host: 2 });
    }

    #[test]
    fn lfu_admits_only_what_beats_the_coldest_resident() {
        // No decay, 1 slot: 0 L(1), 0 H(2), 1 host (1 ≤ 2), 1 host (2 ≤ 2), 1 L (3 > 2), 0 host (3 ≤ 3).
        let s = simulate(&mut Lfu::new(1, 1.0), &single(&[0, 0, 1, 1, 1, 0]));
        assert_eq!(s, SimStats { hits: 1, loads: 2, host: 3 });
        // With decay 0.5, old uses fade: 0 L(1); 0 H(1.5); then 1: 1 ≤ 0.75 is false → L.
        let s = simulate(&mut Lfu::new(1, 0.5), &single(&[0, 0, 1]));
        assert_eq!(s, SimStats { hits: 1, loads: 2, host: 0 });
    }

    #[test]
    fn static_popular_keeps_the_most_used_set() {
        let steps = vec![vec![(0, 1), (1, 2)], vec![(0, 1), (1, 3)], vec![(0, 4), (1, 2)]];
        let mut p = StaticPopular::from_steps(&steps, 2);
        assert_eq!(p.resident(), &[(0, 1), (1, 2)]);
        assert_eq!(simulate(&mut p, &steps), SimStats { hits: 4, loads: 0, host: 2 });
    }

    #[test]
    fn random_eviction_loads_on_every_miss() {
        let s = simulate(&mut RandomEvict::new(1, 7), &single(&[0, 1, 0, 0]));
        assert_eq!(s, SimStats { hits: 1, loads: 3, host: 0 });
    }

    #[test]
    fn traces_become_decode_steps_token_by_token() {
        // Two calls: a prompt of 2 tokens and one decode token, 2 layers, top-2.
        let prompt: RouterTrace = vec![vec![vec![1, 2], vec![3, 1]], vec![vec![0, 4], vec![4, 5]]];
        let decode: RouterTrace = vec![vec![vec![2, 0]], vec![vec![6, 7]]];
        let steps = decode_steps(&[prompt, decode]);
        assert_eq!(
            steps,
            vec![
                vec![(0, 1), (0, 2), (1, 0), (1, 4)],
                vec![(0, 3), (0, 1), (1, 4), (1, 5)],
                vec![(0, 2), (0, 0), (1, 6), (1, 7)],
            ]
        );
        // Every slot available: only the first use of each key misses.
        let s = simulate(&mut Lru::new(16), &steps);
        assert_eq!((s.hits, s.loads), (3, 9));
    }

    /// The demo model's routing of `routing.txt` (954 tokens, 4 layers, 8 experts, top-2): what
    /// transformers' router chose (`routing.json`) and what our CPU engine chooses on the Q4_K_M file.
    fn demo_traces() -> (RouterTrace, RouterTrace) {
        use crate::engine::{cpu::CpuEngine, Engine};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rustdoc-mixtral");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("routing.json")).unwrap()).unwrap();
        let reference: RouterTrace = serde_json::from_value(json["top_k_experts"].clone()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(json["input_ids"].clone()).unwrap();
        let model = crate::model::weights::Model::load(&dir.join("rustdoc-q4_k_m.gguf")).unwrap();
        let mut engine = CpuEngine::new(&model, ids.len()).unwrap();
        engine.set_router_trace(true).unwrap();
        engine.forward(&ids, false).unwrap();
        let mut ours = engine.take_router_trace();
        assert_eq!(ours.len(), 1);
        (reference, ours.remove(0))
    }

    /// Hit rates of every policy on the demo model's trace, per slot count (of 32 experts). Printed
    /// for the record (`--nocapture`); asserted only where the margin is wide:
    /// LFU beats LRU with few slots, static-popular beats random eviction, and with all 32 slots
    /// only the first use of each expert misses.
    #[test]
    fn policies_on_the_demo_model_trace() {
        let (reference, ours) = demo_traces();
        for (name, trace) in [("transformers f64", reference), ("CpuEngine Q4_K_M", ours)] {
            let steps = decode_steps(&[trace]);
            for slots in [4, 8, 12, 16, 24, 32] {
                let mut policies: Vec<Box<dyn Policy>> = vec![
                    Box::new(Lru::new(slots)),
                    Box::new(Lfu::new(slots, 0.95)),
                    Box::new(Lfu::new(slots, 1.0)),
                    Box::new(StaticPopular::from_steps(&steps, slots)),
                    Box::new(RandomEvict::new(slots, 42)),
                    Box::new(crate::engine::cuda::expert_cache::SlotLfu::new(slots)),
                ];
                let labels =
                    ["lru", "lfu decay 0.95", "lfu no decay", "static-popular", "random", "gpu slots"];
                let rates: Vec<(&str, SimStats)> = labels
                    .into_iter()
                    .zip(&mut policies)
                    .map(|(n, p)| (n, simulate(p.as_mut(), &steps)))
                    .collect();
                let line: Vec<String> = rates
                    .iter()
                    .map(|(n, s)| format!("{n} {:.1}% ({} loads)", 100.0 * s.hit_rate(), s.loads))
                    .collect();
                println!("{name}, {slots} slots: {}", line.join(", "));
                if slots == 32 {
                    assert!(rates.iter().all(|(_, s)| s.misses() <= 32), "{line:?}");
                }
                let random = rates[4].1.hit_rate();
                assert!(rates[3].1.hit_rate() > random, "{line:?}");
                // Decode scans the layers in order, so LRU with fewer slots than a token's 8 keys
                // thrashes; a frequency count keeps the popular experts (wide margins up to 16 slots).
                if slots <= 16 {
                    assert!(rates[2].1.hit_rate() > rates[0].1.hit_rate() + 0.05, "{line:?}");
                    // The GPU's slot cache (frequency first) as well.
                    assert!(rates[5].1.hit_rate() > rates[0].1.hit_rate() + 0.05, "{line:?}");
                }
            }
        }
    }
}
