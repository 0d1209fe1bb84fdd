//! `mixtral-q chat` driven as a person would, through a pseudo-terminal: typing, streamed replies,
//! Ctrl-C, slash commands, multi-line input, tab completion, quitting. Runs the tiny random-weight model
//! of the fixture (models/tiny-mixtral, converted to Q4_K per test in a temporary folder); the prompt
//! token ids are checked against the chat fixture (HF transformers' rendering and tokenization).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rexpect::session::{spawn_with_options, Options, PtySession};
use serde_json::Value;

const PROMPT: &str = ">>> ";
/// Per expectation; the tiny model answers in well under a second.
const TIMEOUT_MS: u64 = 30_000;

struct Chat {
    pty: PtySession,
    dir: tempfile::TempDir,
}

impl Chat {
    /// Starts `mixtral-q chat -m TINY ARGS` and waits for the first prompt.
    fn start(args: &[&str]) -> Chat {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_q4_k(dir.path());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mixtral-q"));
        cmd.arg("chat")
            .arg("-m")
            .arg(&model)
            .args(args)
            .env("MIXTRAL_Q_CACHE", dir.path().join("cache"))
            .env("MIXTRAL_Q_HISTORY", dir.path().join("history.txt"))
            .env("MIXTRAL_Q_CHAT_DEBUG", "1")
            .env("TERM", "xterm")
            .env("RUST_BACKTRACE", "0");
        let options = Options::default().timeout_ms(Some(TIMEOUT_MS)).strip_ansi_escape_codes(true);
        let pty = spawn_with_options(cmd, options).expect("cannot start mixtral-q chat in a pty");
        let mut chat = Chat { pty, dir };
        chat.expect("mixtral-q chat: tiny-mixtral");
        chat.expect(PROMPT);
        chat
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything printed up to `needle`.
    fn expect(&mut self, needle: &str) -> String {
        self.pty.exp_string(needle).unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}"))
    }

    /// Waits until `n` more characters have been printed (a reply is streaming).
    fn read_some(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_millis(TIMEOUT_MS);
        let mut seen = 0;
        while seen < n {
            assert!(Instant::now() < deadline, "no output for {TIMEOUT_MS} ms");
            match self.pty.try_read() {
                Some(_) => seen += 1,
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Types `text` and Enter.
    fn type_line(&mut self, text: &str) {
        self.pty.send(text).unwrap();
        self.pty.send("\r").unwrap();
        self.pty.flush().unwrap();
    }

    /// Types a slash command and returns its output (up to the next prompt).
    fn command(&mut self, line: &str) -> String {
        self.type_line(line);
        self.expect(PROMPT)
    }

    /// Types a message; returns the prompt ids and reply ids of the turn (from the debug lines) and
    /// everything printed up to the next prompt.
    fn turn(&mut self, message: &str) -> Turn {
        self.type_line(message);
        let output = self.expect(PROMPT);
        Turn {
            prompt_ids: ids_after(&output, "debug: prompt ids "),
            reply_ids: ids_after(&output, "debug: reply ids "),
            output,
        }
    }

    /// /save to a file in the test folder and returns it parsed.
    fn saved(&mut self) -> Value {
        let path = self.path("saved.json");
        let out = self.command(&format!("/save {}", path.display()));
        assert!(out.contains("(saved"), "{out}");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    /// Waits for the process to end and checks it exited with 0; returns the test folder.
    fn expect_exit_ok(mut self) -> tempfile::TempDir {
        self.pty.exp_eof().expect("mixtral-q chat did not exit");
        // nix's WaitStatus, which rexpect does not re-export: `Exited(Pid(..), 0)` is a clean exit.
        let status = format!("{:?}", self.pty.process().wait().unwrap());
        assert!(
            status.starts_with("Exited(") && status.ends_with(", 0)"),
            "mixtral-q chat ended with {status}"
        );
        self.dir
    }
}

/// The fixture's model as a Q4_K GGUF in `dir` (what the bundled demo model was before it was trained).
fn tiny_q4_k(dir: &Path) -> PathBuf {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    let out = dir.join("tiny-mixtral-q4_k.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_mixtral-q"))
        .arg("quantize")
        .arg(tiny)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

struct Turn {
    prompt_ids: Vec<u32>,
    reply_ids: Vec<u32>,
    output: String,
}

impl Turn {
    /// (reused, processed) from the `--verbose` line.
    fn cache_use(&self) -> (usize, usize) {
        let line = self.output.lines().find(|l| l.starts_with("[prompt: ")).expect("no --verbose line");
        let numbers: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        (numbers[0], numbers[1])
    }
}

/// The id list printed after `label` (`[1, 2, 3]`).
fn ids_after(output: &str, label: &str) -> Vec<u32> {
    let start = output.find(label).unwrap_or_else(|| panic!("no {label:?} in {output:?}")) + label.len();
    let list = &output[start..];
    let list = &list[1..list.find(']').expect("unterminated id list")];
    list.split(", ").filter(|s| !s.is_empty()).map(|s| s.trim().parse().unwrap()).collect()
}

fn messages(saved: &Value) -> Vec<(String, String)> {
    saved["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap().to_owned()))
        .collect()
}

/// The fixture's chat conversations: (messages, token ids).
fn fixture_chats() -> Vec<(Value, Vec<u32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    reference["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (c["messages"].clone(), ids)
        })
        .collect()
}

#[test]
fn prompt_ids_match_the_fixture_and_later_turns_reuse_the_cache() {
    let chats = fixture_chats();
    let (first_messages, first_ids) = &chats[0];
    let (second_messages, second_ids) = &chats[1];
    let first_question = first_messages[0]["content"].as_str().unwrap();
    let second_question = second_messages[2]["content"].as_str().unwrap();
    let eos = 2;
    // In the fixture, the second conversation's last user turn is what follows the first reply's EOS.
    let eos_at = second_ids.iter().position(|&id| id == eos).unwrap();
    let second_question_ids = &second_ids[eos_at + 1..];

    let mut chat = Chat::start(&["-n", "6", "--temp", "0", "--verbose"]);
    let turn1 = chat.turn(first_question);
    assert_eq!(&turn1.prompt_ids, first_ids, "first prompt vs HF transformers");
    assert_eq!(turn1.cache_use(), (0, first_ids.len()));
    assert!(!turn1.reply_ids.is_empty());

    // Second turn: the whole first exchange is in the cache; only its EOS and the new message are new
    // (plus the reply's last token, which was sampled but not yet run when the reply hit max_tokens).
    let turn2 = chat.turn(second_question);
    let mut expected = first_ids.clone();
    expected.extend(&turn1.reply_ids);
    expected.push(eos);
    expected.extend(second_question_ids);
    assert_eq!(turn2.prompt_ids, expected);
    let (reused, processed) = turn2.cache_use();
    assert_eq!(reused + processed, expected.len());
    let stopped_at_eos = turn1.reply_ids.len() < 6;
    let unrun = if stopped_at_eos { 0 } else { 1 };
    assert_eq!(reused, first_ids.len() + turn1.reply_ids.len() - unrun);
    assert_eq!(processed, 1 + second_question_ids.len() + unrun);

    // A loaded conversation (the fixture's, minus its last user message) plus that message typed.
    let conversation =
        serde_json::json!({"system": null, "messages": second_messages.as_array().unwrap()[..2]});
    let path = chat.path("conversation.json");
    std::fs::write(&path, conversation.to_string()).unwrap();
    let out = chat.command(&format!("/load {}", path.display()));
    assert!(out.contains("(loaded 2 messages"), "{out}");
    let turn3 = chat.turn(second_question);
    assert_eq!(&turn3.prompt_ids, second_ids, "loaded conversation vs HF transformers");
    let (reused, processed) = turn3.cache_use();
    assert_eq!(reused + processed, second_ids.len());
    assert!(reused < second_ids.len() / 2, "the cache held another conversation: {reused} reused");

    chat.type_line("/exit");
    chat.expect_exit_ok();
}

#[test]
fn ctrl_c_stops_a_long_reply_and_keeps_it() {
    // The reply runs until Ctrl-C (or, seconds later, a full context).
    let mut chat = Chat::start(&["--ignore-eos", "--ctx", "16384"]);
    let out = chat.command("/set max_tokens 100000");
    assert!(out.contains("(max_tokens = 100000)"), "{out}");
    chat.type_line("Tell me a long story.");
    // Let some of the reply stream, then interrupt it.
    chat.expect("Tell me a long story.");
    chat.read_some(20);
    chat.pty.send_control('c').unwrap();
    let out = chat.expect(PROMPT);
    assert!(out.contains("(interrupted)"), "{out}");
    let saved = chat.saved();
    let messages = messages(&saved);
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0], ("user".to_owned(), "Tell me a long story.".to_owned()));
    assert_eq!(messages[1].0, "assistant");
    assert!(!messages[1].1.is_empty(), "the partial reply was not kept");
    let out = chat.command("/stats");
    assert!(out.contains("stopped: interrupted"), "{out}");

    // The REPL still works, and Ctrl-D quits with status 0.
    assert!(chat.command("/set max_tokens 3").contains("(max_tokens = 3)"));
    let turn = chat.turn("Thanks.");
    assert!(turn.output.contains("(stopped at max_tokens = 3"), "{}", turn.output);
    chat.pty.send_control('d').unwrap();
    chat.expect_exit_ok();
}

#[test]
fn slash_commands() {
    let mut chat = Chat::start(&["-n", "4"]);
    let out = chat.command("/help");
    for name in ["/reset", "/system", "/set", "/show", "/stats", "/save", "/load", "/exit", "\"\"\""] {
        assert!(out.contains(name), "/help lacks {name}: {out}");
    }
    assert!(chat.command("/show").contains("max_tokens 4"));
    assert!(chat.command("/stats").contains("no reply yet"));

    assert!(chat.command("/set temp 0.5").contains("(temp = 0.5)"));
    assert!(chat.command("/set top_k 7").contains("(top_k = 7)"));
    assert!(chat.command("/set seed 42").contains("(seed = 42)"));
    let show = chat.command("/show");
    assert!(show.contains("temp 0.5") && show.contains("top_k 7") && show.contains("seed 42"), "{show}");
    // Bad input: one error line, the REPL goes on.
    assert!(chat.command("/set top_k many").contains("error: top_k: \"many\" is not a valid value"));
    assert!(chat.command("/set top_p 2").contains("error: top_p must be in (0, 1]"));
    assert!(chat.command("/set colour blue").contains("error: usage: /set KEY VALUE"));
    assert!(chat.command("/frobnicate").contains("error: unknown command \"/frobnicate\""));
    assert!(chat
        .command("/load /nonexistent/chat.json")
        .contains("error: cannot read /nonexistent/chat.json"));

    // Mixtral's template has no system role: the prompt is folded into the first user message.
    let out = chat.command("/system Answer in one word.");
    assert!(out.contains("has no system role"), "{out}");
    assert!(chat
        .command("/show")
        .contains("system prompt (folded into the first user message): Answer in one word."));
    let turn = chat.turn("Hello");
    let folded = serde_json::json!([{"role": "user", "content": "Answer in one word.\n\nHello"}]);
    assert_eq!(turn.prompt_ids, tokenize_chat(&chat, &folded));

    let stats = chat.command("/stats");
    assert!(stats.contains("tokens/s") && stats.contains("context: "), "{stats}");

    let saved = chat.saved();
    assert_eq!(saved["system"], "Answer in one word.");
    assert_eq!(saved["settings"]["top_k"], 7);
    assert_eq!(saved["settings"]["max_tokens"], 4);
    assert_eq!(messages(&saved)[0], ("user".to_owned(), "Hello".to_owned()));

    assert!(chat.command("/reset").contains("(conversation cleared)"));
    assert_eq!(messages(&chat.saved()).len(), 0);
    assert!(chat.command("/system").contains("(system prompt cleared)"));
    assert!(chat.command("/show").contains("system prompt: (none)"));

    // /load restores the conversation, system prompt and settings.
    let out = chat.command(&format!("/load {}", chat.path("saved.json").display()));
    assert!(out.contains("(loaded 0 messages"), "{out}");
    let show = chat.command("/show");
    assert!(show.contains("system prompt (folded") && show.contains("max_tokens 4"), "{show}");
    chat.type_line("/exit");
    chat.expect_exit_ok();
}

/// The ids `mixtral-q tokenize --chat` gives for `messages` on the same model.
fn tokenize_chat(chat: &Chat, messages: &Value) -> Vec<u32> {
    let path = chat.path("messages.json");
    std::fs::write(&path, messages.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mixtral-q"))
        .args(["tokenize", "--json", "-m"])
        .arg(chat.path("tiny-mixtral-q4_k.gguf"))
        .arg("--chat")
        .arg(&path)
        .env("MIXTRAL_Q_CACHE", chat.path("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn multi_line_input_completion_and_history() {
    let mut chat = Chat::start(&["-n", "2"]);
    // A trailing backslash continues the message on the next line.
    chat.type_line("first line \\");
    chat.expect("... ");
    chat.type_line("second line");
    chat.expect(PROMPT);
    // A """ block.
    chat.type_line("\"\"\"");
    chat.expect("... ");
    chat.type_line("alpha");
    chat.expect("... ");
    chat.type_line("beta\"\"\"");
    chat.expect(PROMPT);
    let saved = chat.saved();
    let user: Vec<String> = messages(&saved).into_iter().filter(|m| m.0 == "user").map(|m| m.1).collect();
    assert_eq!(user, ["first line \nsecond line", "alpha\nbeta"]);

    // Ctrl-C at the prompt drops the line being typed.
    chat.pty.send("this is never sent").unwrap();
    chat.pty.flush().unwrap();
    chat.expect("never sent");
    chat.pty.send_control('c').unwrap();
    chat.expect(PROMPT);
    assert_eq!(messages(&chat.saved()).len(), 4);

    // Tab completes a command.
    chat.pty.send("/sho\t").unwrap();
    chat.pty.flush().unwrap();
    chat.expect("/show ");
    chat.type_line("");
    assert!(chat.expect(PROMPT).contains("max_tokens 2"));

    chat.type_line("/exit");
    let dir = chat.expect_exit_ok();
    let history = std::fs::read_to_string(dir.path().join("history.txt")).unwrap();
    assert!(history.contains("/sho"), "{history}");
    assert!(history.contains("alpha\\nbeta"), "multi-line entries are one history entry: {history}");
    assert!(!history.contains("never sent"), "{history}");
}

#[test]
fn old_turns_are_dropped_when_the_context_fills() {
    // Prompts of 24 then 29 tokens and replies of exactly 8 tokens: the third exchange (98 tokens, plus 8
    // kept for the reply) no longer fits in 100 tokens.
    let mut chat = Chat::start(&["--ctx", "100", "-n", "8", "--ignore-eos", "--verbose"]);
    chat.turn("Name two experts.");
    let turn2 = chat.turn("What is a mixture of experts?");
    assert!(!turn2.output.contains("dropped"), "{}", turn2.output);
    let turn3 = chat.turn("What is a mixture of experts?");
    assert!(turn3.output.contains("dropped the oldest 1 exchange(s)"), "{}", turn3.output);
    // The cache was rebuilt for the shortened conversation (only "<s>[INST] " matches).
    let (reused, processed) = turn3.cache_use();
    assert!(processed > turn3.prompt_ids.len() / 2, "reused {reused}, processed {processed}");
    let saved = chat.saved();
    assert_eq!(messages(&saved).len(), 4);
    chat.type_line("/exit");
    chat.expect_exit_ok();
}

/// ollama's REPL commands: /set system, /set parameter NAME VALUE, /set verbose|quiet, /show info.
#[test]
fn ollama_commands() {
    let mut chat = Chat::start(&["-n", "4", "--temp", "0"]);
    let out = chat.command("/set system Answer in one word.");
    assert!(out.contains("(system prompt set)") && out.contains("has no system role"), "{out}");
    assert!(chat
        .command("/show system")
        .contains("system prompt (folded into the first user message): Answer in one word."));
    assert!(chat.command("/set parameter temperature 0.5").contains("(temp = 0.5)"));
    assert!(chat.command("/set parameter num_predict 3").contains("(max_tokens = 3)"));
    assert!(chat.command("/set parameter repeat_last_n 8").contains("(repeat_last_n = 8)"));
    assert!(chat.command("/set parameter top_p 2").contains("error: top_p must be in (0, 1]"));
    assert!(chat
        .command("/set parameter num_ctx 8")
        .contains("error: the context size is set when the chat starts"));
    assert!(chat.command("/set parameter stop ###").contains("(stop strings: [\"###\"])"));
    let show = chat.command("/show parameters");
    assert!(
        show.contains("temp 0.5") && show.contains("max_tokens 3") && show.contains("repeat_last_n 8"),
        "{show}"
    );
    assert!(show.contains("stop strings: [\"###\"]"), "{show}");
    let info = chat.command("/show info");
    for row in ["architecture", "parameters", "experts", "context length", "quantization"] {
        assert!(info.contains(row), "/show info lacks {row}: {info}");
    }
    assert!(info.contains(" M\r\n") || info.contains(" M\n"), "parameters as llama.cpp counts them: {info}");
    assert!(chat.command("/show colours").contains("error: /show \"colours\""));

    // /set verbose turns on the per-reply statistics, /set quiet off.
    assert!(chat.command("/set verbose").contains("(verbose: per-reply statistics on)"));
    assert!(chat.turn("Hello").output.contains("[prompt: "));
    assert!(chat.command("/set quiet").contains("off"));
    assert!(!chat.turn("Again").output.contains("[prompt: "));
    chat.type_line("/exit");
    chat.expect_exit_ok();
}

/// `/save` keeps the token ids the model saw (its own sampled reply ids), and `/load` uses them: the
/// continuation starts from exactly those ids and reuses the KV cache that still holds them.
#[test]
fn saved_token_ids_let_a_loaded_conversation_reuse_the_cache() {
    let mut chat = Chat::start(&["-n", "6", "--verbose", "--ignore-eos", "--seed", "5"]);
    let turn1 = chat.turn("Tell me about experts.");
    let saved = chat.saved();
    let ids: Vec<u32> =
        saved["tokens"]["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let eos = 2;
    let mut expected = turn1.prompt_ids.clone();
    expected.extend(&turn1.reply_ids);
    expected.push(eos);
    assert_eq!(ids, expected, "the saved ids are the prompt, the sampled reply and EOS");

    // Load it back: the next prompt starts with the saved ids, and all but the reply's last token
    // (sampled, never run) come from the cache.
    let out = chat.command(&format!("/load {}", chat.path("saved.json").display()));
    assert!(out.contains("(loaded 2 messages"), "{out}");
    let turn2 = chat.turn("And then?");
    assert_eq!(&turn2.prompt_ids[..ids.len()], &ids[..]);
    let (reused, _) = turn2.cache_use();
    assert_eq!(reused, turn1.prompt_ids.len() + turn1.reply_ids.len() - 1);

    // A file whose conversation was edited keeps working; its stale ids are not used.
    let mut edited = saved.clone();
    edited["messages"][1]["content"] = serde_json::json!("An edited reply.");
    let path = chat.path("edited.json");
    std::fs::write(&path, edited.to_string()).unwrap();
    assert!(chat.command(&format!("/load {}", path.display())).contains("(loaded 2 messages"));
    let turn3 = chat.turn("And then?");
    assert_ne!(&turn3.prompt_ids[..ids.len()], &ids[..]);
    chat.type_line("/exit");
    chat.expect_exit_ok();
}

/// Piped chat: replies alone on standard output; the banner, notices and command output on
/// standard error. llama.cpp's -sys sets the system prompt.
#[test]
fn piped_chat_writes_only_replies_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved.json");
    let input = format!("Hello there.\n/show\nWhat next?\n/save {}\n", saved.display());
    let (out, err) = piped(dir.path(), &["-n", "5", "--ignore-eos", "-sys", "Be brief."], &input);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    // The REPL shows control characters (the tiny model's random text has some) as U+FFFD.
    let shown = |text: String| -> String {
        text.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '\u{FFFD}' } else { c }).collect()
    };
    let replies: Vec<String> =
        messages(&saved).into_iter().filter(|m| m.0 == "assistant").map(|m| shown(m.1)).collect();
    assert_eq!(replies.len(), 2);
    assert_eq!(out, format!("{}\n{}\n", replies[0], replies[1]), "stdout holds the replies and nothing else");
    assert_eq!(saved["system"], "Be brief.");
    for notice in
        ["mixtral-q chat:", "(stopped at max_tokens = 5", "system prompt (folded", "(saved 4 messages"]
    {
        assert!(err.contains(notice), "stderr lacks {notice:?}: {err}");
    }
}

/// Runs piped `mixtral-q chat -m TINY ARGS` with `input`; returns (stdout, stderr).
fn piped(dir: &Path, args: &[&str], input: &str) -> (String, String) {
    use std::io::Write;
    let model = dir.join("tiny-mixtral-q4_k.gguf");
    if !model.exists() {
        tiny_q4_k(dir);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixtral-q"))
        .arg("chat")
        .arg("-m")
        .arg(&model)
        .args(args)
        .env("MIXTRAL_Q_CACHE", dir.join("cache"))
        .env("MIXTRAL_Q_HISTORY", dir.join("history.txt"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap())
}

/// `-r/--reverse-prompt` ends a reply before the stop string; `-n -1` lets it run to a full context.
#[test]
fn chat_stop_strings_and_no_reply_limit() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--temp", "0", "-n", "16", "--ignore-eos"];
    let (full, _) = piped(dir.path(), &args, "Hello\n");
    let reply = full.trim_end_matches('\n');
    let chars: Vec<char> = reply.chars().collect();
    assert!(chars.len() > 8, "{reply:?}");
    // Two characters from the middle that are really in the text (not a control character shown as U+FFFD).
    let at = (chars.len() / 2..chars.len() - 1)
        .find(|&k| !chars[k..k + 2].contains(&'\u{FFFD}'))
        .expect("printable text in the reply");
    let stop: String = chars[at..at + 2].iter().collect();
    let before = &reply[..reply.find(&stop).unwrap()];
    let (cut, _) = piped(dir.path(), &[&args[..], &["-r", &stop]].concat(), "Hello\n");
    assert_eq!(cut, format!("{before}\n"), "stop string {stop:?}");

    let (out, err) =
        piped(dir.path(), &["-n", "-1", "--ctx", "48", "--ignore-eos"], "Hello\n/show parameters\n");
    assert!(err.contains("(the context is full: the reply was cut)"), "{err}");
    assert!(err.contains("max_tokens -1 (no limit)"), "{err}");
    assert!(!out.is_empty());
}
