//! The expert cost model: what running a missing expert on the host costs against copying it to the
//! device, measured on this machine and cached per machine.
//!
//! The rule it serves ([`ExpertCosts::prefer_host`]): an expert that is not resident runs on the host
//! when the host computes its `m` tokens faster than the expert's bytes cross to the device. At batch 1
//! the host wins on every machine we know (one Q4_K Mixtral expert: ~1.1 ms from host memory against
//! ~1.9 ms over PCIe 5); a prompt's experts each serve many tokens, so they are copied.
//!
//! The host side is timed at start-up with the CPU engine's own expert kernels on one real expert of
//! the model (1 token and [`BATCH`] tokens) and cached under the cache folder, keyed by CPU, thread
//! count and expert shape, so a second start costs nothing. The copy side is what the device measures
//! (timed expert copies); before it has measured one, [`DEFAULT_COPY_BYTES_PER_S`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::cpu::{CpuBackend, CpuTensor, Routes};
use crate::engine::transformer::Backend;
use crate::model::weights::ExpertWeights;
use crate::model::ModelConfig;

/// The batch the host's per-token cost is measured at.
pub const BATCH: usize = 8;

/// Pinned host-to-device copies over PCIe 4.0 x16, the common consumer link (PCIe 5: ~55 GB/s).
pub const DEFAULT_COPY_BYTES_PER_S: f64 = 24e9;

/// What one expert costs on the host, and what copying one costs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertCosts {
    /// Seconds for one expert (gate, up, SiLU, down) on the host threads: 1 token, and [`BATCH`] tokens.
    pub host_1: f64,
    pub host_batch: f64,
    /// Bytes of one expert (what a copy moves, and what the host reads per call).
    pub expert_bytes: u64,
    /// Host-to-device copy speed.
    pub copy_bytes_per_s: f64,
    /// The device's read speed in its expert kernels, when a device measured it (what a resident
    /// expert costs there: for `plan` and the report).
    pub device_read_bytes_per_s: Option<f64>,
}

impl ExpertCosts {
    /// Seconds the host takes for an expert on `m` tokens (linear between the two measurements).
    pub fn host_seconds(&self, m: usize) -> f64 {
        let per_extra = (self.host_batch - self.host_1).max(0.0) / (BATCH - 1) as f64;
        self.host_1 + per_extra * m.saturating_sub(1) as f64
    }

    /// Seconds one copy of an expert takes.
    pub fn copy_seconds(&self) -> f64 {
        self.expert_bytes as f64 / self.copy_bytes_per_s
    }

    /// Whether a non-resident expert serving `m` tokens is cheaper to run on the host than to copy.
    pub fn prefer_host(&self, m: usize) -> bool {
        self.host_seconds(m) < self.copy_seconds()
    }

    /// The host's effective read speed for one token (bytes of an expert per second of it).
    pub fn host_bytes_per_s(&self) -> f64 {
        self.expert_bytes as f64 / self.host_1
    }

    /// The most tokens for which the host is still preferred (0: always copy).
    pub fn host_up_to(&self) -> usize {
        (0..=4096).take_while(|&m| m == 0 || self.prefer_host(m)).last().unwrap_or(0)
    }

    /// Measures the host side on `expert` (cached per machine, see the module documentation) with
    /// `copy_bytes_per_s` for copies.
    pub fn measure(cfg: &ModelConfig, expert: &ExpertWeights, copy_bytes_per_s: f64) -> Result<ExpertCosts> {
        Self::measure_cached_in(cfg, expert, copy_bytes_per_s, cache_path().ok())
    }

    /// [`ExpertCosts::measure`] with the cache in file `cache` (none: always measure).
    pub fn measure_cached_in(
        cfg: &ModelConfig,
        expert: &ExpertWeights,
        copy_bytes_per_s: f64,
        cache: Option<PathBuf>,
    ) -> Result<ExpertCosts> {
        let expert_bytes = (expert.gate.data.len() + expert.up.data.len() + expert.down.data.len()) as u64;
        let key = format!(
            "{} | {} threads | {} {}x{} {} {}x{}",
            cpu_name(),
            rayon::current_num_threads(),
            expert.gate.ty,
            expert.gate.rows,
            expert.gate.cols,
            expert.down.ty,
            expert.down.rows,
            expert.down.cols
        );
        let cached = cache.as_ref().and_then(|p| read_cache(p).ok()).and_then(|c| c.get(&key).copied());
        let (host_1, host_batch) = match cached {
            Some(t) => t,
            None => {
                let t = (time_host(cfg, expert, 1)?, time_host(cfg, expert, BATCH)?);
                // The cache saves time, it is not needed: a read-only home still runs.
                if let Some(path) = &cache {
                    let _ = write_cache(path, &key, t);
                }
                t
            }
        };
        Ok(ExpertCosts { host_1, host_batch, expert_bytes, copy_bytes_per_s, device_read_bytes_per_s: None })
    }
}

impl fmt::Display for ExpertCosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expert costs: host {:.3} ms for 1 token, {:.3} ms for {BATCH} ({:.1} GB/s); copy {:.3} ms \
             ({:.1} GB/s, {:.1} MB); misses of up to {} tokens run on the host",
            self.host_1 * 1e3,
            self.host_batch * 1e3,
            self.host_bytes_per_s() / 1e9,
            self.copy_seconds() * 1e3,
            self.copy_bytes_per_s / 1e9,
            self.expert_bytes as f64 / 1e6,
            self.host_up_to()
        )?;
        if let Some(bw) = self.device_read_bytes_per_s {
            write!(f, "; the device reads experts at {:.1} GB/s", bw / 1e9)?;
        }
        Ok(())
    }
}

/// Where experts that are not on the device run (`--misses`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissChoice {
    /// As the cost model measured on this machine says (the host at batch 1, copies for prompts).
    #[default]
    Auto,
    /// Always copied to the device (what every token then runs on).
    Copy,
    /// Always on the host.
    Host,
}

/// The rule a device backend applies to each missing expert.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Misses {
    Copy,
    Host,
    Cost(ExpertCosts),
}

impl Misses {
    /// Whether a missing expert serving `m` tokens runs on the host.
    pub fn on_host(&self, m: usize) -> bool {
        match self {
            Misses::Copy => false,
            Misses::Host => true,
            Misses::Cost(c) => c.prefer_host(m),
        }
    }

    pub fn costs(&self) -> Option<&ExpertCosts> {
        match self {
            Misses::Cost(c) => Some(c),
            _ => None,
        }
    }
}

/// The fastest of a few runs of one expert on `m` tokens with the CPU engine's kernels (the first run
/// also pages the expert in from the mapped file).
fn time_host(cfg: &ModelConfig, expert: &ExpertWeights, m: usize) -> Result<f64> {
    let mut cpu = CpuBackend::new(cfg);
    let experts = vec![*expert];
    let x = CpuTensor::new(
        (0..m * expert.gate.cols).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect(),
        expert.gate.cols,
    );
    let routes = Routes::new(vec![vec![(0, 1.0)]; m], 1);
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = Instant::now();
        std::hint::black_box(cpu.moe(0, &experts, &x, &routes).context("timing an expert on the host")?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

type Cache = BTreeMap<String, (f64, f64)>;

fn cache_path() -> Result<PathBuf> {
    Ok(crate::cache::cache_dir()?.join("expert-costs.json"))
}

fn read_cache(path: &Path) -> Result<Cache> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn write_cache(path: &Path, key: &str, times: (f64, f64)) -> Result<()> {
    let mut cache = read_cache(path).unwrap_or_default();
    cache.insert(key.to_owned(), times);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::format::output::write_atomic(path, serde_json::to_string_pretty(&cache)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(host_1: f64, host_batch: f64) -> ExpertCosts {
        ExpertCosts {
            host_1,
            host_batch,
            expert_bytes: 99_000_000,
            copy_bytes_per_s: 55e9,
            device_read_bytes_per_s: None,
        }
    }

    #[test]
    fn one_token_runs_on_the_host_and_a_prompt_is_copied() {
        // The H100 host of the issue: 1.1 ms per expert on the host, 1.8 ms for a copy at 55 GB/s.
        let c = costs(1.1e-3, 1.5e-3);
        assert!((c.copy_seconds() - 1.8e-3).abs() < 1e-9);
        assert!(c.prefer_host(1));
        // 1.1 ms + (m-1) * 0.4/7 ms < 1.8 ms while m - 1 < 12.25.
        assert_eq!(c.host_up_to(), 13);
        assert!(!c.prefer_host(14) && !c.prefer_host(512));
        // A host slower than the link never runs misses.
        assert_eq!(costs(2e-3, 3e-3).host_up_to(), 0);
        assert!((c.host_bytes_per_s() - 90e9).abs() < 1e6);
    }

    #[test]
    fn measured_costs_are_cached_per_machine() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("costs.json");
        let model = crate::model::weights::Model::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/llamacpp/tiny-q4_k_m.gguf"),
        )
        .unwrap();
        let w = model.weights().unwrap();
        let expert = &w.layers[0].experts[0];
        let measure =
            || ExpertCosts::measure_cached_in(&model.config, expert, 24e9, Some(cache.clone())).unwrap();
        let first = measure();
        assert!(first.host_1 > 0.0 && first.host_batch > 0.0, "{first}");
        assert!(cache.exists());
        // The second start reads the cache: the same numbers, not a new measurement.
        let second = measure();
        assert_eq!((first.host_1, first.host_batch), (second.host_1, second.host_batch));
    }
}
