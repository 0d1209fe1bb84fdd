//! The read-eval-print loop: rustyline for editing, history and completion; multi-line input; Ctrl-C.
//!
//! Ctrl-C: at the prompt rustyline has the terminal in raw mode, so Ctrl-C arrives as a key and
//! readline returns `Interrupted` (the line is cleared). While a reply streams the terminal is in its
//! normal mode, so Ctrl-C is a SIGINT; the handler then only sets a flag that the generation loop polls.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{CompletionType, Config, Context, Editor, Helper};

use super::commands::{self, Outcome, COMMANDS, SET_KEYS};
use super::session::{Session, StopReason, TurnStats};

const PROMPT: &str = ">>> ";
const CONTINUATION_PROMPT: &str = "... ";
/// Opens and closes a multi-line block, as in ollama.
const BLOCK_QUOTE: &str = "\"\"\"";

/// True while a turn runs: SIGINT then stops the reply instead of ending the program.
static GENERATING: AtomicBool = AtomicBool::new(false);
/// Set by SIGINT during a turn; polled by the generation loop.
static STOP: AtomicBool = AtomicBool::new(false);

pub struct ReplOptions {
    pub history: PathBuf,
    /// Print reused / new prompt tokens after each reply (`--verbose`, `/set verbose`).
    pub verbose: bool,
    /// What `/show info` prints: (name, value) rows.
    pub model_info: Vec<(String, String)>,
    /// Print the prompt and reply token ids after each reply (env `MIXTRAL_Q_CHAT_DEBUG`, for tests).
    pub debug_ids: bool,
}

pub fn run(session: &mut Session, mut options: ReplOptions) -> Result<()> {
    let config = Config::builder()
        .auto_add_history(false)
        .max_history_size(2000)
        .context("history size")?
        .completion_type(CompletionType::List)
        .build();
    let mut editor: Editor<CommandCompleter, DefaultHistory> = Editor::with_config(config)?;
    // After the editor: rustyline installs a SIGINT handler of its own when it opens the terminal, which
    // would otherwise replace this one for the whole session.
    install_interrupt_handler()?;
    editor.set_helper(Some(CommandCompleter));
    load_history(&mut editor, &options.history);
    // Dropped after a failed write, so that the warning is printed once.
    let mut history_file = Some(options.history.as_path());

    // Replies go to standard output; everything else (command output, notices) to standard error,
    // so that piped chat writes only the answers to its output.
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let text = match read_input(&mut editor)? {
            Input::Text(text) => text,
            Input::Cancelled => continue,
            Input::Eof => break,
        };
        if text.trim().is_empty() {
            continue;
        }
        if !add_history(&mut editor, &text, history_file) {
            history_file = None;
        }
        if text.trim_start().starts_with('/') {
            match commands::run(&text, session, &options.model_info, &mut stderr) {
                Ok(Outcome::Exit) => break,
                Ok(Outcome::Continue) => {}
                Ok(Outcome::Verbose(on)) => options.verbose = on,
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        reply(session, &text, &options, &mut stdout)?;
    }
    Ok(())
}

/// One turn: streams the reply, then says why it stopped early (if it did) and the verbose lines.
fn reply(session: &mut Session, text: &str, options: &ReplOptions, out: &mut std::io::Stdout) -> Result<()> {
    STOP.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let result = session.turn(text, out, &STOP);
    GENERATING.store(false, Ordering::SeqCst);
    match result {
        Ok(stats) => {
            writeln!(out)?;
            out.flush()?;
            // Why the reply stopped is a notice: standard error.
            let notices = &mut std::io::stderr();
            match stats.stop {
                StopReason::Eos => {}
                StopReason::Interrupted if stats.generated == 0 => {
                    writeln!(notices, "(interrupted before the reply began: the message was not kept)")?
                }
                StopReason::Interrupted => writeln!(notices, "(interrupted)")?,
                StopReason::MaxTokens => writeln!(
                    notices,
                    "(stopped at max_tokens = {}: /set max_tokens N for longer replies)",
                    session.settings().max_tokens
                )?,
                StopReason::ContextFull => writeln!(notices, "(the context is full: the reply was cut)")?,
                StopReason::StopString => {}
            }
            report(&stats, session.engine_stats(), options);
        }
        Err(e) => eprintln!("\nerror: {e:#}"),
    }
    Ok(())
}

fn report(stats: &TurnStats, engine_stats: Option<String>, options: &ReplOptions) {
    if options.verbose {
        eprintln!(
            "[prompt: {} tokens reused from the cache, {} new processed in {:.2} s; reply: {} tokens, {:.1} tokens/s]",
            stats.reused,
            stats.processed,
            stats.prompt_secs,
            stats.generated,
            stats.generated as f64 / stats.generate_secs.max(1e-9)
        );
        if let Some(line) = engine_stats {
            eprintln!("[backend: {line}]");
        }
    }
    if options.debug_ids {
        eprintln!("debug: prompt ids {:?}", stats.prompt_ids);
        eprintln!("debug: reply ids {:?}", stats.reply_ids);
    }
}

fn install_interrupt_handler() -> Result<()> {
    let interactive = std::io::stdin().is_terminal();
    ctrlc::set_handler(move || {
        if GENERATING.load(Ordering::SeqCst) {
            STOP.store(true, Ordering::SeqCst);
        } else if !interactive {
            // Reading piped input: Ctrl-C means quit, as for any filter.
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")
}

enum Input {
    Text(String),
    /// Ctrl-C at the prompt: the line (or multi-line block) is dropped.
    Cancelled,
    Eof,
}

/// One message or command: a line; lines ending in `\` continue on the next; a line starting with
/// `"""` opens a block that a line ending in `"""` closes.
fn read_input(editor: &mut Editor<CommandCompleter, DefaultHistory>) -> Result<Input> {
    let mut lines: Vec<String> = Vec::new();
    let mut in_block = false;
    loop {
        let prompt = if lines.is_empty() && !in_block { PROMPT } else { CONTINUATION_PROMPT };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => return Ok(Input::Cancelled),
            Err(ReadlineError::Eof) => return Ok(Input::Eof),
            Err(e) => return Err(e).context("cannot read the terminal"),
        };
        let mut line = line.as_str();
        if !in_block && lines.is_empty() {
            if let Some(rest) = line.trim_start().strip_prefix(BLOCK_QUOTE) {
                in_block = true;
                line = rest;
            }
        }
        if in_block {
            if let Some(head) = line.trim_end().strip_suffix(BLOCK_QUOTE) {
                lines.push(head.to_owned());
                return Ok(Input::Text(lines.join("\n").trim_matches('\n').to_owned()));
            }
            lines.push(line.to_owned());
        } else if let Some(head) = line.strip_suffix('\\') {
            lines.push(head.to_owned());
        } else {
            lines.push(line.to_owned());
            return Ok(Input::Text(lines.join("\n")));
        }
    }
}

fn load_history(editor: &mut Editor<CommandCompleter, DefaultHistory>, path: &Path) {
    match editor.load_history(path) {
        Ok(()) => {}
        Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("warning: cannot read the history file {}: {e}", path.display()),
    }
}

/// Adds to the history and appends it to the file at once, so that it survives a crash or kill.
/// Returns false when the file cannot be written (after saying so).
fn add_history(
    editor: &mut Editor<CommandCompleter, DefaultHistory>,
    text: &str,
    path: Option<&Path>,
) -> bool {
    if !matches!(editor.add_history_entry(text), Ok(true)) {
        return true;
    }
    let Some(path) = path else { return true };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match editor.append_history(path) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "warning: cannot write the history file {}: {e} (history is kept for this session only)",
                path.display()
            );
            false
        }
    }
}

/// Tab completion of slash commands and of `/set` keys.
struct CommandCompleter;

impl Completer for CommandCompleter {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        if !head.starts_with('/') {
            return Ok((0, Vec::new()));
        }
        let pair = |word: &str| Pair { display: word.to_owned(), replacement: format!("{word} ") };
        let candidates = match head.split_once(char::is_whitespace) {
            None => COMMANDS.iter().map(|c| c.0).filter(|name| name.starts_with(head)).map(pair).collect(),
            Some(("/set", rest)) => {
                let word = rest.trim_start();
                if word.contains(char::is_whitespace) {
                    Vec::new()
                } else {
                    let start = pos - word.len();
                    let keys = SET_KEYS.iter().filter(|k| k.starts_with(word)).map(|k| pair(k)).collect();
                    return Ok((start, keys));
                }
            }
            Some(_) => Vec::new(),
        };
        Ok((0, candidates))
    }
}

impl Hinter for CommandCompleter {
    type Hint = String;
}
impl Highlighter for CommandCompleter {}
impl Validator for CommandCompleter {}
impl Helper for CommandCompleter {}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(line: &str) -> (usize, Vec<String>) {
        let history = DefaultHistory::new();
        let ctx = Context::new(&history);
        let (start, pairs) = CommandCompleter.complete(line, line.len(), &ctx).unwrap();
        (start, pairs.into_iter().map(|p| p.replacement).collect())
    }

    #[test]
    fn completes_commands_and_set_keys() {
        assert_eq!(complete("/sh"), (0, vec!["/show ".to_owned()]));
        assert_eq!(complete("/s").1.len(), 5);
        assert_eq!(complete("/set top"), (5, vec!["top_k ".to_owned(), "top_p ".to_owned()]));
        assert_eq!(complete("/set  m"), (6, vec!["min_p ".to_owned(), "max_tokens ".to_owned()]));
        assert!(complete("/set temp 0").1.is_empty());
        assert!(complete("hello /s").1.is_empty());
        assert!(complete("/save /tm").1.is_empty());
    }
}
