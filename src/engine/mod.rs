//! The forward pass and where it runs. Every engine implements [`Engine`], so the commands and the
//! chat REPL do not care where the math runs; [`open`] picks the backend for `--device`.
//!
//! - `transformer`: the model written once over a backend's ops (the forward pass, batching, KV-cache
//!   rollback, router traces), and the [`transformer::Backend`] trait those ops form.
//! - `cpu`: the CPU backend (rayon, SIMD dot products), the reference for every other backend.
//! - `cuda`: the CUDA backend (cudarc + NVRTC kernels, expert cache): the same transformer over device
//!   ops, with fused expert kernels and experts streamed into VRAM slots.
//! - `device_choice`: what `--device` and `--vram-budget` accept.

use anyhow::{bail, Result};

use crate::model::weights::Model;
use crate::model::ModelConfig;

pub mod cpu;
pub mod cuda;
mod device_choice;
pub mod hybrid;
pub mod importance;
pub mod stats;
pub mod transformer;

pub use self::device_choice::{parse_bytes, DeviceChoice};
pub use self::stats::ExpertStats;
pub use self::transformer::{RouterTrace, RoutingReplay, Transformer, DEFAULT_MAX_BATCH};

/// A model instance with its KV cache: tokens go in at the cache's current position, logits come out.
pub trait Engine {
    /// Processes `tokens` at positions `position() .. position() + tokens.len()`, appending them to the
    /// KV cache. Returns the logits of the last token (`[vocab]`), or of every token (`[n, vocab]`,
    /// row-major) when `all_logits` is set. Errors (leaving the cache unchanged) when the tokens do not
    /// fit in the context or an id is out of the vocabulary ([`crate::Error`]).
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>>;

    /// Number of tokens in the KV cache.
    fn position(&self) -> usize;

    /// Capacity of the KV cache in tokens (`--ctx`).
    fn context_size(&self) -> usize;

    /// Keeps the first `n` cached tokens and forgets the rest (n ≥ position() is a no-op).
    fn truncate(&mut self, n: usize);

    fn config(&self) -> &ModelConfig;

    /// One line of backend statistics for `/stats` and `--verbose` (e.g. the expert-cache hit rate).
    fn stats_line(&self) -> Option<String> {
        None
    }

    /// Where the experts ran, for engines that schedule them (none for the plain CPU engine).
    fn expert_stats(&self) -> Option<ExpertStats> {
        None
    }

    /// Records the router's choices of the following forward calls (`on`), or stops. An error where
    /// the engine cannot record them.
    fn set_router_trace(&mut self, on: bool) -> Result<()> {
        let _ = on;
        bail!("this engine does not record the router's choices (the CPU engine does)")
    }

    /// The choices recorded since tracing was turned on or last taken, one entry per forward call.
    fn take_router_trace(&mut self) -> Vec<RouterTrace> {
        Vec::new()
    }

    /// Replays recorded expert choices instead of the router's from now on (`None`: the router's).
    fn set_routing_replay(&mut self, replay: Option<RoutingReplay>) -> Result<()> {
        let _ = replay;
        bail!("this engine cannot replay recorded routing")
    }
}

/// How [`open`] chooses and sets up the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    pub device: DeviceChoice,
    /// Bytes of VRAM a GPU engine may use (default: free VRAM minus a reserve).
    pub vram_budget: Option<u64>,
    /// Keep the experts of only this many layers in VRAM (llama.cpp's `-ngl N`); 0 runs on the CPU.
    pub gpu_layers: Option<usize>,
    /// Where experts outside VRAM run.
    pub misses: hybrid::MissChoice,
    /// (layer, expert) pairs, most used first (from a routing trace): the experts that start in VRAM
    /// (or in the stand-in's slots); default: spread over the layers by index.
    pub hot_experts: Option<Vec<(usize, usize)>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            device: DeviceChoice::Auto,
            vram_budget: None,
            gpu_layers: None,
            misses: hybrid::MissChoice::Auto,
            hot_experts: None,
        }
    }
}

/// An engine from [`open`], with what to tell the user about it.
pub struct Opened<'a> {
    pub engine: Box<dyn Engine + Send + 'a>,
    /// Where it runs, for reports: "CPU (avx512)", "CUDA (NVIDIA H100 80GB HBM3)".
    pub backend: String,
    /// Lines for the user at load: the GPU and its placement plan, or why `auto` chose the CPU.
    pub notices: Vec<String>,
}

/// The engine for `model` with a KV cache of `ctx` tokens on the device `opts` asks for: a CUDA GPU
/// (`auto` when one is usable), else the CPU.
pub fn open<'a>(model: &'a Model, ctx: usize, opts: &OpenOptions) -> Result<Opened<'a>> {
    let (device, mut why_cpu) = match opts.gpu_layers {
        Some(0) => (None, Some("-ngl 0: running on the CPU".to_owned())),
        _ => opts.device.resolve()?,
    };
    if let Some(device) = device {
        if model.config.is_mixtral() {
            let cuda_opts = cuda::CudaOptions {
                device,
                vram_budget: opts.vram_budget,
                gpu_layers: opts.gpu_layers,
                misses: opts.misses,
                hot_experts: opts.hot_experts.clone(),
            };
            let engine = cuda::CudaEngine::new(model, ctx, &cuda_opts)?;
            let backend = format!("CUDA ({})", engine.device().name);
            let mut notices = vec![format!("{}\n{}", engine.device(), engine.plan())];
            if let Some(costs) = engine.misses().costs() {
                notices.push(costs.to_string());
            }
            return Ok(Opened { engine: Box::new(engine), backend, notices });
        }
        let why = "the CUDA engine runs Mixtral layers only (softmax top-k renormalized, no shared experts)";
        if opts.device != DeviceChoice::Auto {
            bail!("{why}: use --device cpu for this model");
        }
        why_cpu = Some(format!("using the CPU: {why}"));
    }
    if let DeviceChoice::StandIn(slots) = opts.device {
        // The hot experts fixed in the slots when known, else LFU without decay: the best online
        // policy on the demo model's routing, within a point of the fixed most-used set (policy.rs tests).
        let policy: Box<dyn hybrid::policy::Policy + Send> = match &opts.hot_experts {
            Some(hot) => Box::new(hybrid::policy::StaticPopular::from_order(hot, slots)),
            None => Box::new(hybrid::policy::Lfu::new(slots, 1.0)),
        };
        let engine = hybrid::hybrid_engine(model, ctx, slots, policy, hybrid::Lookahead::Router)?;
        return Ok(Opened {
            engine: Box::new(engine),
            backend: format!("CPU ({}) + stand-in device ({slots} expert slots)", cpu::dot::simd_level()),
            notices: Vec::new(),
        });
    }
    let engine = cpu::CpuEngine::new(model, ctx)?;
    Ok(Opened {
        engine: Box::new(engine),
        backend: format!("CPU ({})", cpu::dot::simd_level()),
        notices: why_cpu.map(|why| format!("note: {why}")).into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::testing::{tiny_config, tiny_tensors, write_gguf};
    use crate::Error;

    #[test]
    fn open_picks_the_backend_and_errors_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &tiny_config(), &tiny_tensors(&tiny_config(), false)).unwrap();
        let model = Model::load(&path).unwrap();
        let cpu = OpenOptions { device: DeviceChoice::Cpu, ..OpenOptions::default() };
        let opened = open(&model, 8, &cpu).unwrap();
        assert!(opened.backend.starts_with("CPU ("), "{}", opened.backend);
        assert!(opened.notices.is_empty());
        let mut engine = opened.engine;
        let typed = |e: anyhow::Error| e.downcast_ref::<Error>().cloned();
        let err = engine.forward(&[3, 64], false).unwrap_err();
        assert_eq!(typed(err), Some(Error::TokenOutOfVocabulary { token: 64, vocab: 64 }));
        engine.forward(&[1, 2, 3], false).unwrap();
        let err = engine.forward(&[1; 6], false).unwrap_err();
        assert_eq!(err.to_string(), "6 new tokens after 3 do not fit in the context of 8 tokens");
        assert_eq!(typed(err), Some(Error::ContextFull { cached: 3, new: 6, capacity: 8 }));
        engine.set_router_trace(true).unwrap();
        engine.forward(&[4], false).unwrap();
        assert_eq!(engine.take_router_trace().len(), 1);

        if cuda::cuda_available().is_ok() {
            eprintln!("a CUDA GPU is present: the no-GPU paths of engine::open are not exercised here");
            return;
        }
        let auto = open(&model, 8, &OpenOptions::default()).unwrap();
        assert_eq!(auto.notices.len(), 1);
        assert!(auto.notices[0].starts_with("note: using the CPU: "), "{:?}", auto.notices);
        let cuda = OpenOptions { device: DeviceChoice::Cuda(0), ..OpenOptions::default() };
        let err = open(&model, 8, &cuda).err().expect("no GPU here");
        assert!(matches!(typed(err), Some(Error::NoGpu(_))));
    }
}
