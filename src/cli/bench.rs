//! `mixtral-q bench -m M [-p 512] [-n 128] [-d 0] [-r 3] [-o md|json]`: prompt and decode tokens/s in
//! llama-bench's form (mean ± standard deviation over the repetitions, after one warm-up run), optionally
//! with `-d` tokens already in the KV cache (llama-bench's depth: long-context speed).

use std::time::Instant;

use anyhow::{bail, Result};

use super::load::ModelArgs;
use super::{human_bytes, human_count};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens processed in one batch (0 skips the prompt test).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens generated one at a time (0 skips the decode test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Tokens already in the KV cache when each test starts (processed once, not timed).
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    pub depth: usize,
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repetitions: usize,
    #[arg(short = 'o', long, value_enum, default_value = "md")]
    pub output: Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Md,
    Json,
}

struct Measurement {
    test: String,
    n_tokens: usize,
    samples: Vec<f64>,
}

impl Measurement {
    fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len() as f64
    }

    fn stddev(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    let mut model_args = args.model.clone();
    let needed = args.depth + args.n_prompt.max(args.n_gen + 1);
    model_args.ctx = Some(args.model.ctx.unwrap_or(0).max(needed));
    let loaded = model_args.load()?;
    let mut engine = loaded.engine()?;
    let vocab = engine.config().vocab_size as u32;
    // Token ids spread over the vocabulary, as llama-bench uses random tokens.
    let tokens = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 7919 + 1) % vocab).collect() };
    // The cache is filled once; every repetition cuts it back to the depth.
    if args.depth > 0 {
        engine.forward(&tokens(args.depth), false)?;
    }
    let at_depth = if args.depth > 0 { format!(" @ d{}", args.depth) } else { String::new() };

    let mut results = Vec::new();
    if args.n_prompt > 0 {
        let prompt = tokens(args.n_prompt);
        let mut samples = Vec::new();
        for rep in 0..=args.repetitions {
            engine.truncate(args.depth);
            let t = Instant::now();
            engine.forward(&prompt, false)?;
            if rep > 0 {
                samples.push(args.n_prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        let test = format!("pp{}{at_depth}", args.n_prompt);
        results.push(Measurement { test, n_tokens: args.n_prompt, samples });
    }
    if args.n_gen > 0 {
        let gen = tokens(args.n_gen);
        let mut samples = Vec::new();
        for rep in 0..=args.repetitions {
            // From an empty cache, BOS first, as llama-bench does.
            engine.truncate(args.depth);
            if args.depth == 0 {
                engine.forward(&[1], false)?;
            }
            let t = Instant::now();
            for &token in &gen {
                engine.forward(&[token], false)?;
            }
            if rep > 0 {
                samples.push(args.n_gen as f64 / t.elapsed().as_secs_f64());
            }
        }
        let test = format!("tg{}{at_depth}", args.n_gen);
        results.push(Measurement { test, n_tokens: args.n_gen, samples });
    }

    let cfg = engine.config();
    let size = loaded.model.file.file_size();
    let params = cfg.n_params();
    let threads = rayon::current_num_threads();
    let backend = loaded.backend();
    let name = format!(
        "mixtral {}L {}x{} {}",
        cfg.n_layers,
        cfg.n_experts,
        cfg.hidden_size,
        loaded.model.file.metadata.get_u64("general.file_type").map(file_type_name).unwrap_or("?")
    );
    match args.output {
        Format::Md => {
            println!("| model | size | params | backend | threads | test | t/s |");
            println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
            for m in &results {
                println!(
                    "| {name} | {} | {} | {backend} | {threads} | {} | {:.2} ± {:.2} |",
                    human_bytes(size),
                    human_count(params),
                    m.test,
                    m.mean(),
                    m.stddev()
                );
            }
        }
        Format::Json => {
            let rows: Vec<_> = results
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "model": name, "model_size": size, "model_n_params": params, "backend": backend,
                        "n_threads": threads, "test": m.test, "n_tokens": m.n_tokens, "n_depth": args.depth,
                        "avg_ts": m.mean(), "stddev_ts": m.stddev(), "samples_ts": m.samples,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
    }
    Ok(())
}

/// llama.cpp's name of a `general.file_type`.
fn file_type_name(ft: u64) -> &'static str {
    match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        _ => "?",
    }
}
