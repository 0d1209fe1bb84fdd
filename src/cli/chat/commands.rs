//! Slash commands: `/help`, `/set temp 0.7`, `/save chat.json`, ...

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

use super::session::{check_settings, Session, StopReason};

/// Every command with its arguments and what it does (the `/help` text and the completion list).
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("/help", "", "show this help"),
    ("/reset", "", "forget the conversation (the system prompt and settings stay)"),
    ("/system", "[TEXT]", "set the system prompt (no TEXT: clear it)"),
    (
        "/set",
        "KEY VALUE",
        "change a setting: temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens \
         (also ollama's /set parameter NAME VALUE, /set system TEXT, /set verbose, /set quiet)",
    ),
    ("/show", "[info|parameters|system]", "show the settings and the system prompt (info: the model)"),
    ("/stats", "", "speed of the last reply, context used, backend statistics"),
    ("/save", "FILE", "save the conversation and settings as JSON"),
    ("/load", "FILE", "load a conversation saved with /save"),
    ("/exit", "", "quit (also /quit or Ctrl-D)"),
];

/// The keys of `/set` (with `system`, `parameter`, `verbose` and `quiet`, for completion).
pub const SET_KEYS: &[&str] = &[
    "temp",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "seed",
    "max_tokens",
    "system",
    "parameter",
    "verbose",
    "quiet",
];

/// What the REPL does after a command.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Continue,
    Exit,
    /// `/set verbose` (true) or `/set quiet` (false).
    Verbose(bool),
}

/// Runs one slash command line (starting with `/`). Bad input is an `Err` with a one-line message.
/// `model_info` is what `/show info` prints.
pub fn run(
    line: &str,
    session: &mut Session,
    model_info: &[(String, String)],
    out: &mut dyn Write,
) -> Result<Outcome> {
    let line = line.trim();
    let (name, arg) = match line.split_once(char::is_whitespace) {
        Some((name, arg)) => (name, arg.trim()),
        None => (line, ""),
    };
    match name {
        "/help" | "/?" => help(out)?,
        "/exit" | "/quit" | "/bye" => return Ok(Outcome::Exit),
        "/reset" | "/clear" => {
            session.reset();
            writeln!(out, "(conversation cleared)")?;
        }
        "/system" => set_system(arg, session, out)?,
        "/set" => return set(arg, session, out),
        "/show" => show(arg, session, model_info, out)?,
        "/stats" => stats(session, out)?,
        "/save" => {
            let path = file_arg(arg, "/save")?;
            session.save(path)?;
            writeln!(out, "(saved {} messages to {})", session.messages().len(), path.display())?;
        }
        "/load" => {
            let path = file_arg(arg, "/load")?;
            session.load(path)?;
            writeln!(out, "(loaded {} messages from {})", session.messages().len(), path.display())?;
        }
        _ => bail!("unknown command {name:?}: /help lists the commands"),
    }
    Ok(Outcome::Continue)
}

fn help(out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Commands:")?;
    for (name, args, what) in COMMANDS {
        writeln!(out, "  {:<18} {what}", format!("{name} {args}"))?;
    }
    writeln!(
        out,
        "Multi-line input: end a line with \\ to continue it, or put the text between \"\"\" lines."
    )?;
    writeln!(out, "Ctrl-C stops a reply (what was written stays in the conversation) or clears the line.")?;
    Ok(())
}

/// The note printed when the template has no system role.
pub const SYSTEM_FOLDED_NOTE: &str =
    "note: this model's chat template has no system role: the system prompt is \
added to the start of the first user message instead";

pub fn set_system(text: &str, session: &mut Session, out: &mut dyn Write) -> Result<()> {
    session.set_system(Some(text));
    match session.system() {
        None => writeln!(out, "(system prompt cleared)")?,
        Some(_) if session.system_supported() => writeln!(out, "(system prompt set)")?,
        Some(_) => writeln!(out, "(system prompt set)\n{SYSTEM_FOLDED_NOTE}")?,
    }
    Ok(())
}

fn set(arg: &str, session: &mut Session, out: &mut dyn Write) -> Result<Outcome> {
    let usage = || anyhow!("usage: /set KEY VALUE, KEY one of {}", SET_KEYS.join(", "));
    let (key, value) = match arg.split_once(char::is_whitespace) {
        Some((key, value)) => (key, value.trim()),
        None => (arg, ""),
    };
    match key {
        // ollama's spellings.
        "verbose" | "quiet" if value.is_empty() => {
            writeln!(out, "({key}: per-reply statistics {})", if key == "verbose" { "on" } else { "off" })?;
            return Ok(Outcome::Verbose(key == "verbose"));
        }
        "system" => {
            set_system(value, session, out)?;
            return Ok(Outcome::Continue);
        }
        "parameter" => {
            let (name, value) = value.split_once(char::is_whitespace).ok_or_else(|| {
                anyhow!("usage: /set parameter NAME VALUE (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, num_predict, stop)")
            })?;
            let key = match name {
                "temperature" => "temp",
                "num_predict" => "max_tokens",
                "stop" => {
                    let mut stops = session.stop_strings().to_vec();
                    stops.push(value.trim().to_owned());
                    session.set_stop_strings(stops);
                    writeln!(out, "(stop strings: {:?})", session.stop_strings())?;
                    return Ok(Outcome::Continue);
                }
                "num_ctx" => bail!("the context size is set when the chat starts: mixtral-q chat --ctx N"),
                other => other,
            };
            return set(&format!("{key} {}", value.trim()), session, out);
        }
        _ if value.is_empty() => return Err(usage()),
        _ => {}
    }
    let mut settings = session.settings().clone();
    let p = &mut settings.sampling;
    match key {
        "temp" | "temperature" => p.temperature = number(key, value)?,
        "top_k" => p.top_k = number(key, value)?,
        "top_p" => p.top_p = number(key, value)?,
        "min_p" => p.min_p = number(key, value)?,
        "repeat_penalty" => p.repeat_penalty = number(key, value)?,
        "repeat_last_n" => p.repeat_last_n = number(key, value)?,
        "seed" => p.seed = number(key, value)?,
        "max_tokens" => {
            settings.max_tokens = match value {
                "-1" => usize::MAX,
                _ => number(key, value)?,
            }
        }
        _ => return Err(usage()),
    }
    check_settings(&settings)?;
    session.set_settings(settings);
    writeln!(out, "({key} = {value})")?;
    Ok(Outcome::Continue)
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| anyhow!("{key}: {value:?} is not a valid value"))
}

fn file_arg<'a>(arg: &'a str, command: &str) -> Result<&'a Path> {
    if arg.is_empty() {
        bail!("usage: {command} FILE");
    }
    Ok(Path::new(arg))
}

fn show(what: &str, session: &Session, model_info: &[(String, String)], out: &mut dyn Write) -> Result<()> {
    let s = session.settings();
    let p = &s.sampling;
    let max_tokens =
        if s.max_tokens == usize::MAX { "-1 (no limit)".to_owned() } else { s.max_tokens.to_string() };
    let parameters = |out: &mut dyn Write| -> Result<()> {
        writeln!(
            out,
            "temp {}  top_k {}  top_p {}  min_p {}  repeat_penalty {}  repeat_last_n {}  seed {}  max_tokens {max_tokens}",
            p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n, p.seed
        )?;
        if !session.stop_strings().is_empty() {
            writeln!(out, "stop strings: {:?}", session.stop_strings())?;
        }
        Ok(())
    };
    let system = |out: &mut dyn Write| -> Result<()> {
        match session.system() {
            None => writeln!(out, "system prompt: (none)")?,
            Some(text) => {
                let how =
                    if session.system_supported() { "" } else { " (folded into the first user message)" };
                writeln!(out, "system prompt{how}: {text}")?;
            }
        }
        Ok(())
    };
    match what {
        "" => {
            parameters(out)?;
            system(out)?;
            let (used, ctx) = session.context_used();
            writeln!(
                out,
                "conversation: {} messages; context: {used} / {ctx} tokens",
                session.messages().len()
            )?;
        }
        "parameters" => parameters(out)?,
        "system" => system(out)?,
        "info" => {
            for (name, value) in model_info {
                writeln!(out, "  {name:<20} {value}")?;
            }
        }
        other => bail!("/show {other:?}: use /show, /show info, /show parameters or /show system"),
    }
    Ok(())
}

fn stats(session: &Session, out: &mut dyn Write) -> Result<()> {
    match session.last_turn() {
        None => writeln!(out, "no reply yet")?,
        Some(t) => {
            let per_sec = |n: usize, secs: f64| n as f64 / secs.max(1e-9);
            let stop = match t.stop {
                StopReason::Eos => "end of reply",
                StopReason::MaxTokens => "max_tokens",
                StopReason::ContextFull => "context full",
                StopReason::StopString => "stop string",
                StopReason::Interrupted => "interrupted",
            };
            writeln!(
                out,
                "prompt: {} tokens processed at {:.1} tokens/s ({} reused from the cache)",
                t.processed,
                per_sec(t.processed, t.prompt_secs),
                t.reused
            )?;
            writeln!(
                out,
                "reply: {} tokens at {:.1} tokens/s (stopped: {stop})",
                t.generated,
                per_sec(t.generated, t.generate_secs)
            )?;
        }
    }
    let (used, ctx) = session.context_used();
    writeln!(out, "context: {used} / {ctx} tokens")?;
    if let Some(line) = session.engine_stats() {
        writeln!(out, "backend: {line}")?;
    }
    Ok(())
}
