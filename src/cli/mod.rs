//! Subcommands, one module each.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod bench;
pub mod chat;
pub mod generate;
pub mod imatrix;
pub mod info;
pub mod llama_flags;
pub mod load;
pub mod perplexity;
pub mod plan;
pub mod quantize;
pub mod routing;
pub mod serve;
pub mod synth;
pub mod tokenize;

#[derive(Parser, Debug)]
#[command(name = "mixtral-q", version, about = "Mixtral-8x7B in 4 bits: quantize, inspect, generate, chat")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert a Hugging Face Mixtral checkpoint (safetensors) to a GGUF file, or requantize a GGUF file.
    Quantize(quantize::QuantizeArgs),
    /// Compute an importance matrix from a calibration text (llama-imatrix's file formats), for quantize --imatrix.
    Imatrix(imatrix::ImatrixArgs),
    /// Show what a GGUF file holds: hyperparameters, tensor types, size, tokenizer.
    Info(info::InfoArgs),
    /// Make a random-weight Mixtral (real Mixtral-8x7B shapes by default) for tests and benchmarks.
    Synth(synth::SynthArgs),
    /// Generate a continuation of a prompt, streaming it.
    Generate(generate::GenerateArgs),
    /// Perplexity of a text file.
    Perplexity(perplexity::PerplexityArgs),
    /// Show the token ids of a text, or of a chat rendered with the model's template.
    Tokenize(tokenize::TokenizeArgs),
    /// Prompt and decode speed, in llama-bench's table form.
    Bench(bench::BenchArgs),
    /// Chat with the model in an interactive prompt (the KV cache carries over between turns).
    Chat(chat::ChatArgs),
    /// Which experts the router picks for a text: shares per layer, repetition against chance (paper §5).
    Routing(routing::RoutingArgs),
    /// Serve the model over HTTP with OpenAI's API (chat and text completions, streaming).
    Serve(serve::ServeArgs),
    /// What lives where for a VRAM budget, and the decode and prompt speed to expect (beside llama.cpp's --n-cpu-moe).
    Plan(plan::PlanArgs),
}

/// The command line, with llama.cpp's spellings translated first (see [`llama_flags`]). Clap's own
/// errors (and `--help`) end the process as clap does.
pub fn parse() -> Result<Cli> {
    let args = llama_flags::translate(std::env::args_os())?;
    Ok(Cli::parse_from(args))
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Quantize(a) => quantize::run(&a),
        Command::Imatrix(a) => imatrix::run(&a),
        Command::Info(a) => info::run(&a),
        Command::Synth(a) => synth::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Perplexity(a) => perplexity::run(&a),
        Command::Tokenize(a) => tokenize::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Chat(a) => chat::run(&a),
        Command::Routing(a) => routing::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Plan(a) => plan::run(&a),
    }
}

/// Formats a byte count as llama.cpp does in its logs (MiB / GiB).
pub fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let n = n as f64;
    if n >= GIB {
        format!("{:.2} GiB", n / GIB)
    } else {
        format!("{:.2} MiB", n / MIB)
    }
}

/// A count as llama.cpp prints parameter counts: `3.86 M`, `46.70 B` (`K` below a million).
pub fn human_count(n: u64) -> String {
    let v = n as f64;
    if v >= 1e9 {
        format!("{:.2} B", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} K", v / 1e3)
    } else {
        n.to_string()
    }
}

/// `1 head`, `8 heads`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_plurals_read_naturally() {
        assert_eq!(human_count(3_857_152), "3.86 M");
        assert_eq!(human_count(46_702_792_704), "46.70 B");
        assert_eq!(human_count(12_345), "12.35 K");
        assert_eq!(human_count(999), "999");
        assert_eq!(plural(1, "thread"), "1 thread");
        assert_eq!(plural(2, "KV head"), "2 KV heads");
        assert_eq!(plural(0, "expert"), "0 experts");
    }
}
