//! `mixtral-q generate -m M -p "text"`: streams a continuation.

use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use mixtral_q::text::{Sampler, SamplingParams, StreamDecoder};

use super::load::{ModelArgs, DEMO_NOTICE};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (BOS is added).
    #[arg(short, long)]
    pub prompt: String,
    /// Tokens to generate at most (generation also stops at EOS).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, prompt and generated ids, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// Sampling flags, with llama.cpp's names and defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalty for repeating one of the last 64 tokens; 1.0 is off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Random seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The parameters, checked as the REPL's `/set` checks them.
    pub fn params(&self) -> Result<SamplingParams> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed,
            ..SamplingParams::default()
        };
        // Named as the flags are (`--top-p`), with the rule the REPL's /set and the server apply.
        params.check().map_err(|e| {
            let flag = if e.field == "temperature" { "temp".to_owned() } else { e.field.replace('_', "-") };
            anyhow!("--{flag} {}", e.rule)
        })?;
        Ok(params)
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    let loaded = args.model.load()?;
    if loaded.is_demo && !args.json {
        eprintln!("{DEMO_NOTICE}");
    }
    if args.prompt.is_empty() {
        bail!("the prompt is empty: give some text with -p");
    }
    let tok = &loaded.tokenizer;
    let prompt_ids = tok.encode(&args.prompt, true)?;
    if prompt_ids.len() >= loaded.ctx {
        bail!(
            "the prompt is {} tokens, but the context holds {} (raise --ctx)",
            prompt_ids.len(),
            loaded.ctx
        );
    }
    let mut engine = loaded.engine()?;
    let mut sampler = Sampler::new(params);
    let mut decoder = StreamDecoder::new(tok);
    let mut history = prompt_ids.clone();
    let mut generated = Vec::new();
    let mut out = std::io::stdout().lock();
    if !args.json {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }

    let t0 = Instant::now();
    let mut logits = engine.forward(&prompt_ids, false)?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    while generated.len() < args.n_predict && engine.position() < loaded.ctx {
        let next = sampler.sample(&logits, &history);
        if next == tok.eos_id() {
            break;
        }
        generated.push(next);
        history.push(next);
        if !args.json {
            write!(out, "{}", decoder.push(next)?)?;
            out.flush()?;
        }
        if generated.len() == args.n_predict || engine.position() == loaded.ctx {
            break;
        }
        logits = engine.forward(&[next], false)?;
    }
    let gen_secs = t1.elapsed().as_secs_f64();

    if args.json {
        let json = serde_json::json!({
            "prompt": args.prompt,
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": tok.decode(&generated)?,
            "timings": {
                "prompt_tokens": prompt_ids.len(),
                "prompt_seconds": prompt_secs,
                "prompt_tokens_per_second": prompt_ids.len() as f64 / prompt_secs.max(1e-9),
                "generated_tokens": generated.len(),
                "generate_seconds": gen_secs,
                "generate_tokens_per_second": generated.len() as f64 / gen_secs.max(1e-9),
            }
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    } else {
        writeln!(out, "{}", decoder.flush())?;
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s",
            prompt_ids.len(),
            prompt_ids.len() as f64 / prompt_secs.max(1e-9),
            generated.len(),
            generated.len() as f64 / gen_secs.max(1e-9)
        );
    }
    Ok(())
}
