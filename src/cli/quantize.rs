//! `mixtral-q quantize <HF_DIR | IN.gguf> -o <OUT.gguf>`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use mixtral_q::format::imatrix::ImportanceMatrix;
use mixtral_q::format::GgmlType;
use mixtral_q::quantize::{
    parse_tensor_override, parse_type, quantize_input, QuantizeOptions, QuantizeReport, Target, TypeOverrides,
};

use super::human_bytes;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// A Hugging Face checkpoint directory (config.json, safetensors shards, tokenizer.json), or a GGUF
    /// file to requantize (told by its GGUF magic; its metadata is kept but the file type).
    pub input: PathBuf,
    /// Output GGUF file (written to a temporary file beside it and renamed at the end; it may be the
    /// input file).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Type mix, llama.cpp's names (case-insensitive): Q2_K, Q2_K_S, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K,
    /// Q8_0, Q4_0, F16, BF16, F32; q4_k is ours: Q4_K_M's attention and head, every expert matrix Q4_K.
    /// Q2_K_S fits Mixtral-8x7B in a 16 GiB card with a 4K context (llama.cpp makes it only with an
    /// importance matrix: give one with --imatrix).
    #[arg(long = "type", value_enum, ignore_case = true, default_value = "q4_k")]
    pub target: Target,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Importance matrix (`mixtral-q imatrix`, or llama-imatrix's .gguf/.dat): quantize minimizing
    /// each weight's error weighted by its column's importance.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Print every tensor's type and relative RMSE.
    #[arg(short, long)]
    pub verbose: bool,
    /// Requantize tensors a GGUF input stores quantized already (Q4_K, Q8_0, ...) to another type.
    /// Quality suffers: every weight is rounded twice, so the result is worse than quantizing from an
    /// F32, F16 or BF16 file. Tensors already in their target type are copied either way.
    #[arg(long)]
    pub allow_requantize: bool,
    /// Type of token_embd.weight over the mix's (q8_0, q6_k, f16, ...), as llama-quantize's flag.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    pub token_embedding_type: Option<GgmlType>,
    /// Type of output.weight over the mix's, as llama-quantize's flag.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    pub output_tensor_type: Option<GgmlType>,
    /// PATTERN=TYPE: every tensor whose GGUF name the regular expression PATTERN matches gets TYPE
    /// (`ffn_down=q6_k`, `blk\.[0-3]\.ffn_up=q5_k`); repeatable, the last match wins, as in llama-quantize.
    #[arg(long, value_name = "PATTERN=TYPE", value_parser = parse_tensor_override)]
    pub tensor_type: Vec<(regex::Regex, GgmlType)>,
}

pub fn run(args: &QuantizeArgs) -> Result<()> {
    let mut opts = QuantizeOptions::new(args.target);
    opts.threads = args.threads;
    opts.verbose = args.verbose;
    opts.progress = std::io::stderr().is_terminal();
    opts.cancel = Some(cancel_on_ctrl_c());
    opts.allow_requantize = args.allow_requantize;
    opts.overrides = TypeOverrides {
        token_embd: args.token_embedding_type,
        output: args.output_tensor_type,
        tensors: args.tensor_type.clone(),
    };
    if let Some(path) = &args.imatrix {
        opts.imatrix = Some(Arc::new((path.clone(), ImportanceMatrix::read(path)?)));
    }
    let report = quantize_input(&args.input, &args.output, &opts)?;
    print_report(&report, args.verbose);
    if args.target == Target::Q2KS && args.imatrix.is_none() {
        // llama-quantize refuses Q2_K_S without --imatrix; we make it, but the user should know.
        eprintln!(
            "note: llama.cpp makes Q2_K_S only with an importance matrix (--imatrix, from `mixtral-q imatrix`); \
             without one expect more loss than llama.cpp's Q2_K_S"
        );
    }
    Ok(())
}

/// Ctrl-C sets a flag that the conversion polls: it stops, removes its temporary file and returns an
/// error, so an interrupted run never leaves a half-written output.
pub fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    // Failing to install the handler only loses the clean-up on Ctrl-C; the conversion still works.
    let _ = ctrlc::set_handler(move || set.store(true, Ordering::Relaxed));
    flag
}

pub fn print_report(report: &QuantizeReport, verbose: bool) {
    if verbose {
        for t in &report.tensors {
            let err = match t.rel_rmse {
                _ if t.copied => "copied".to_string(),
                Some(e) => format!("{e:.5}"),
                None => String::new(),
            };
            println!("{:<32} {:<5} {:>12} {err}", t.name, t.ty.name(), t.n_elements);
        }
    }
    let params: u64 = report.tensors.iter().map(|t| t.n_elements).sum();
    let secs = report.seconds.max(1e-9);
    println!(
        "wrote {}: {} tensors, {}, {:.2} bits per weight, in {:.1} s ({:.1} MB/s of input)",
        report.output.display(),
        report.tensors.len(),
        human_bytes(report.output_bytes),
        report.output_bytes as f64 * 8.0 / params.max(1) as f64,
        secs,
        report.input_bytes as f64 / 1e6 / secs,
    );
}
