//! A conversation and the model state that goes with it: each turn renders the whole conversation with
//! the chat template, reuses the longest prefix of it already in the KV cache, and processes only the
//! rest. When the conversation outgrows the context, the oldest turns are dropped.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use mixtral_q::engine::Engine;
use mixtral_q::format::output::write_atomic;
use mixtral_q::text::{
    ChatTemplate, Generation, KnownPrefix, Message, Sampler, SamplingParams, Sequence, Step, StopSequences,
    Tokenizer,
};

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
    /// The token ids the model saw for the conversation (its own sampled ids for the replies), so that
    /// a loaded conversation continues from exactly what the model saw and reuses a KV cache that
    /// still holds it. Absent in files written by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<SavedTokens>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct SavedTokens {
    /// The conversation as the template rendered it (without the generation prompt); the ids are
    /// used only when a loaded conversation renders to exactly this text.
    pub text: String,
    pub ids: Vec<u32>,
}

/// Why a reply ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    /// A stop string (`-r/--reverse-prompt`, `/set parameter stop`) appeared.
    StopString,
    Interrupted,
}

impl From<mixtral_q::text::StopReason> for StopReason {
    fn from(reason: mixtral_q::text::StopReason) -> Self {
        match reason {
            mixtral_q::text::StopReason::Eos => StopReason::Eos,
            mixtral_q::text::StopReason::MaxTokens => StopReason::MaxTokens,
            mixtral_q::text::StopReason::ContextFull => StopReason::ContextFull,
        }
    }
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

pub struct Session<'e> {
    seq: Sequence<'e>,
    tok: &'e Tokenizer,
    template: ChatTemplate,
    system: Option<String>,
    messages: Vec<Message>,
    settings: Settings,
    sampler: Sampler,
    /// The conversation up to the last reply, with the token ids the model saw for it.
    known: Option<KnownPrefix>,
    last: Option<TurnStats>,
    ignore_eos: bool,
    /// A reply ends where one of these appears (`-r/--reverse-prompt`, `/set parameter stop`).
    stops: Vec<String>,
}

impl<'e> Session<'e> {
    pub fn new(
        engine: &'e mut dyn Engine,
        tok: &'e Tokenizer,
        template: ChatTemplate,
        settings: Settings,
    ) -> Self {
        Session {
            seq: Sequence::new(engine),
            tok,
            template,
            system: None,
            messages: Vec::new(),
            sampler: Sampler::new(settings.sampling.clone()),
            settings,
            known: None,
            last: None,
            ignore_eos: false,
            stops: Vec::new(),
        }
    }

    /// Never end a reply at EOS (only at max_tokens, a full context or Ctrl-C): `--ignore-eos`.
    pub fn set_ignore_eos(&mut self, ignore: bool) {
        self.ignore_eos = ignore;
    }

    /// Replies end where one of these strings appears (it is not shown nor kept).
    pub fn set_stop_strings(&mut self, stops: Vec<String>) {
        self.stops = stops;
    }

    pub fn stop_strings(&self) -> &[String] {
        &self.stops
    }

    /// Whether the template has a system role (else the system prompt is folded into the first user message).
    pub fn system_supported(&self) -> bool {
        self.template.supports_system()
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
        (self.seq.cached().len(), self.seq.context_size())
    }

    pub fn engine_stats(&self) -> Option<String> {
        self.seq.engine_stats()
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
            tokens: self.known.as_ref().map(|k| SavedTokens { text: k.text.clone(), ids: k.ids.clone() }),
        };
        let json = serde_json::to_string_pretty(&saved)?;
        write_atomic(path, (json + "\n").as_bytes())
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
        self.known = saved.tokens.and_then(|t| self.saved_prefix(t));
        Ok(())
    }

    /// The saved ids, if they still describe the loaded conversation: it renders to the saved text,
    /// and every id is in the vocabulary.
    fn saved_prefix(&self, tokens: SavedTokens) -> Option<KnownPrefix> {
        let text = self.template.render(&self.template_messages(), false).ok()?;
        let vocab = self.tok.vocab_size();
        (text == tokens.text && tokens.ids.iter().all(|&id| (id as usize) < vocab))
            .then_some(KnownPrefix { text, ids: tokens.ids })
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
        let ctx = self.seq.context_size();
        // Room kept for the reply when deciding whether old turns must go.
        let reserve = self.settings.max_tokens.min(ctx / 4).max(1);
        let (prompt_text, prompt_ids, dropped_turns) = self.prompt(ctx, reserve)?;
        if dropped_turns > 0 {
            // A notice: to standard error, like the REPL's others (the reply stream is the answer only).
            eprintln!(
                "(the conversation outgrew the context of {ctx} tokens: dropped the oldest {dropped_turns} \
                 exchange(s){})",
                if self.system.is_some() { ", kept the system prompt" } else { "" }
            );
        }

        let mut generation = Generation::new(&mut self.seq, self.tok, prompt_ids, self.settings.max_tokens);
        generation.set_ignore_eos(self.ignore_eos);
        let mut stops = StopSequences::new(self.stops.clone());
        let mut reply = String::new();
        let stop_reason = loop {
            if stop.load(Ordering::Relaxed) {
                if generation.generated().is_empty() {
                    // Stopped during the prompt: nothing to keep.
                    return Ok(turn_stats(&generation, StopReason::Interrupted));
                }
                break StopReason::Interrupted;
            }
            match generation.step(&mut self.seq, &mut self.sampler)? {
                Step::Prompt => {}
                Step::Token { text, .. } => {
                    let (text, stopped) = stops.push(&text);
                    write!(out, "{}", printable(&text))?;
                    out.flush()?;
                    reply.push_str(&text);
                    if stopped {
                        break StopReason::StopString;
                    }
                }
                Step::Stopped(reason) => break reason.into(),
            }
        };
        if stop_reason != StopReason::StopString {
            let rest = stops.push(&generation.flush()).0 + &stops.finish();
            write!(out, "{}", printable(&rest))?;
            reply.push_str(&rest);
        }

        self.messages.push(Message::new("assistant", &reply));
        // After a stop string the reply text lacks what its last tokens said: the next turn encodes
        // the conversation again (and reuses what still matches in the cache).
        self.known = match stop_reason {
            StopReason::StopString => None,
            _ => self.known_after_reply(&prompt_text, generation.prompt(), &reply, generation.generated())?,
        };
        Ok(turn_stats(&generation, stop_reason))
    }

    /// The messages as the template gets them (the system prompt first, or folded into the first
    /// user message).
    fn template_messages(&self) -> Vec<Message> {
        self.template.conversation(self.system.as_deref(), &self.messages)
    }

    /// The rendered prompt and its token ids, dropping the oldest exchanges while it leaves less than
    /// `reserve` tokens of the context for the reply. Returns how many exchanges were dropped.
    fn prompt(&mut self, ctx: usize, reserve: usize) -> Result<(String, Vec<u32>, usize)> {
        let mut dropped = 0;
        loop {
            let text = self.template.render(&self.template_messages(), true)?;
            // Keep the ids the model saw for the conversation so far; encode only what is new.
            let known_ids = match &self.known {
                Some(known) => known.extend(self.tok, &text)?,
                None => None,
            };
            let ids = match known_ids {
                Some(ids) => ids,
                None => self.tok.encode(&text, false)?,
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

    /// The known prefix after a reply: the conversation rendered with the reply. None when the
    /// template cannot render it or it does not extend the prompt with the reply text (a template
    /// that rewrites earlier turns): the next turn then encodes the whole conversation.
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
        KnownPrefix::after_reply(self.tok, text, prompt_text, prompt_ids, reply, reply_ids)
    }
}

fn turn_stats(generation: &Generation, stop: StopReason) -> TurnStats {
    let (prompt_secs, generate_secs) = generation.seconds();
    TurnStats {
        reused: generation.reused(),
        processed: generation.processed(),
        prompt_secs,
        generated: generation.generated().len(),
        generate_secs,
        stop,
        prompt_ids: generation.prompt().to_vec(),
        reply_ids: generation.generated().to_vec(),
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
    s.sampling.check().map_err(|e| {
        // The REPL's name for it (`/set temp`).
        let key = if e.field == "temperature" { "temp" } else { e.field };
        anyhow!("{key} {}", e.rule)
    })?;
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
}
