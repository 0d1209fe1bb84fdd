//! `mixtral-q generate -m M -p "text"`: streams a continuation. Flags follow llama.cpp's `llama-cli`
//! where they mean the same (`-n -1`, `--seed -1`, `-f FILE`, `-p -`, `--no-display-prompt`,
//! `--ignore-eos`, `-r/--reverse-prompt`).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use mixtral_q::routing;
use mixtral_q::text::{Generation, Sampler, SamplingParams, Sequence, Step, StopReason, StopSequences};

use super::load::{ModelArgs, DEMO_NOTICE};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (BOS is added); `-` reads it from standard input.
    #[arg(
        short,
        long,
        required_unless_present = "file",
        conflicts_with = "file",
        allow_hyphen_values = true
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Tokens to generate at most; -1: no limit (until EOS or a full context). Generation also stops at EOS.
    #[arg(short = 'n', long, default_value = "128", allow_negative_numbers = true, value_parser = parse_token_limit)]
    pub n_predict: TokenLimit,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Do not echo the prompt before the continuation.
    #[arg(long)]
    pub no_display_prompt: bool,
    /// Keep generating past EOS (until -n or a full context).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop when the continuation produces this text (not printed); may be given several times.
    #[arg(short = 'r', long = "reverse-prompt", visible_alias = "stop", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// Print one JSON object (text, prompt and generated ids, stop reason, seed, timings) instead of
    /// streaming.
    #[arg(long)]
    pub json: bool,
    /// Write the router's choices for every token processed to FILE (a routing trace, as
    /// `routing --json` writes, for `--routing-trace` and `plan --trace`).
    #[arg(long, value_name = "FILE")]
    pub record_routing: Option<PathBuf>,
    /// Print the backend's statistics (where the experts ran) after the timings.
    #[arg(long)]
    pub verbose: bool,
}

/// A token limit: a count, or none (`-1`, as llama.cpp spells it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLimit(pub Option<usize>);

pub fn parse_token_limit(s: &str) -> Result<TokenLimit, String> {
    parse_or_minus_one(s, "a token count (or -1 for no limit)").map(TokenLimit)
}

/// A number, or none when it is -1 (llama.cpp's spelling of "no limit" and "random seed").
fn parse_or_minus_one<T: std::str::FromStr>(s: &str, what: &str) -> Result<Option<T>, String> {
    match s.trim() {
        "-1" => Ok(None),
        v => v.parse().map(Some).map_err(|_| format!("{s:?} is not {what}")),
    }
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
    /// Penalty for repeating one of the last --repeat-last-n tokens; 1.0 is off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at (0: none).
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed; -1 (the default): a random one (`--json` reports the seed used).
    #[arg(short = 's', long, default_value = "-1", allow_negative_numbers = true, value_parser = parse_seed)]
    pub seed: Seed,
}

/// A seed, or none (`-1`): pick one at random.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seed(pub Option<u64>);

fn parse_seed(s: &str) -> Result<Seed, String> {
    parse_or_minus_one(s, "a seed (a number ≥ 0, or -1 for a random one)").map(Seed)
}

impl SamplingArgs {
    /// The parameters, checked as the REPL's `/set` checks them.
    pub fn params(&self) -> Result<SamplingParams> {
        let seed = self.seed.0.unwrap_or_else(|| {
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
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        // Named as the flags are (`--top-p`), with the rule the REPL's /set and the server apply.
        params.check().map_err(|e| {
            let flag = if e.field == "temperature" { "temp".to_owned() } else { e.field.replace('_', "-") };
            anyhow!("--{flag} {}", e.rule)
        })?;
        Ok(params)
    }
}

impl GenerateArgs {
    /// `-p TEXT`, `-p -` (standard input) or `-f FILE`.
    fn prompt(&self) -> Result<String> {
        match (&self.prompt, &self.file) {
            (_, Some(path)) => {
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
            }
            (Some(p), None) if p == "-" => {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read the prompt from standard input")?;
                Ok(text)
            }
            (Some(p), None) => Ok(p.clone()),
            (None, None) => bail!("give a prompt with -p TEXT, -p - (standard input) or -f FILE"),
        }
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    let prompt = args.prompt()?;
    if prompt.is_empty() {
        bail!("the prompt is empty: give some text with -p or -f");
    }
    let loaded = args.model.load()?;
    if loaded.is_demo && !args.json {
        eprintln!("{DEMO_NOTICE}");
    }
    let tok = &loaded.tokenizer;
    let prompt_ids = tok.encode(&prompt, true)?;
    if prompt_ids.len() >= loaded.ctx {
        bail!(
            "the prompt is {} tokens, but the context holds {} (raise --ctx)",
            prompt_ids.len(),
            loaded.ctx
        );
    }
    let mut engine = loaded.engine()?;
    let seed = params.seed;
    let mut sampler = Sampler::new(params);
    let mut stops = StopSequences::new(args.stop.clone());
    let mut out = std::io::stdout().lock();
    if !args.json && !args.no_display_prompt {
        write!(out, "{prompt}")?;
        out.flush()?;
    }

    if args.record_routing.is_some() {
        engine.set_router_trace(true)?;
    }
    let mut seq = Sequence::new(engine.as_mut());
    let limit = args.n_predict.0.unwrap_or(usize::MAX);
    let mut generation = Generation::new(&mut seq, tok, prompt_ids.clone(), limit);
    generation.set_ignore_eos(args.ignore_eos);
    generation.continue_prompt_text();
    let mut text = String::new();
    let stop = loop {
        if limit == 0 {
            break Stop::Generation(StopReason::MaxTokens);
        }
        match generation.step(&mut seq, &mut sampler)? {
            Step::Prompt => {}
            Step::Token { text: piece, .. } => {
                let (shown, stopped) = stops.push(&piece);
                text.push_str(&shown);
                if !args.json {
                    write!(out, "{shown}")?;
                    out.flush()?;
                }
                if stopped {
                    break Stop::String;
                }
            }
            Step::Stopped(reason) => break Stop::Generation(reason),
        }
    };
    // What the decoder and the stop sequences still hold (nothing after a stop sequence).
    let mut rest = String::new();
    if stop != Stop::String {
        rest = stops.push(&generation.flush()).0 + &stops.finish();
        text.push_str(&rest);
    }
    let generated = generation.generated().to_vec();
    let (prompt_secs, gen_secs) = generation.seconds();
    drop(generation);
    let processed = seq.cached().to_vec();
    drop(seq);
    if let Some(path) = &args.record_routing {
        let trace = routing::recorded(&loaded.model, tok, &processed, engine.take_router_trace())?;
        mixtral_q::format::output::write_atomic(path, trace.to_json()?.as_bytes())?;
    }
    let experts = engine.expert_stats();

    if args.json {
        let json = serde_json::json!({
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": text,
            "stop_reason": stop.name(),
            "seed": seed,
            "timings": {
                "prompt_tokens": prompt_ids.len(),
                "prompt_seconds": prompt_secs,
                "prompt_tokens_per_second": prompt_ids.len() as f64 / prompt_secs.max(1e-9),
                "generated_tokens": generated.len(),
                "generate_seconds": gen_secs,
                "generate_tokens_per_second": generated.len() as f64 / gen_secs.max(1e-9),
            },
            "experts": experts.map(|e| e.to_json()),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    } else {
        writeln!(out, "{rest}")?;
        if stop == Stop::Generation(StopReason::ContextFull) {
            eprintln!(
                "note: generation stopped because the context is full ({} tokens; raise --ctx for longer output)",
                loaded.ctx
            );
        }
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s",
            prompt_ids.len(),
            prompt_ids.len() as f64 / prompt_secs.max(1e-9),
            generated.len(),
            generated.len() as f64 / gen_secs.max(1e-9)
        );
        if args.verbose {
            if let Some(line) = engine.stats_line() {
                eprintln!("backend: {line}");
            }
        }
    }
    Ok(())
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Generation(StopReason),
    /// A `-r/--reverse-prompt` string appeared.
    String,
}

impl Stop {
    /// The name in `--json`.
    fn name(self) -> &'static str {
        match self {
            Stop::Generation(StopReason::Eos) => "eos",
            Stop::Generation(StopReason::MaxTokens) => "max_tokens",
            Stop::Generation(StopReason::ContextFull) => "context_full",
            Stop::String => "stop_string",
        }
    }
}
