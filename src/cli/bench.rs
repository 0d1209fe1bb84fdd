//! `mixtral-q bench -m M [-p 512] [-n 128] [-d 0] [-t N] [-r 3] [-o md|json]`: prompt and decode tokens/s
//! in llama-bench's form (mean ± standard deviation over the repetitions, after one warm-up run),
//! optionally with `-d` tokens already in the KV cache (llama-bench's depth: long-context speed).
//! Like llama-bench, `-p`, `-n`, `-d` and `-t` take comma lists (`-p 64,512 -t 1,2`): one row per
//! combination.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use mixtral_q::engine::ExpertStats;
use mixtral_q::format::FileType;

use super::load::{Loaded, ModelArgs};
use super::{human_bytes, human_count};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens processed in one batch (0 skips the prompt test); a comma list runs each.
    #[arg(short = 'p', long = "n-prompt", default_value = "512", value_delimiter = ',')]
    pub n_prompt: Vec<usize>,
    /// Tokens generated one at a time (0 skips the decode test); a comma list runs each.
    #[arg(short = 'n', long = "n-gen", default_value = "128", value_delimiter = ',')]
    pub n_gen: Vec<usize>,
    /// Tokens already in the KV cache when each test starts (processed once, not timed); a comma list.
    #[arg(short = 'd', long = "n-depth", default_value = "0", value_delimiter = ',')]
    pub depth: Vec<usize>,
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
    threads: usize,
    depth: usize,
    samples: Vec<f64>,
    /// Where the experts ran during the timed runs (engines that schedule them).
    experts: Option<ExpertStats>,
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

/// Token ids spread over the vocabulary, as llama-bench uses random tokens.
fn tokens(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 1) % vocab).collect()
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    if args.model.threads.contains(&0) {
        bail!("-t must be at least 1");
    }
    let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let mut model_args = args.model.clone();
    // Thread counts are applied per test below, not to the global pool.
    model_args.threads.clear();
    let needed = max(&args.depth) + max(&args.n_prompt).max(max(&args.n_gen) + 1);
    model_args.ctx = Some(args.model.ctx.unwrap_or(0).max(needed));
    let loaded = model_args.load()?;

    let results = match &args.model.threads[..] {
        [] => measure(args, &loaded)?,
        list => {
            // One pool per thread count; the engine is made inside it, so that all its work runs there.
            let mut all = Vec::new();
            for &n in list {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().context("thread pool")?;
                all.extend(pool.install(|| measure(args, &loaded))?);
            }
            all
        }
    };

    let cfg = &loaded.model.config;
    let size = loaded.model.file.file_size();
    let params = cfg.n_params();
    let backend = loaded.backend();
    let name = format!(
        "mixtral {}L {}x{} {}",
        cfg.n_layers,
        cfg.n_experts,
        cfg.hidden_size,
        loaded
            .model
            .file
            .metadata
            .get_u64("general.file_type")
            .and_then(FileType::from_id)
            .map_or("?", |f| f.description)
    );
    // Benchmarks say which routing they ran: random weights route with no locality.
    let routing = match &args.model.routing_trace {
        Some(path) => format!("replayed from {}", path.display()),
        None => "the model's router".to_owned(),
    };
    match args.output {
        Format::Md => {
            println!("| model | size | params | backend | threads | test | t/s |");
            println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
            for m in &results {
                println!(
                    "| {name} | {} | {} | {backend} | {} | {} | {:.2} ± {:.2} |",
                    human_bytes(size),
                    human_count(params),
                    m.threads,
                    m.test,
                    m.mean(),
                    m.stddev()
                );
            }
            eprintln!("routing: {routing}");
            for m in &results {
                if let Some(e) = &m.experts {
                    eprintln!("{}: {e}", m.test);
                }
            }
        }
        Format::Json => {
            let rows: Vec<_> = results
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "model": name, "model_size": size, "model_n_params": params, "backend": backend,
                        "n_threads": m.threads, "test": m.test, "n_tokens": m.n_tokens, "n_depth": m.depth,
                        "avg_ts": m.mean(), "stddev_ts": m.stddev(), "samples_ts": m.samples,
                        "routing": routing, "experts": m.experts.map(|e| e.to_json()),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
    }
    Ok(())
}

/// Every test of `args` on the current thread pool.
fn measure(args: &BenchArgs, loaded: &Loaded) -> Result<Vec<Measurement>> {
    let mut engine = loaded.engine()?;
    let vocab = engine.config().vocab_size as u32;
    let threads = rayon::current_num_threads();
    let mut results = Vec::new();
    for &depth in &args.depth {
        // The cache is filled once per depth; every repetition cuts it back to the depth.
        engine.truncate(0);
        if depth > 0 {
            engine.forward(&tokens(depth, vocab), false)?;
        }
        let at_depth = if depth > 0 { format!(" @ d{depth}") } else { String::new() };
        for &n in args.n_prompt.iter().filter(|&&n| n > 0) {
            let before = engine.expert_stats();
            let samples = repeat(args.repetitions, || {
                engine.truncate(depth);
                let t = Instant::now();
                engine.forward(&tokens(n, vocab), false)?;
                Ok(n as f64 / t.elapsed().as_secs_f64())
            })?;
            results.push(Measurement {
                test: format!("pp{n}{at_depth}"),
                n_tokens: n,
                threads,
                depth,
                samples,
                experts: since(engine.expert_stats(), before),
            });
        }
        for &n in args.n_gen.iter().filter(|&&n| n > 0) {
            let before = engine.expert_stats();
            let samples = repeat(args.repetitions, || {
                // From an empty cache, BOS first, as llama-bench does.
                engine.truncate(depth);
                if depth == 0 {
                    engine.forward(&[1], false)?;
                }
                let t = Instant::now();
                for token in tokens(n, vocab) {
                    engine.forward(&[token], false)?;
                }
                Ok(n as f64 / t.elapsed().as_secs_f64())
            })?;
            results.push(Measurement {
                test: format!("tg{n}{at_depth}"),
                n_tokens: n,
                threads,
                depth,
                samples,
                experts: since(engine.expert_stats(), before),
            });
        }
    }
    Ok(results)
}

/// The expert counts between two readings of an engine's stats.
fn since(now: Option<ExpertStats>, before: Option<ExpertStats>) -> Option<ExpertStats> {
    Some(now?.since(&before.unwrap_or_default()))
}

/// `repetitions` timed runs after one warm-up run.
fn repeat(repetitions: usize, mut run: impl FnMut() -> Result<f64>) -> Result<Vec<f64>> {
    run()?;
    (0..repetitions).map(|_| run()).collect()
}
