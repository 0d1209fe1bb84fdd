//! `mixtral-q chat [-m MODEL.gguf]`: the interactive chat REPL.
//!
//! - `session`: the conversation, KV-cache reuse between turns, context trimming, /save and /load.
//! - `commands`: the slash commands.
//! - `repl`: the rustyline loop (history, completion, multi-line input, Ctrl-C).

use std::path::PathBuf;

use anyhow::Result;
use mixtral_q::text::ChatTemplate;

use super::generate::{parse_token_limit, SamplingArgs, TokenLimit};
use super::load::{cache_dir, ModelArgs, TemplateArgs, DEMO_NOTICE};

mod commands;
mod repl;
mod session;

use session::{check_settings, Session, Settings};

/// The keys of the REPL, for `mixtral-q chat --help`.
const REPL_HELP: &str = "In the chat: /help lists the commands (/system, /set, /show, /stats, /save, /load, \
/reset, /exit). End a line with \\ to continue on the next, or put a block between \"\"\" lines. Ctrl-C \
stops a reply (what was written stays in the conversation) or clears the line; Ctrl-D or /exit quits.";

#[derive(clap::Args, Debug)]
#[command(after_help = REPL_HELP)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System prompt (folded into the first user message when the template has no system role, as
    /// Mixtral-Instruct's has not).
    #[arg(long, visible_alias = "system-prompt", allow_hyphen_values = true)]
    pub system: Option<String>,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Reply length limit in tokens; -1: none (a reply also ends at EOS, a full context or on Ctrl-C).
    #[arg(short = 'n', long, visible_alias = "n-predict", default_value = "512", allow_negative_numbers = true, value_parser = parse_token_limit)]
    pub max_tokens: TokenLimit,
    /// A reply ends where this text appears (not shown); may be given several times.
    #[arg(short = 'r', long = "reverse-prompt", visible_alias = "stop", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// History file (default: $MIXTRAL_Q_HISTORY, else chat_history.txt in the cache folder).
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// After each reply, print how many prompt tokens came from the KV cache and how many were processed.
    #[arg(long)]
    pub verbose: bool,
    /// Keep generating past EOS (replies end at max_tokens, a full context or Ctrl-C): for benchmarks and tests.
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: &ChatArgs) -> Result<()> {
    let max_tokens = args.max_tokens.0.unwrap_or(usize::MAX);
    let settings = Settings { sampling: args.sampling.params()?, max_tokens };
    check_settings(&settings)?;
    let loaded = args.model.load()?;
    if loaded.is_demo {
        eprintln!("{DEMO_NOTICE}");
    }
    let metadata = &loaded.model.file.metadata;
    let template = match args.template.template(metadata) {
        Ok(template) => template,
        Err(e) if args.template.is_given() => return Err(e),
        Err(e) => {
            eprintln!("warning: {e:#}; using the Mixtral-Instruct template");
            ChatTemplate::mixtral_instruct()
        }
    };
    let options = repl::ReplOptions {
        history: history_path(args)?,
        verbose: args.verbose,
        model_info: super::info::summary(&loaded.model, loaded.ctx),
        debug_ids: std::env::var_os("MIXTRAL_Q_CHAT_DEBUG").is_some_and(|v| !v.is_empty() && v != "0"),
    };

    let mut engine = loaded.engine()?;
    let mut session = Session::new(engine.as_mut(), &loaded.tokenizer, template, settings);
    session.set_ignore_eos(args.ignore_eos);
    session.set_stop_strings(args.stop.clone());
    let name = metadata.get_str("general.name").unwrap_or("model");
    // Only replies go to standard output, so that piped chat (`mixtral-q chat < questions.txt`)
    // writes the answers alone; the banner, notices and command output go to standard error.
    eprintln!(
        "mixtral-q chat: {name}, context {} tokens. Type a message; /help lists the commands, Ctrl-D or /exit quits.",
        loaded.ctx
    );
    if let Some(system) = &args.system {
        commands::set_system(system, &mut session, &mut std::io::stderr())?;
    }
    repl::run(&mut session, options)
}

/// `--history`, else `$MIXTRAL_Q_HISTORY`, else `chat_history.txt` in the cache folder.
fn history_path(args: &ChatArgs) -> Result<PathBuf> {
    if let Some(path) = &args.history {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("MIXTRAL_Q_HISTORY") {
        return Ok(PathBuf::from(path));
    }
    Ok(cache_dir()?.join("chat_history.txt"))
}
