//! `mixtral-q plan`: what lives where on a machine and the decode and prompt speed to expect, beside
//! llama.cpp's `--n-cpu-moe` on the same budget. The placement is the runtime's own
//! (`placement::Plan`, what the CUDA engine allocates at load); the speeds are `placement::predict`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use mixtral_q::engine::hybrid::cost::DEFAULT_COPY_BYTES_PER_S;
use mixtral_q::engine::hybrid::ExpertCosts;
use mixtral_q::engine::{parse_bytes, DEFAULT_MAX_BATCH};
use mixtral_q::model::weights::Model;
use mixtral_q::model::ModelConfig;
use mixtral_q::placement::predict::{self, Machine, Preset, Routing, PRESETS};
use mixtral_q::placement::{self, ModelSizes, Plan};
use mixtral_q::quantize::Target;

use super::human_bytes;
use super::load::{check_gguf_path, demo_model, read_trace_for};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// GGUF model file (default: the demo model). Its tensors' real sizes are used.
    #[arg(short = 'm', long = "model", conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Plan a model that is not on disk: its sizes from the quantizer's type rules.
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    /// The quantization of `--shape`.
    #[arg(long = "type", value_enum, ignore_case = true, default_value = "q4_k", requires = "shape")]
    pub target: Target,
    /// VRAM to plan for, e.g. 22G (default: the preset's card minus a reserve).
    #[arg(long, value_parser = parse_bytes)]
    pub vram: Option<u64>,
    /// Host memory, e.g. 64G: warns when the experts left in host memory do not fit.
    #[arg(long, value_parser = parse_bytes)]
    pub ram: Option<u64>,
    /// KV cache size in tokens.
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ctx: usize,
    /// A machine's figures: rtx3060, rtx4060-laptop, rtx4060ti-16g, rtx3090, rtx4090, h100.
    #[arg(long)]
    pub preset: Option<String>,
    /// GPU memory bandwidth, GB/s (overrides the preset's).
    #[arg(long)]
    pub gpu_bw: Option<f64>,
    /// Pinned host-to-device copy speed, GB/s.
    #[arg(long)]
    pub pcie_bw: Option<f64>,
    /// The host's read speed in the expert kernels, GB/s (default: measured on this machine with the
    /// model's first expert, else the preset's).
    #[arg(long)]
    pub cpu_bw: Option<f64>,
    /// GPU fp16 tensor-core TFLOPS (f32 accumulation).
    #[arg(long)]
    pub gpu_tflops: Option<f64>,
    /// A routing trace (`routing --json`, `generate --record-routing`): the experts it routes to most
    /// start resident, and decode is predicted on its choices (default: uniform routing).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Models `plan --shape` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Shape {
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
    #[value(name = "mixtral-8x22b")]
    Mixtral8x22b,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    ensure!(args.ctx > 0, "--ctx must be at least 1");
    let scratch = mixtral_q::engine::cuda::activation_bytes;
    let (name, cfg, sizes, measured_cpu) = match args.shape {
        Some(shape) => {
            let (name, cfg) = match shape {
                Shape::Mixtral8x7b => ("Mixtral-8x7B", ModelConfig::mixtral_8x7b(32)),
                Shape::Mixtral8x22b => ("Mixtral-8x22B", ModelConfig::mixtral_8x22b(56)),
            };
            let sizes = ModelSizes::predicted(&cfg, args.target, args.ctx, scratch(&cfg, DEFAULT_MAX_BATCH))?;
            (format!("{name} {} (sizes from the quantizer's rules)", args.target.name()), cfg, sizes, None)
        }
        None => {
            let path = match &args.model {
                Some(p) => p.clone(),
                None => demo_model()?,
            };
            check_gguf_path(&path)?;
            let model = Model::load(&path)?;
            let cfg = model.config.clone();
            ensure!(
                cfg.is_mixtral(),
                "{}: plan places Mixtral models (top-k experts, no shared ones)",
                path.display()
            );
            let weights = model.weights()?;
            let sizes = ModelSizes::of(&weights, &cfg, args.ctx, scratch(&cfg, DEFAULT_MAX_BATCH));
            // This machine's host speed, unless given: the cost model's measurement (cached).
            let measured = match (args.cpu_bw, weights.layers.iter().flat_map(|l| l.experts.first()).next()) {
                (None, Some(expert)) => {
                    let costs = ExpertCosts::measure(&cfg, expert, DEFAULT_COPY_BYTES_PER_S)?;
                    Some(costs.host_bytes_per_s())
                }
                _ => None,
            };
            (path.display().to_string(), cfg, sizes, measured)
        }
    };
    let machine = machine(args, measured_cpu)?;
    let budget = match args.vram {
        Some(v) if machine.vram > 0 && v > machine.vram => bail!(
            "--vram {} is more than the preset's card has ({})",
            human_bytes(v),
            human_bytes(machine.vram)
        ),
        Some(v) => v,
        None if machine.vram > 0 => placement::default_budget(machine.vram),
        None => bail!("give --vram SIZE or a --preset: the VRAM to plan for"),
    };

    let trace = match &args.trace {
        None => None,
        Some(path) => Some(read_trace_for(path, &cfg)?.experts),
    };
    let priority = trace.as_ref().map(|t| placement::by_frequency(t, cfg.n_layers, cfg.n_experts));
    let plan = Plan::with_priority(&sizes, budget, None, priority.as_deref())?;
    let routing = trace.as_deref().map_or(Routing::Uniform, Routing::Trace);
    let ours = predict::hybrid(&sizes, &plan, &cfg, &machine, routing);
    let (n_cpu_moe, theirs) = predict::llama_cpp_n_cpu_moe(&sizes, budget, &cfg, &machine);
    let host_bytes = sizes.all_experts() - plan.resident_bytes;
    let ram_warning = args.ram.filter(|&ram| host_bytes > ram).map(|ram| {
        format!(
            "the {} of experts left in host memory exceed --ram {}: they would be read from disk",
            human_bytes(host_bytes),
            human_bytes(ram)
        )
    });

    let mut out = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({
            "model": name,
            "machine": machine,
            "vram_budget": budget,
            "routing": if trace.is_some() { "trace" } else { "uniform" },
            "plan": {
                "vram_bytes": plan.vram_bytes(), "resident_experts": plan.resident_experts(),
                "total_experts": plan.total_experts(), "slots": plan.n_slots,
                "resident_per_layer": plan.resident_per_layer(), "host_bytes": host_bytes,
                "dense_bytes": plan.dense, "kv_cache_bytes": plan.kv_cache, "buffer_bytes": plan.scratch,
                "largest_expert_bytes": sizes.experts.iter().flatten().max(),
            },
            "mixtral_q": ours,
            "llama_cpp": { "n_cpu_moe": n_cpu_moe, "prediction": theirs },
            "warnings": ram_warning.iter().collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
        return Ok(());
    }
    let gbs = |b: f64| b / 1e9;
    writeln!(out, "model: {name}")?;
    writeln!(
        out,
        "machine: {}; GPU {:.0} GB/s, {:.1} TFLOPS; PCIe {:.1} GB/s; CPU {:.1} GB/s",
        machine.source,
        gbs(machine.gpu_bw),
        machine.gpu_flops / 1e12,
        gbs(machine.pcie_bw),
        gbs(machine.cpu_bw)
    )?;
    writeln!(out, "{plan}")?;
    let per_layer: Vec<String> = plan.resident_per_layer().iter().map(usize::to_string).collect();
    writeln!(out, "  resident experts per layer: {}", per_layer.join(" "))?;
    writeln!(
        out,
        "routing: {}",
        if trace.is_some() { "the trace's (hot experts placed first)" } else { "uniform" }
    )?;
    writeln!(out, "predicted:")?;
    writeln!(out, "  mixtral-q (hybrid): {ours}")?;
    writeln!(out, "  llama.cpp --n-cpu-moe {n_cpu_moe}: {theirs}")?;
    writeln!(
        out,
        "  mixtral-q / llama.cpp: decode {:.2}x, prompt {:.2}x",
        ours.decode_tok_s / theirs.decode_tok_s,
        ours.prompt_tok_s / theirs.prompt_tok_s
    )?;
    if let Some(w) = ram_warning {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

/// The figures: each given flag, else the measured CPU speed, else the preset's.
fn machine(args: &PlanArgs, measured_cpu: Option<f64>) -> Result<Machine> {
    let preset = match &args.preset {
        None => None,
        Some(name) => Some(Preset::find(name).with_context(|| {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            format!("unknown preset {name:?}: expected one of {}", names.join(", "))
        })?),
    };
    let base = preset.map(Preset::machine);
    let given = |flag: Option<f64>, what: &str, from_preset: Option<f64>| -> Result<f64> {
        match flag.map(|v| v * 1e9).or(from_preset) {
            Some(v) if v > 0.0 && v.is_finite() => Ok(v),
            Some(_) => bail!("{what} must be a positive number"),
            None => bail!("no {what}: give it, or a --preset ({})", preset_names()),
        }
    };
    let gpu_bw = given(args.gpu_bw, "--gpu-bw", base.as_ref().map(|m| m.gpu_bw))?;
    let pcie_bw = given(args.pcie_bw, "--pcie-bw", base.as_ref().map(|m| m.pcie_bw))?;
    let gpu_flops =
        given(args.gpu_tflops.map(|t| t * 1e3), "--gpu-tflops", base.as_ref().map(|m| m.gpu_flops))?;
    let cpu_bw = given(args.cpu_bw, "--cpu-bw", measured_cpu.or(base.as_ref().map(|m| m.cpu_bw)))?;
    let cpu_source = match (args.cpu_bw, measured_cpu) {
        (Some(_), _) => "CPU given",
        (None, Some(_)) => "CPU measured on this machine",
        _ => "CPU from the preset",
    };
    let source = match &base {
        Some(m) => format!("{}, {cpu_source}", m.source),
        None => format!("given figures, {cpu_source}"),
    };
    Ok(Machine { source, vram: base.map_or(0, |m| m.vram), gpu_bw, pcie_bw, cpu_bw, gpu_flops })
}

fn preset_names() -> String {
    PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}
