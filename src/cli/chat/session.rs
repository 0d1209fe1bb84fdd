//! A conversation and the model state that goes with it: each turn renders the whole conversation with
//! the chat template, reuses the longest prefix of it already in the KV cache, and processes only the
//! rest. When the conversation outgrows the context, the oldest turns are dropped.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mixtral_q::engine::Engine;
use mixtral_q::text::{
    fold_system_prompt, ChatTemplate, Message, Sampler, SamplingParams, StreamDecoder, Tokenizer,
};

/// Prompt tokens are processed in chunks of this many, so that Ctrl-C stops a long prompt too.
const PREFILL_CHUNK: usize = 256;

/// What `/set` changes and `/save` keeps.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// Reply length limit in tokens.
    pub max_tokens: usize,
}

/// A conversation as `/save` writes it and `/load` reads it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SavedConversation {
    pub system: Option<String>,
    pub messages: Vec<Message>,
    pub settings: Option<Settings>,
}

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    Interrupted,
}

/// Numbers of the last turn, for `--verbose` and `/stats`.
#[derive(Clone, Debug)]
pub struct TurnStats {
    /// Prompt tokens found in the KV cache.
    pub reused: usize,
    /// Prompt tokens run through the model this turn.
    pub processed: usize,
    pub prompt_secs: f64,
    pub generated: usize,
    pub generate_secs: f64,
    pub stop: StopReason,
    /// The whole prompt (for the debug output).
    pub prompt_ids: Vec<u32>,
    pub reply_ids: Vec<u32>,
}

/// The rendered conversation up to the last reply, with the token ids the model actually saw for it
/// (its own sampled tokens for the replies, which need not be what re-encoding the reply text gives).
struct KnownPrefix {
    text: String,
    ids: Vec<u32>,
}

pub struct Session<'e> {
    engine: &'e mut dyn Engine,
    tok: &'e Tokenizer,
    template: ChatTemplate,
    system_supported: bool,
    system: Option<String>,
    messages: Vec<Message>,
    settings: Settings,
    sampler: Sampler,
    /// Token ids in the KV cache, in order (`engine.position() == cached.len()`).
    cached: Vec<u32>,
    known: Option<KnownPrefix>,
    last: Option<TurnStats>,
    ignore_eos: bool,
}

impl<'e> Session<'e> {
    pub fn new(
        engine: &'e mut dyn Engine,
        tok: &'e Tokenizer,
        template: ChatTemplate,
        settings: Settings,
    ) -> Self {
        let system_supported = template.supports_system();
        engine.truncate(0);
        Session {
            engine,
            tok,
            template,
            system_supported,
            system: None,
            messages: Vec::new(),
            sampler: Sampler::new(settings.sampling.clone()),
            settings,
            cached: Vec::new(),
            known: None,
            last: None,
            ignore_eos: false,
        }
    }

    /// Never end a reply at EOS (only at max_tokens, a full context or Ctrl-C): `--ignore-eos`.
    pub fn set_ignore_eos(&mut self, ignore: bool) {
        self.ignore_eos = ignore;
    }

    /// Whether the template has a system role (else the system prompt is folded into the first user message).
    pub fn system_supported(&self) -> bool {
        self.system_supported
    }

    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// Sets (or with `None`/empty, clears) the system prompt. The cache is kept: the next turn reuses
    /// whatever prefix still matches.
    pub fn set_system(&mut self, text: Option<&str>) {
        self.system = text.map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned);
        self.known = None;
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replaces the settings (the sampler restarts from the seed).
    pub fn set_settings(&mut self, settings: Settings) {
        self.sampler = Sampler::new(settings.sampling.clone());
        self.settings = settings;
    }

    pub fn last_turn(&self) -> Option<&TurnStats> {
        self.last.as_ref()
    }

    /// Tokens in the KV cache and its capacity.
    pub fn context_used(&self) -> (usize, usize) {
        (self.engine.position(), self.engine.context_size())
    }

    pub fn engine_stats(&self) -> Option<String> {
        self.engine.stats_line()
    }

    /// Forgets the conversation (system prompt and settings stay).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.known = None;
        self.last = None;
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let saved = SavedConversation {
            system: self.system.clone(),
            messages: self.messages.clone(),
            settings: Some(self.settings.clone()),
        };
        let json = serde_json::to_string_pretty(&saved)?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))
    }

    /// Loads a conversation saved by `save` (a leading "system" message is taken as the system prompt).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let json =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let saved: SavedConversation = serde_json::from_str(&json).with_context(|| {
            format!(
                "{} is not a saved conversation ({{\"system\", \"messages\", \"settings\"}})",
                path.display()
            )
        })?;
        let mut system = saved.system;
        let mut messages = saved.messages;
        if messages.first().is_some_and(|m| m.role == "system") {
            system = Some(messages.remove(0).content);
        }
        check_alternation(&messages).with_context(|| format!("in {}", path.display()))?;
        if let Some(settings) = &saved.settings {
            check_settings(settings).with_context(|| format!("in {}", path.display()))?;
        }
        self.messages = messages;
        self.set_system(system.as_deref());
        if let Some(settings) = saved.settings {
            self.set_settings(settings);
        }
        self.last = None;
        Ok(())
    }

    /// One exchange: adds the user's message, streams the reply to `out` and adds it. `stop` (set by
    /// Ctrl-C) ends the reply early; what was generated stays in the conversation. On an error the
    /// user's message is taken back, so the conversation is as before.
    pub fn turn(&mut self, user: &str, out: &mut dyn Write, stop: &AtomicBool) -> Result<TurnStats> {
        self.messages.push(Message::new("user", user));
        let result = self.run_turn(out, stop);
        match &result {
            Ok(stats) if stats.stop == StopReason::Interrupted && stats.generated == 0 => self.take_back(),
            Ok(stats) => self.last = Some(stats.clone()),
            Err(_) => self.take_back(),
        }
        result
    }

    fn take_back(&mut self) {
        if self.messages.last().is_some_and(|m| m.role == "user") {
            self.messages.pop();
        }
    }

    fn run_turn(&mut self, out: &mut dyn Write, stop: &AtomicBool) -> Result<TurnStats> {
        let ctx = self.engine.context_size();
        // Room kept for the reply when deciding whether old turns must go.
        let reserve = self.settings.max_tokens.min(ctx / 4).max(1);
        let (prompt_text, prompt_ids, dropped_turns) = self.prompt(ctx, reserve)?;
        if dropped_turns > 0 {
            writeln!(
                out,
                "(the conversation outgrew the context of {ctx} tokens: dropped the oldest {dropped_turns} \
                 exchange(s){})",
                if self.system.is_some() { ", kept the system prompt" } else { "" }
            )?;
        }

        // Reuse the cached prefix; at least one token must run to get logits.
        let reused = common_prefix(&self.cached, &prompt_ids).min(prompt_ids.len() - 1);
        self.engine.truncate(reused);
        self.cached.truncate(reused);
        let t0 = Instant::now();
        let mut logits = Vec::new();
        for chunk in prompt_ids[reused..].chunks(PREFILL_CHUNK) {
            if stop.load(Ordering::Relaxed) {
                return Ok(TurnStats {
                    reused,
                    processed: self.cached.len() - reused,
                    prompt_secs: t0.elapsed().as_secs_f64(),
                    generated: 0,
                    generate_secs: 0.0,
                    stop: StopReason::Interrupted,
                    prompt_ids,
                    reply_ids: Vec::new(),
                });
            }
            logits = self.engine.forward(chunk, false)?;
            self.cached.extend_from_slice(chunk);
        }
        let prompt_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();

        let mut decoder = StreamDecoder::new(self.tok);
        let mut history = prompt_ids.clone();
        let mut reply_ids = Vec::new();
        let mut reply = String::new();
        let eos = self.tok.eos_id() as usize;
        let stop_reason = loop {
            if self.ignore_eos && eos < logits.len() {
                logits[eos] = f32::NEG_INFINITY;
            }
            let next = self.sampler.sample(&logits, &history);
            if next == self.tok.eos_id() {
                break StopReason::Eos;
            }
            reply_ids.push(next);
            history.push(next);
            let piece = decoder.push(next)?;
            write!(out, "{}", printable(&piece))?;
            out.flush()?;
            reply.push_str(&piece);
            if stop.load(Ordering::Relaxed) {
                break StopReason::Interrupted;
            }
            if reply_ids.len() >= self.settings.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.engine.position() >= ctx {
                break StopReason::ContextFull;
            }
            logits = self.engine.forward(&[next], false)?;
            self.cached.push(next);
        };
        let rest = decoder.flush();
        write!(out, "{}", printable(&rest))?;
        reply.push_str(&rest);
        let generate_secs = t1.elapsed().as_secs_f64();

        self.messages.push(Message::new("assistant", &reply));
        self.known = self.known_after_reply(&prompt_text, &prompt_ids, &reply, &reply_ids)?;
        Ok(TurnStats {
            reused,
            processed: prompt_ids.len() - reused,
            prompt_secs,
            generated: reply_ids.len(),
            generate_secs,
            stop: stop_reason,
            prompt_ids,
            reply_ids,
        })
    }

    /// The messages as the template gets them: the system prompt as a system message, or folded into
    /// the first user message when the template has no system role.
    fn template_messages(&self) -> Vec<Message> {
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            all.push(Message::new("system", system));
        }
        all.extend(self.messages.iter().cloned());
        if self.system_supported {
            all
        } else {
            fold_system_prompt(&all)
        }
    }

    /// The rendered prompt and its token ids, dropping the oldest exchanges while it leaves less than
    /// `reserve` tokens of the context for the reply. Returns how many exchanges were dropped.
    fn prompt(&mut self, ctx: usize, reserve: usize) -> Result<(String, Vec<u32>, usize)> {
        let mut dropped = 0;
        loop {
            let text = self.template.render(&self.template_messages(), true)?;
            let ids = match &self.known {
                // Keep the ids the model saw for the conversation so far; encode only what is new.
                Some(known) if text.starts_with(&known.text) => {
                    let mut ids = known.ids.clone();
                    ids.extend(self.tok.encode(&text[known.text.len()..], false)?);
                    ids
                }
                _ => self.tok.encode(&text, false)?,
            };
            if ids.is_empty() {
                bail!("the chat template rendered an empty prompt");
            }
            if ids.len() + reserve <= ctx {
                return Ok((text, ids, dropped));
            }
            if self.messages.len() < 3 {
                bail!(
                    "the prompt is {} tokens; with {reserve} left for the reply it does not fit in the \
                     context of {ctx} tokens (raise --ctx, or lower max_tokens with /set)",
                    ids.len()
                );
            }
            self.messages.drain(..2);
            self.known = None;
            dropped += 1;
        }
    }

    /// The known prefix after a reply: the conversation rendered with the reply, whose ids are the
    /// prompt's, the sampled ones, then whatever the template writes after a reply (e.g. EOS). None
    /// when the rendering does not extend the prompt with the reply text (a template that rewrites
    /// earlier turns): the next turn then encodes the whole conversation.
    fn known_after_reply(
        &self,
        prompt_text: &str,
        prompt_ids: &[u32],
        reply: &str,
        reply_ids: &[u32],
    ) -> Result<Option<KnownPrefix>> {
        let Ok(text) = self.template.render(&self.template_messages(), false) else {
            return Ok(None);
        };
        let Some(after_reply) = text.strip_prefix(prompt_text).and_then(|t| t.strip_prefix(reply)) else {
            return Ok(None);
        };
        let mut ids = prompt_ids.to_vec();
        ids.extend_from_slice(reply_ids);
        ids.extend(self.tok.encode(after_reply, false)?);
        Ok(Some(KnownPrefix { text, ids }))
    }
}

/// The text with control characters other than newline and tab shown as U+FFFD: a reply (from a
/// random-weight model, say) must not move the cursor or send escape sequences to the terminal.
fn printable(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if text.contains(unsafe_char) {
        Cow::Owned(
            text.chars().map(|c| if unsafe_char(c) { char::REPLACEMENT_CHARACTER } else { c }).collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Messages must go user, assistant, user, ... and end with an assistant reply (the next user
/// message is typed at the prompt).
fn check_alternation(messages: &[Message]) -> Result<()> {
    for (i, m) in messages.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != expected {
            bail!("message {} has role {:?}; roles must alternate user, assistant, user, ...", i + 1, m.role);
        }
    }
    if messages.len() % 2 == 1 {
        bail!("the last message is from the user; a saved conversation ends with an assistant reply");
    }
    Ok(())
}

/// The ranges `/set` accepts, also checked on `/load`.
pub fn check_settings(s: &Settings) -> Result<()> {
    let p = &s.sampling;
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        bail!("temp must be a number ≥ 0 (0 is greedy)");
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        bail!("top_p must be in (0, 1]");
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        bail!("min_p must be in [0, 1]");
    }
    if !(p.repeat_penalty > 0.0 && p.repeat_penalty.is_finite()) {
        bail!("repeat_penalty must be a number > 0 (1 is off)");
    }
    if s.max_tokens == 0 {
        bail!("max_tokens must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_not_sent_to_the_terminal() {
        assert_eq!(printable("a\tb\nc"), "a\tb\nc");
        assert_eq!(printable("x\u{1b}[2Jy\r\u{7}"), "x\u{FFFD}[2Jy\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn saved_conversations_alternate_and_end_with_a_reply() {
        let m = |role: &str| Message::new(role, "text");
        assert!(check_alternation(&[]).is_ok());
        assert!(check_alternation(&[m("user"), m("assistant")]).is_ok());
        let err = check_alternation(&[m("user")]).unwrap_err().to_string();
        assert!(err.contains("ends with an assistant reply"), "{err}");
        let err = check_alternation(&[m("assistant"), m("user")]).unwrap_err().to_string();
        assert!(err.contains("message 1 has role \"assistant\""), "{err}");
        assert!(check_alternation(&[m("user"), m("tool")]).is_err());
    }

    #[test]
    fn settings_ranges() {
        let ok = Settings { sampling: SamplingParams::default(), max_tokens: 16 };
        assert!(check_settings(&ok).is_ok());
        let with = |f: &dyn Fn(&mut Settings)| {
            let mut s = ok.clone();
            f(&mut s);
            check_settings(&s)
        };
        assert!(with(&|s| s.sampling.temperature = 0.0).is_ok());
        assert!(with(&|s| s.sampling.temperature = -0.1).is_err());
        assert!(with(&|s| s.sampling.temperature = f32::NAN).is_err());
        assert!(with(&|s| s.sampling.top_p = 0.0).is_err());
        assert!(with(&|s| s.sampling.min_p = 1.5).is_err());
        assert!(with(&|s| s.sampling.repeat_penalty = 0.0).is_err());
        assert!(with(&|s| s.max_tokens = 0).is_err());
    }

    #[test]
    fn common_prefix_length() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
