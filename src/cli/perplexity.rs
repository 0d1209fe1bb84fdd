//! `mixtral-q perplexity -m M -f FILE`: the file's tokens in consecutive windows of --ctx tokens,
//! BOS at the start of each window, every next token within a window scored.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::load::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let tokens = tok.encode(&text, false)?;
    if tokens.is_empty() {
        bail!("{} holds no text to score", args.file.display());
    }
    if loaded.ctx < 2 {
        bail!("--ctx must be at least 2 for perplexity");
    }
    let mut engine = loaded.engine()?;
    let vocab = engine.config().vocab_size;
    let start = Instant::now();
    let (mut nll, mut scored, mut processed) = (0f64, 0usize, 0usize);
    for chunk in tokens.chunks(loaded.ctx - 1) {
        let mut window = Vec::with_capacity(chunk.len() + 1);
        window.push(tok.bos_id());
        window.extend_from_slice(chunk);
        engine.truncate(0);
        let logits = engine.forward(&window, true)?;
        for (pos, &target) in window.iter().enumerate().skip(1) {
            nll -= log_softmax_at(&logits[(pos - 1) * vocab..pos * vocab], target as usize);
            scored += 1;
        }
        processed += window.len();
        if !args.json {
            eprint!("\r[{scored}/{}] ppl so far {:.4}", tokens.len(), (nll / scored as f64).exp());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let ppl = (nll / scored as f64).exp();
    if args.json {
        let json = serde_json::json!({
            "perplexity": ppl, "tokens_scored": scored, "ctx": loaded.ctx,
            "seconds": secs, "tokens_per_second": processed as f64 / secs.max(1e-9),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        eprintln!();
        println!(
            "perplexity: {ppl:.4} over {scored} tokens (ctx {}), {:.1} tokens/s",
            loaded.ctx,
            processed as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// log p(target) under softmax(logits), in f64.
fn log_softmax_at(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}
