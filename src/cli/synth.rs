//! `mixtral-q synth -o OUT [--hf | --type T] [--layers N] ...`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use mixtral_q::model::ModelConfig;
use mixtral_q::quantize::{QuantizeOptions, Target};
use mixtral_q::synth::{write_hf_checkpoint, write_random_gguf, HfDtype, RandomWeights};

use super::quantize::{cancel_on_ctrl_c, print_report};

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Output: a directory with --hf, else a GGUF file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write a Hugging Face checkpoint directory (safetensors shards, config.json, tokenizer).
    #[arg(long, conflicts_with = "target")]
    pub hf: bool,
    /// Weight type of the GGUF.
    #[arg(long = "type", value_enum, ignore_case = true, default_value = "q4_k")]
    pub target: Target,
    /// Element type of the --hf safetensors.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: HfDtype,
    /// Largest --hf shard, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub shard_mib: u64,
    #[arg(long, default_value_t = 32)]
    pub layers: usize,
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    #[arg(long, default_value_t = 14336)]
    pub ffn: usize,
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    #[arg(long, default_value_t = 2)]
    pub experts_used: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let cfg = ModelConfig {
        vocab_size: args.vocab,
        hidden_size: args.hidden,
        ffn_size: args.ffn,
        n_layers: args.layers,
        n_heads: args.heads,
        n_kv_heads: args.kv_heads,
        head_dim: args.hidden / args.heads.max(1),
        n_experts: args.experts,
        n_experts_used: args.experts_used,
        ..ModelConfig::mixtral_8x7b(args.layers)
    };
    cfg.validate()?;
    let weights = RandomWeights::new(cfg, args.seed);
    if args.hf {
        if let Some(n) = args.threads {
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
        }
        write_hf_checkpoint(&args.output, &weights, args.dtype, args.shard_mib << 20, args.seed)?;
        println!("wrote Hugging Face checkpoint {}", args.output.display());
    } else {
        let mut opts = QuantizeOptions::new(args.target);
        opts.threads = args.threads;
        opts.progress = std::io::stderr().is_terminal();
        opts.cancel = Some(cancel_on_ctrl_c());
        let report = write_random_gguf(&args.output, &weights, &opts, args.seed)?;
        print_report(&report, false);
    }
    Ok(())
}
