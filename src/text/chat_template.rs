//! Chat templates (Jinja, as in HF `tokenizer_config.json`), rendered with minijinja the way
//! `transformers` renders them: trim_blocks and lstrip_blocks on, `raise_exception` available, and the
//! Python string/dict methods templates commonly call (`.strip()`, `.items()`, ...).
//!
//! A template is code from the model file's author, so it runs under limits (see [`render`]): fuel
//! (instructions), recursion depth, output size, and a memory and time budget ([`super::budget`]); a
//! template past one is refused with an error that says so.
//!
//! System prompts: Mixtral-Instruct's template accepts only alternating user/assistant messages and raises
//! on a system message, so `supports_system()` is false for it. Callers then fold the system prompt into
//! the first user message with [`fold_system_prompt`] (what ollama does for Mistral models) and tell the
//! user so.

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

use super::budget::{catching_panics, within_budget};
use crate::format::gguf::Metadata;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_owned(), content: content.to_owned() }
    }
}

/// Mixtral-8x7B-Instruct-v0.1's template, as in its tokenizer_config.json.
const MIXTRAL_INSTRUCT: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

/// ChatML, for `--chat-template chatml`.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Built-in templates by the names llama.cpp's `--chat-template` knows them by.
const BUILTIN: [(&str, &str); 4] = [
    ("mistral", MIXTRAL_INSTRUCT),
    ("mistral-v1", MIXTRAL_INSTRUCT),
    ("mixtral", MIXTRAL_INSTRUCT),
    ("chatml", CHATML),
];

const TEMPLATE_NAME: &str = "chat";

/// Instructions one rendering may run: real templates need a few dozen per message, so this allows
/// conversations of tens of thousands of messages. It also bounds quadratic work such as growing a
/// string in a loop (`{% set ns.s = ns.s + m.content %}` over `messages * 100000`, found by
/// tests/fuzz: 2 M instructions of that took 1.7 s of CPU, 1 M take a quarter of it).
const FUEL: u64 = 1_000_000;
/// Nesting of loops, conditionals and macro calls (minijinja counts a macro call as several levels).
const RECURSION_LIMIT: usize = 200;
/// Bytes of rendered text; a prompt longer than this would not fit any context anyway.
const MAX_OUTPUT: usize = 64 << 20;
/// Memory (net of frees) and time one rendering may take.
const MEMORY_BUDGET: usize = 512 << 20;
const TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);
const REFUSED: &str = "the chat template was refused";
const REFUSED_BY_BUDGET: &str =
    "the chat template was refused: rendering it took more than 512 MiB of memory or 2 s";

pub struct ChatTemplate {
    env: Environment<'static>,
    system_role: bool,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// From `tokenizer.chat_template` in GGUF metadata, else the built-in Mixtral-Instruct template.
    /// BOS/EOS texts come from the GGUF vocabulary when it has one, else `<s>` / `</s>`.
    pub fn from_metadata(meta: &Metadata) -> Result<ChatTemplate> {
        Self::for_model(meta, None)
    }

    /// Like [`ChatTemplate::from_metadata`], with `source` (`--chat-template`) used instead of the
    /// file's template when given.
    pub fn for_model(meta: &Metadata, source: Option<&str>) -> Result<ChatTemplate> {
        let mut template = match source.or_else(|| meta.get_str("tokenizer.chat_template")) {
            Some(source) => Self::from_source(source)?,
            None => Self::mixtral_instruct(),
        };
        let token_text = |key: &str| -> Option<String> {
            let id = meta.get_u64(key)?;
            let tokens = meta.get_array("tokenizer.ggml.tokens")?;
            tokens.get(usize::try_from(id).ok()?)?.as_str().map(str::to_owned)
        };
        if let Some(bos) = token_text("tokenizer.ggml.bos_token_id") {
            template.bos_token = bos;
        }
        if let Some(eos) = token_text("tokenizer.ggml.eos_token_id") {
            template.eos_token = eos;
        }
        Ok(template)
    }

    pub fn from_source(source: &str) -> Result<ChatTemplate> {
        refuse_namespace_cycles(source)?;
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        let mut template =
            ChatTemplate { env, system_role: false, bos_token: "<s>".into(), eos_token: "</s>".into() };
        template.system_role =
            template.render(&[Message::new("system", "s"), Message::new("user", "u")], true).is_ok();
        Ok(template)
    }

    /// The source of a built-in template (`mistral`, `mixtral`, `chatml`, ...), for `--chat-template`.
    pub fn builtin(name: &str) -> Option<&'static str> {
        BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, source)| *source)
    }

    /// Names of the built-in templates.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    pub fn mixtral_instruct() -> ChatTemplate {
        Self::from_source(MIXTRAL_INSTRUCT).expect("the built-in Mixtral template parses")
    }

    /// Renders with minijinja (bos_token/eos_token variables, raise_exception function, add_generation_prompt).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| anyhow!("chat template: {e}"))?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = LimitedOutput { bytes: Vec::new(), full: false };
        let result = catching_panics(|| {
            within_budget(MEMORY_BUDGET, TIME_BUDGET, REFUSED_BY_BUDGET, || {
                template.render_captured_to(context, &mut out).map(drop)
            })
        });
        let Some(result) = result else {
            bail!("{REFUSED}: rendering it crashed the template engine (minijinja)");
        };
        match result {
            Ok(()) => String::from_utf8(out.bytes).map_err(|_| anyhow!("chat template: output is not UTF-8")),
            Err(_) if out.full => bail!("{REFUSED}: its output exceeds {} MiB", MAX_OUTPUT >> 20),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                bail!("{REFUSED}: it ran more than {FUEL} instructions (an endless or huge loop?)")
            }
            Err(e) if is_recursion_error(&e) => {
                bail!("{REFUSED}: it nests deeper than {RECURSION_LIMIT} levels")
            }
            Err(e) => bail!("chat template: {}", error_message(&e)),
        }
    }

    /// Whether a system message renders (Mixtral's template raises an exception on one → false).
    pub fn supports_system(&self) -> bool {
        self.system_role
    }

    /// The messages as this template gets them: `system` first as a system message, or folded into the
    /// first user message when the template has no system role (what the chat REPL and
    /// `tokenize --chat` do). A leading system message in `messages` is treated the same way.
    pub fn conversation(&self, system: Option<&str>, messages: &[Message]) -> Vec<Message> {
        let mut all = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = system {
            all.push(Message::new("system", system));
        }
        all.extend(messages.iter().cloned());
        if self.system_role {
            all
        } else {
            fold_system_prompt(&all)
        }
    }
}

/// For templates without system support: the system prompt becomes the first paragraph of the first
/// user message (no user message: it becomes one). Messages without a system message pass unchanged.
pub fn fold_system_prompt(messages: &[Message]) -> Vec<Message> {
    let (system, rest): (Vec<&Message>, Vec<&Message>) = messages.iter().partition(|m| m.role == "system");
    if system.is_empty() {
        return messages.to_vec();
    }
    let prompt = system.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n");
    let mut out: Vec<Message> = rest.into_iter().cloned().collect();
    match out.iter_mut().find(|m| m.role == "user") {
        Some(first_user) => first_user.content = format!("{prompt}\n\n{}", first_user.content),
        None => out.insert(0, Message::new("user", &prompt)),
    }
    out
}

/// minijinja 2.24 recurses without end when it prints (or compares) a namespace that holds itself,
/// as in `{% set ns.me = ns %}` (found by tests/fuzz), and the stack overflow ends the process, which
/// nothing can catch. Such templates are refused before they run: no namespace attribute may be set
/// to an expression that names a namespace itself (a name bound by `namespace(...)`, one whose
/// attribute is set, or an alias of one through `set` or `for`), rather than something read from it.
fn refuse_namespace_cycles(source: &str) -> Result<()> {
    let blocks: Vec<&str> = source
        .split("{%")
        .skip(1)
        .filter_map(|b| b.split_once("%}").map(|(block, _)| block))
        .map(|b| b.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim())
        .collect();
    let mut namespaces: Vec<String> = Vec::new();
    let add = |names: &str, namespaces: &mut Vec<String>| {
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !namespaces.iter().any(|n| n == name) {
                namespaces.push(name.to_owned());
            }
        }
    };
    // Until no new name is found: an alias may come before the block that makes its source a namespace.
    loop {
        let known = namespaces.len();
        for block in &blocks {
            if let Some((target, expr)) = block.strip_prefix("set ").and_then(|b| b.split_once('=')) {
                match target.trim().split_once('.') {
                    Some((ns, _)) => add(ns, &mut namespaces),
                    None if expr.contains("namespace(") || names_one_of(expr, &namespaces) => {
                        add(target, &mut namespaces)
                    }
                    None => {}
                }
            } else if let Some((vars, expr)) = block.strip_prefix("for ").and_then(|b| b.split_once(" in ")) {
                if names_one_of(expr, &namespaces) {
                    add(vars, &mut namespaces);
                }
            }
        }
        if namespaces.len() == known {
            break;
        }
    }
    for block in &blocks {
        let Some((target, expr)) = block.strip_prefix("set ").and_then(|b| b.split_once('=')) else {
            continue;
        };
        if target.contains('.') && names_one_of(expr, &namespaces) {
            bail!(
                "{REFUSED}: {{% {block} %}} stores a namespace inside a namespace, which the template \
                 engine cannot print without recursing forever"
            );
        }
    }
    Ok(())
}

/// Whether `expr` mentions one of `names` as a value of its own: not inside a string, not as an
/// attribute (`x.ns`), and not to read from it (`ns.x`, `ns['x']`, `ns(...)`).
fn names_one_of(expr: &str, names: &[String]) -> bool {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\'' || c == b'"' {
            i += 1 + bytes[i + 1..].iter().position(|&b| b == c).unwrap_or(bytes.len());
            i += 1;
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == b'_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let word = &expr[start..i];
        let attribute = expr[..start].trim_end().ends_with('.');
        let read = matches!(expr[i..].trim_start().bytes().next(), Some(b'.' | b'[' | b'('));
        if !attribute && !read && names.iter().any(|n| n == word) {
            return true;
        }
    }
    false
}

/// Collects the rendered text, failing once it exceeds [`MAX_OUTPUT`].
struct LimitedOutput {
    bytes: Vec<u8>,
    full: bool,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_OUTPUT {
            self.full = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja reports its recursion limit as an InvalidOperation with this text.
fn is_recursion_error(e: &Error) -> bool {
    e.kind() == ErrorKind::InvalidOperation && e.detail().is_some_and(|d| d.contains("recursion limit"))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The message of `raise_exception` (or the render error) without minijinja's template excerpt.
fn error_message(e: &Error) -> String {
    e.detail().map(str::to_owned).unwrap_or_else(|| e.to_string())
}

/// Python methods that HF chat templates call on strings and dicts.
fn python_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let unknown = || Err(Error::from(ErrorKind::UnknownMethod));
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = args.first().and_then(Value::as_str);
            let strip_set = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
            let text = match method {
                "strip" => s.trim_matches(strip_set).to_owned(),
                "lstrip" => s.trim_start_matches(strip_set).to_owned(),
                "rstrip" => s.trim_end_matches(strip_set).to_owned(),
                "upper" => s.to_uppercase(),
                "lower" => s.to_lowercase(),
                "startswith" => return Ok(Value::from(chars.is_some_and(|p| s.starts_with(p)))),
                "endswith" => return Ok(Value::from(chars.is_some_and(|p| s.ends_with(p)))),
                _ => return unknown(),
            };
            Ok(Value::from(text))
        }
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let found = value.get_item(&key)?;
                Ok(if found.is_undefined() { args.get(1).cloned().unwrap_or_default() } else { found })
            }
            _ => unknown(),
        },
        _ => unknown(),
    }
}
