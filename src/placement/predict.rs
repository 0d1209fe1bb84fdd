//! Predicted speed of a placement: decode and prompt tokens/s from a machine's figures, for our
//! hybrid placement ([`super::Plan`], misses on the host beside the GPU) and for llama.cpp's
//! `--n-cpu-moe N` (the experts of N whole layers in host memory, run on the CPU after the GPU's part).
//!
//! The model is bandwidth arithmetic, stated so a reader can check it:
//! - decode, ours: per token, the dense weights (all but the embedding table, of which one row is read)
//!   at the GPU's bandwidth, then per MoE layer the slower of the GPU's resident chosen experts and the
//!   host's missing ones (they run at the same time), plus a host round trip in layers with a miss;
//! - decode, llama.cpp: the same dense part, the GPU layers' experts on the GPU, then the CPU layers'
//!   experts on the CPU, one after the other;
//! - prompt (a batch of [`PROMPT_BATCH`] tokens): compute at the GPU's tensor-core rate, plus one copy
//!   over PCIe of every expert outside VRAM (a batch this size uses every expert), for both.
//!
//! Peak figures are discounted by [`GPU_BW_EFFICIENCY`] and [`GPU_FLOPS_EFFICIENCY`] (what good kernels
//! reach); the CPU figure is an effective one (measured on this machine, or a preset's typical host).

use std::fmt;

use serde::Serialize;

use super::{ModelSizes, Plan};
use crate::model::ModelConfig;

/// Share of the peak memory bandwidth a decode kernel reaches.
pub const GPU_BW_EFFICIENCY: f64 = 0.75;
/// Share of the peak tensor-core rate a prompt kernel reaches.
pub const GPU_FLOPS_EFFICIENCY: f64 = 0.5;
/// One layer's host round trip when some of its experts run on the host: the token's activations to
/// the host and the sum back (16 KB each way at Mixtral's width), plus a wait: ~2 small copies.
pub const HOST_ROUND_TRIP_S: f64 = 30e-6;
/// The prompt batch the prompt speed is predicted for (llama-bench's pp512).
pub const PROMPT_BATCH: usize = 512;

/// What a prediction is made from. Bandwidths in bytes per second.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Machine {
    /// Where the figures come from ("rtx4090 preset", "given", ...).
    pub source: String,
    pub vram: u64,
    pub gpu_bw: f64,
    /// Host-to-device copies from pinned memory.
    pub pcie_bw: f64,
    /// The host's effective read speed in the expert kernels (bytes of an expert per second at batch 1).
    pub cpu_bw: f64,
    /// Peak fp16 tensor-core rate with f32 accumulation, FLOP/s.
    pub gpu_flops: f64,
}

/// A machine the user can name (`--preset`).
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub vram_gib: u64,
    pub gpu_gbs: f64,
    pub pcie_gbs: f64,
    pub cpu_gbs: f64,
    pub tflops: f64,
}

/// Vendor figures: memory bandwidth and fp16 tensor TFLOPS with f32 accumulation from NVIDIA's
/// datasheets; pinned PCIe copies as measured typically (4.0 x16: ~24 GB/s, 4.0 x8: ~12, 5.0 x16:
/// ~55); hosts: dual-channel DDR4/DDR5 desktops ~50-70 GB/s effective, a laptop ~45, the H100 machine
/// of the issue (16 cores) 93. The RTX 4060 Ti 16 GB (the 16 GB card for `--type Q2_K_S`): 288 GB/s
/// (NVIDIA's specifications: 128-bit GDDR6 at 18 Gbps), a PCIe 4.0 x8 link (its specifications too,
/// so ~12 GB/s pinned), and 44.1 TFLOPS, which NVIDIA does not list for it: the RTX 4090's 165.2 over
/// its 128 SMs at 2.52 GHz is 512 FLOP per SM and clock, times the 4060 Ti's 34 SMs at 2.535 GHz.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "rtx3060",
        about: "RTX 3060 12 GB, PCIe 4.0 x16, DDR4 desktop",
        vram_gib: 12,
        gpu_gbs: 360.0,
        pcie_gbs: 24.0,
        cpu_gbs: 50.0,
        tflops: 25.6,
    },
    Preset {
        name: "rtx4060-laptop",
        about: "RTX 4060 Laptop 8 GB, PCIe 4.0 x8, DDR5 laptop",
        vram_gib: 8,
        gpu_gbs: 256.0,
        pcie_gbs: 12.0,
        cpu_gbs: 45.0,
        tflops: 15.1,
    },
    Preset {
        name: "rtx4060ti-16g",
        about: "RTX 4060 Ti 16 GB, PCIe 4.0 x8, DDR5 desktop",
        vram_gib: 16,
        gpu_gbs: 288.0,
        pcie_gbs: 12.0,
        cpu_gbs: 70.0,
        tflops: 44.1,
    },
    Preset {
        name: "rtx3090",
        about: "RTX 3090 24 GB, PCIe 4.0 x16, DDR4 desktop",
        vram_gib: 24,
        gpu_gbs: 936.0,
        pcie_gbs: 24.0,
        cpu_gbs: 50.0,
        tflops: 71.0,
    },
    Preset {
        name: "rtx4090",
        about: "RTX 4090 24 GB, PCIe 4.0 x16, DDR5 desktop",
        vram_gib: 24,
        gpu_gbs: 1008.0,
        pcie_gbs: 24.0,
        cpu_gbs: 70.0,
        tflops: 165.2,
    },
    Preset {
        name: "h100",
        about: "H100 80 GB (SXM), PCIe 5.0 x16, 16 host cores",
        vram_gib: 80,
        gpu_gbs: 3350.0,
        pcie_gbs: 55.0,
        cpu_gbs: 93.0,
        tflops: 989.0,
    },
];

impl Preset {
    pub fn find(name: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn machine(&self) -> Machine {
        Machine {
            source: format!("{} preset ({})", self.name, self.about),
            vram: self.vram_gib << 30,
            gpu_bw: self.gpu_gbs * 1e9,
            pcie_bw: self.pcie_gbs * 1e9,
            cpu_bw: self.cpu_gbs * 1e9,
            gpu_flops: self.tflops * 1e12,
        }
    }
}

/// Which experts tokens choose: uniformly at random, or as a recorded trace says (`[token][layer]`).
#[derive(Clone, Copy, Debug)]
pub enum Routing<'a> {
    Uniform,
    Trace(&'a [Vec<Vec<usize>>]),
}

/// One placement's predicted speed, with the parts it is made of.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub decode_tok_s: f64,
    pub prompt_tok_s: f64,
    /// Per decoded token: milliseconds of the dense part, of the experts (the GPU's and the host's
    /// overlapped for ours, one after the other for llama.cpp), experts run on the host.
    pub decode_dense_ms: f64,
    pub decode_experts_ms: f64,
    pub host_experts_per_token: f64,
    /// Per prompt batch: milliseconds of compute and of copies.
    pub prompt_compute_ms: f64,
    pub prompt_copy_ms: f64,
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "decode {:.1} tok/s ({:.2} ms dense + {:.2} ms experts per token, {:.2} experts per token on the CPU); \
             prompt {:.0} tok/s ({:.0} ms compute + {:.0} ms copies per {PROMPT_BATCH} tokens)",
            self.decode_tok_s,
            self.decode_dense_ms,
            self.decode_experts_ms,
            self.host_experts_per_token,
            self.prompt_tok_s,
            self.prompt_compute_ms,
            self.prompt_copy_ms
        )
    }
}

/// FLOPs of one token through the model: two per weight the token uses (the chosen experts, not the
/// others; one row of the embedding table).
pub fn flops_per_token(cfg: &ModelConfig) -> f64 {
    let expert = 3 * cfg.hidden_size as u64 * cfg.ffn_size as u64;
    let unused = cfg.n_layers as u64 * (cfg.n_experts - cfg.n_experts_used) as u64 * expert;
    let embedding = cfg.vocab_size as u64 * cfg.hidden_size as u64;
    2.0 * (cfg.n_params() - unused - embedding) as f64
}

/// Our placement `plan` of `sizes` on `m`.
pub fn hybrid(
    sizes: &ModelSizes,
    plan: &Plan,
    cfg: &ModelConfig,
    m: &Machine,
    routing: Routing,
) -> Prediction {
    let gpu_bw = m.gpu_bw * GPU_BW_EFFICIENCY;
    let dense_s = (sizes.dense - sizes.token_embd) as f64 / gpu_bw;
    let k = sizes.n_experts_used;
    let (mut experts_s, mut host_experts) = (0.0, 0.0);
    for (l, resident) in plan.resident.iter().enumerate() {
        let bytes = |e: usize| sizes.experts[l][e] as f64;
        // (time of the layer's experts, experts on the host), averaged over the tokens.
        let layer = |ids: &[usize]| {
            let (mut gpu, mut host, mut n_host) = (0.0, 0.0, 0);
            for &e in ids {
                if resident[e] {
                    gpu += bytes(e) / gpu_bw;
                } else {
                    host += bytes(e) / m.cpu_bw;
                    n_host += 1;
                }
            }
            let trip = if n_host > 0 { HOST_ROUND_TRIP_S } else { 0.0 };
            (f64::max(gpu, host) + trip, n_host as f64)
        };
        let (t, h) = match routing {
            Routing::Trace(tokens) if !tokens.is_empty() => {
                let sums = tokens.iter().filter_map(|t| t.get(l)).fold((0.0, 0.0, 0), |(a, b, n), ids| {
                    let (t, h) = layer(ids);
                    (a + t, b + h, n + 1)
                });
                (sums.0 / sums.2.max(1) as f64, sums.1 / sums.2.max(1) as f64)
            }
            _ => uniform_layer(resident, k, &|e| bytes(e), gpu_bw, m.cpu_bw),
        };
        experts_s += t;
        host_experts += h;
    }
    let outside: u64 = sizes.all_experts() - plan.resident_bytes;
    prediction(dense_s, experts_s, host_experts, cfg, m, outside)
}

/// llama.cpp's `--n-cpu-moe N` for the same budget: the smallest N whose placement fits, and its speed.
pub fn llama_cpp_n_cpu_moe(
    sizes: &ModelSizes,
    budget: u64,
    cfg: &ModelConfig,
    m: &Machine,
) -> (usize, Prediction) {
    let base = sizes.dense + sizes.kv_cache + sizes.scratch;
    let layer_bytes: Vec<u64> = sizes.experts.iter().map(|l| l.iter().sum()).collect();
    let n_layers = layer_bytes.len();
    // `--n-cpu-moe N` keeps the experts of layers 0..N on the host.
    let n =
        (0..=n_layers).find(|&n| base + layer_bytes[n..].iter().sum::<u64>() <= budget).unwrap_or(n_layers);
    let gpu_bw = m.gpu_bw * GPU_BW_EFFICIENCY;
    let dense_s = (sizes.dense - sizes.token_embd) as f64 / gpu_bw;
    let k = sizes.n_experts_used as f64;
    let mut experts_s = 0.0;
    for (l, bytes) in layer_bytes.iter().enumerate() {
        // The mean expert of the layer, k of them per token.
        let chosen = k * *bytes as f64 / sizes.experts[l].len().max(1) as f64;
        experts_s += chosen / if l < n { m.cpu_bw } else { gpu_bw };
    }
    let outside: u64 = layer_bytes[..n].iter().sum();
    (n, prediction(dense_s, experts_s, k * n as f64, cfg, m, outside))
}

fn prediction(
    dense_s: f64,
    experts_s: f64,
    host_experts: f64,
    cfg: &ModelConfig,
    m: &Machine,
    outside: u64,
) -> Prediction {
    let compute_s = flops_per_token(cfg) * PROMPT_BATCH as f64 / (m.gpu_flops * GPU_FLOPS_EFFICIENCY);
    let copy_s = outside as f64 / m.pcie_bw;
    Prediction {
        decode_tok_s: 1.0 / (dense_s + experts_s),
        prompt_tok_s: PROMPT_BATCH as f64 / (compute_s + copy_s),
        decode_dense_ms: dense_s * 1e3,
        decode_experts_ms: experts_s * 1e3,
        host_experts_per_token: host_experts,
        prompt_compute_ms: compute_s * 1e3,
        prompt_copy_ms: copy_s * 1e3,
    }
}

/// The expected (time, experts on the host) of one layer when a token's `k` distinct experts are
/// uniformly random: every k-subset equally likely, enumerated.
fn uniform_layer(
    resident: &[bool],
    k: usize,
    bytes: &dyn Fn(usize) -> f64,
    gpu_bw: f64,
    cpu_bw: f64,
) -> (f64, f64) {
    let n = resident.len();
    let (mut t, mut h, mut count) = (0.0, 0.0, 0u64);
    let mut subset: Vec<usize> = (0..k.min(n)).collect();
    loop {
        let (mut gpu, mut host, mut n_host) = (0.0, 0.0, 0);
        for &e in &subset {
            if resident[e] {
                gpu += bytes(e) / gpu_bw;
            } else {
                host += bytes(e) / cpu_bw;
                n_host += 1;
            }
        }
        t += f64::max(gpu, host) + if n_host > 0 { HOST_ROUND_TRIP_S } else { 0.0 };
        h += n_host as f64;
        count += 1;
        // The next k-subset in lexicographic order.
        let Some(i) = (0..subset.len()).rev().find(|&i| subset[i] < n - subset.len() + i) else { break };
        subset[i] += 1;
        for j in i + 1..subset.len() {
            subset[j] = subset[j - 1] + 1;
        }
    }
    (t / count as f64, h / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{ModelSizes, Plan};
    use crate::quantize::Target;

    const GIB: u64 = 1 << 30;

    fn mixtral() -> (ModelConfig, ModelSizes) {
        let cfg = ModelConfig::mixtral_8x7b(32);
        let sizes = ModelSizes::predicted(&cfg, Target::Q4K, 4096, 256 << 20).unwrap();
        (cfg, sizes)
    }

    #[test]
    fn mixtral_8x7b_q4_k_sizes_are_the_arithmetic() {
        let (cfg, s) = mixtral();
        // An expert: 3 matrices of 14336 x 4096 at Q4_K's 144 bytes per 256 values.
        let expert = 3 * 14336 * 4096 / 256 * 144;
        assert_eq!(s.experts[0][0], expert as u64);
        assert_eq!(s.experts.iter().flatten().count(), 256);
        // Dense: per layer q and o in Q4_K / Q5_K, k and v in Q8_0, the router f32, two f32 norms;
        // embeddings and head Q5_K (ours: `head_step`), the final norm.
        let (h, kv) = (4096u64, 1024u64);
        let per_layer = h * h / 256 * 144 + 2 * kv * h / 32 * 34 + h * h / 256 * 176 + 8 * h * 4 + 2 * h * 4;
        let embd = 32000 * h / 256 * 176;
        let dense = 32 * per_layer + embd + 32000 * h / 256 * 176 + h * 4;
        assert_eq!((s.dense, s.token_embd), (dense, embd));
        assert_eq!(s.kv_cache, 4096 * 32 * 2 * kv * 2);
        // 12.9 B active parameters as Mistral counts them, less the 0.13 B embedding table a token only
        // looks a row up in: 2 FLOPs each.
        let active = flops_per_token(&cfg) / 2e9;
        assert!((active - (12.88 - 0.131)).abs() < 0.01, "{active}");
    }

    #[test]
    fn predictions_are_the_formula_and_ours_beats_n_cpu_moe_on_every_preset() {
        let (cfg, s) = mixtral();
        let e = s.experts[0][0] as f64;
        let m = Preset::find("rtx4090").unwrap().machine();
        let budget = 22 * GIB;
        let plan = Plan::new(&s, budget).unwrap();
        let ours = hybrid(&s, &plan, &cfg, &m, Routing::Uniform);
        let (n, theirs) = llama_cpp_n_cpu_moe(&s, budget, &cfg, &m);
        // llama.cpp by hand: the fewest host layers that fit, then the sum of the three parts.
        let base = s.dense + s.kv_cache + s.scratch;
        let layer = 8 * s.experts[0][0];
        let n_by_hand = (0..=32u64).find(|&n| base + (32 - n) * layer <= budget).unwrap() as usize;
        assert_eq!(n, n_by_hand);
        let gpu = m.gpu_bw * GPU_BW_EFFICIENCY;
        let dense = (s.dense - s.token_embd) as f64 / gpu;
        let by_hand = 1.0 / (dense + (32 - n) as f64 * 2.0 * e / gpu + n as f64 * 2.0 * e / m.cpu_bw);
        assert!((theirs.decode_tok_s - by_hand).abs() < 1e-9 * by_hand, "{theirs}");
        // Ours by hand for a layer with r resident experts: P(both resident) = C(r,2)/C(8,2), and
        // so on; each layer's time is the slower side plus the round trip when one runs on the host.
        let mut experts = 0.0;
        for l in 0..32 {
            let r = plan.resident[l].iter().filter(|&&x| x).count() as f64;
            let pairs = 28.0;
            let both = r * (r - 1.0) / 2.0 / pairs;
            let one = r * (8.0 - r) / pairs;
            let none = 1.0 - both - one;
            experts += both * 2.0 * e / gpu
                + one * (f64::max(e / gpu, e / m.cpu_bw) + HOST_ROUND_TRIP_S)
                + none * (2.0 * e / m.cpu_bw + HOST_ROUND_TRIP_S);
        }
        let by_hand = 1.0 / (dense + experts);
        assert!((ours.decode_tok_s - by_hand).abs() < 1e-9 * by_hand, "{ours}");
        // The prompt: 512 tokens at half the peak, plus the copies of everything outside VRAM.
        let compute = flops_per_token(&cfg) * 512.0 / (m.gpu_flops * 0.5);
        let copies = (s.all_experts() - plan.resident_bytes) as f64 / m.pcie_bw;
        assert!((ours.prompt_tok_s - 512.0 / (compute + copies)).abs() < 1e-6, "{ours}");

        for p in PRESETS {
            let m = p.machine();
            for gib in [22, 12, 6] {
                let budget = (gib * GIB).min(m.vram);
                let plan = Plan::new(&s, budget).unwrap();
                let ours = hybrid(&s, &plan, &cfg, &m, Routing::Uniform);
                let (_, theirs) = llama_cpp_n_cpu_moe(&s, budget, &cfg, &m);
                assert!(
                    ours.decode_tok_s >= theirs.decode_tok_s,
                    "{} at {gib} GiB: {ours} vs {theirs}",
                    p.name
                );
                assert!(
                    ours.prompt_tok_s >= 0.95 * theirs.prompt_tok_s,
                    "{} at {gib} GiB: {ours} vs {theirs}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn a_trace_is_replayed_through_the_placement() {
        let (cfg, s) = mixtral();
        let m = Preset::find("h100").unwrap().machine();
        // Everything resident: no host experts whatever the routing.
        let all = Plan::new(&s, 80 * GIB).unwrap();
        let trace = vec![vec![vec![0, 1]; 32]; 3];
        let p = hybrid(&s, &all, &cfg, &m, Routing::Trace(&trace));
        assert_eq!(p.host_experts_per_token, 0.0);
        // Experts 0 and 1 resident in every layer: a trace using only them never misses, a uniform
        // routing does.
        let order: Vec<(usize, usize)> = (0..32).flat_map(|l| [(l, 0), (l, 1)]).collect();
        let budget = s.dense + s.kv_cache + s.scratch + (64 + 2) * s.experts[0][0];
        let plan = Plan::with_priority(&s, budget, None, Some(&order)).unwrap();
        assert_eq!(plan.resident_experts(), 64);
        assert!(plan.resident.iter().all(|l| l[0] && l[1] && !l[2]));
        let hot = hybrid(&s, &plan, &cfg, &m, Routing::Trace(&trace));
        assert_eq!(hot.host_experts_per_token, 0.0);
        let uniform = hybrid(&s, &plan, &cfg, &m, Routing::Uniform);
        // 2 of 8 resident: a token's expert is on the host with probability 3/4.
        assert!((uniform.host_experts_per_token - 32.0 * 2.0 * 0.75).abs() < 1e-9, "{uniform}");
        assert!(hot.decode_tok_s > uniform.decode_tok_s);
    }
}
