//! `mixtral-q imatrix -m M -f TEXT [-o imatrix.gguf]`: an importance matrix from our engine's
//! activations on a calibration text, as llama-imatrix computes it (windows of `--ctx` tokens, each
//! window's first token replaced by BOS; every token's activations counted, each expert's from the
//! tokens routed to it), in llama.cpp's GGUF format or its legacy `.dat` format by the output's
//! extension. `quantize --imatrix FILE` uses it, and so does llama-quantize.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mixtral_q::engine::importance::{collected, collecting_engine};
use mixtral_q::engine::{DeviceChoice, Engine};

use super::load::ModelArgs;
use super::perplexity::{log_softmax, windows};

/// llama-imatrix's default window.
const DEFAULT_CTX: usize = 512;

#[derive(clap::Args, Debug)]
pub struct ImatrixArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text (plain UTF-8).
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Output file: llama.cpp's GGUF imatrix format for a .gguf name, its legacy format otherwise.
    #[arg(short = 'o', long = "output-file", visible_alias = "output", default_value = "imatrix.gguf")]
    pub output: PathBuf,
    /// Process at most this many windows (llama-imatrix's --chunks).
    #[arg(long)]
    pub chunks: Option<usize>,
}

pub fn run(args: &ImatrixArgs) -> Result<()> {
    if !matches!(args.model.device, DeviceChoice::Auto | DeviceChoice::Cpu) {
        bail!("imatrix runs on the CPU (--device cpu); it reads every activation on the host");
    }
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let loaded = args.model.load()?;
    let ctx = args.model.ctx.unwrap_or(DEFAULT_CTX.min(loaded.model.config.context_length));
    if ctx < 2 {
        bail!("--ctx must be at least 2 for imatrix");
    }
    let tok = &loaded.tokenizer;
    let tokens = tok.encode(&text, true)?;
    if tokens.len() < 2 * ctx {
        bail!(
            "{} has {} tokens; an importance matrix with --ctx {ctx} needs at least {} (as llama-imatrix): \
             give a longer text or a smaller --ctx",
            args.file.display(),
            tokens.len(),
            2 * ctx
        );
    }
    // Whole windows only, as llama-imatrix; every token of each is collected, the second half scored.
    let windows = windows(&tokens, tok.bos_id(), ctx, false, args.chunks)
        .with_context(|| format!("in {}", args.file.display()))?;
    let mut engine = collecting_engine(&loaded.model, ctx)?;
    let vocab = engine.config().vocab_size;

    let start = Instant::now();
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut log_probs = vec![0f32; vocab];
    for (i, window) in windows.iter().enumerate() {
        engine.truncate(0);
        let logits = engine.forward(&window.tokens, true)?;
        for j in window.first..window.tokens.len() - 1 {
            log_softmax(&logits[j * vocab..(j + 1) * vocab], &mut log_probs);
            nll -= log_probs[window.tokens[j + 1] as usize] as f64;
            scored += 1;
        }
        eprint!("{}[{}]{:.4}", if i == 0 { "" } else { "," }, i + 1, (nll / scored.max(1) as f64).exp());
    }
    eprintln!();

    let mut imatrix = collected(&engine);
    imatrix.datasets = vec![args.file.display().to_string()];
    imatrix.chunk_count = windows.len() as u32;
    imatrix.chunk_size = ctx as u32;
    imatrix.write(&args.output)?;
    println!(
        "wrote {}: {} entries from {} windows of {ctx} tokens ({} tokens, perplexity {:.4}) in {:.1} s",
        args.output.display(),
        imatrix.entries.len(),
        windows.len(),
        windows.len() * ctx,
        (nll / scored.max(1) as f64).exp(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
