//! Generating with an engine whose KV cache outlives one prompt, as the chat REPL and the server do:
//! a new prompt reuses the longest prefix already in the cache and runs only the rest (in chunks),
//! then tokens come one per step. Steps are small on purpose: the caller can stop between any two
//! (Ctrl-C, a client that went away) or interleave the steps of several sequences.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::sampling::Sampler;
use super::stream::StreamDecoder;
use super::tokenizer::Tokenizer;
use crate::engine::Engine;

/// Prompt tokens are run in chunks of this many, so that a long prompt can be stopped or interleaved.
pub const PREFILL_CHUNK: usize = 256;

/// An engine and the token ids in its KV cache, in order (`engine.position() == cached().len()`).
pub struct Sequence<'e> {
    engine: &'e mut dyn Engine,
    cached: Vec<u32>,
}

impl<'e> Sequence<'e> {
    /// Starts from an empty cache.
    pub fn new(engine: &'e mut dyn Engine) -> Self {
        engine.truncate(0);
        Sequence { engine, cached: Vec::new() }
    }

    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// Capacity of the KV cache in tokens.
    pub fn context_size(&self) -> usize {
        self.engine.context_size()
    }

    pub fn engine_stats(&self) -> Option<String> {
        self.engine.stats_line()
    }

    /// Where the engine's experts ran (engines that schedule them).
    pub fn expert_stats(&self) -> Option<crate::engine::ExpertStats> {
        self.engine.expert_stats()
    }

    /// Keeps the longest cached prefix of `prompt`, leaving at least one token to run (the logits
    /// of the last prompt token are needed). Returns how many tokens were kept.
    fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let reused = common_prefix(&self.cached, prompt).min(prompt.len().saturating_sub(1));
        self.engine.truncate(reused);
        self.cached.truncate(reused);
        reused
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.engine.forward(tokens, false)?;
        self.cached.extend_from_slice(tokens);
        Ok(logits)
    }
}

/// Length of the common prefix of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model wrote its end-of-sequence token.
    Eos,
    MaxTokens,
    ContextFull,
}

/// What one [`Generation::step`] did.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Ran a chunk of the prompt; more of it is left.
    Prompt,
    /// A new token and the text it completes (empty while a UTF-8 character is incomplete).
    Token {
        id: u32,
        text: String,
    },
    Stopped(StopReason),
}

/// One reply to one prompt, over a [`Sequence`].
pub struct Generation<'t> {
    eos: u32,
    decoder: StreamDecoder<'t>,
    /// The prompt, then the generated tokens (what the repeat penalty looks at).
    history: Vec<u32>,
    prompt_len: usize,
    reused: usize,
    /// Prompt tokens not yet run start here.
    next_prompt: usize,
    logits: Vec<f32>,
    /// The last sampled token, not yet run through the engine (it is run by the step that needs its
    /// logits, so that stopping after it costs no forward pass).
    unrun: Option<u32>,
    max_tokens: usize,
    ignore_eos: bool,
    stopped: Option<StopReason>,
    started: Instant,
    prompt_time: Option<Duration>,
}

impl<'t> Generation<'t> {
    /// Prepares a reply to `prompt` (not empty): keeps the part of it already in `seq`'s cache.
    /// Nothing runs until the first [`step`](Self::step).
    pub fn new(seq: &mut Sequence, tok: &'t Tokenizer, prompt: Vec<u32>, max_tokens: usize) -> Self {
        let reused = seq.reuse_prefix(&prompt);
        Generation {
            eos: tok.eos_id(),
            decoder: StreamDecoder::new(tok),
            prompt_len: prompt.len(),
            history: prompt,
            reused,
            next_prompt: reused,
            logits: Vec::new(),
            unrun: None,
            max_tokens,
            ignore_eos: false,
            stopped: None,
            started: Instant::now(),
            prompt_time: None,
        }
    }

    /// The reply continues the prompt's text (`generate`, text completions), so its first token keeps
    /// its leading space. Without this the reply stands alone, as a chat message does: one leading
    /// space is dropped, as decoding the reply's ids on their own does.
    pub fn continue_prompt_text(&mut self) {
        self.decoder.keep_leading_space();
    }

    /// Never stop at EOS (only at max_tokens or a full context): for benchmarks and load tests.
    pub fn set_ignore_eos(&mut self, ignore: bool) {
        self.ignore_eos = ignore;
    }

    /// Runs the next chunk of the prompt (the last chunk then also samples the first token), or runs
    /// the last token and samples the next. After a `Stopped`, every call returns it again.
    pub fn step(&mut self, seq: &mut Sequence, sampler: &mut Sampler) -> Result<Step> {
        if let Some(reason) = self.stopped {
            return Ok(Step::Stopped(reason));
        }
        if self.next_prompt < self.prompt_len {
            if self.next_prompt == self.reused {
                self.started = Instant::now();
            }
            let end = (self.next_prompt + PREFILL_CHUNK).min(self.prompt_len);
            self.logits = seq.forward(&self.history[self.next_prompt..end])?;
            self.next_prompt = end;
            if end < self.prompt_len {
                return Ok(Step::Prompt);
            }
            self.prompt_time = Some(self.started.elapsed());
        } else if let Some(last) = self.unrun {
            if self.generated().len() >= self.max_tokens {
                return Ok(self.stop(StopReason::MaxTokens));
            }
            if seq.cached().len() >= seq.context_size() {
                return Ok(self.stop(StopReason::ContextFull));
            }
            self.logits = seq.forward(&[last])?;
            self.unrun = None;
        }
        if self.ignore_eos {
            if let Some(l) = self.logits.get_mut(self.eos as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let next = sampler.sample(&self.logits, &self.history);
        if next == self.eos {
            return Ok(self.stop(StopReason::Eos));
        }
        self.history.push(next);
        self.unrun = Some(next);
        let text = self.decoder.push(next)?;
        Ok(Step::Token { id: next, text })
    }

    fn stop(&mut self, reason: StopReason) -> Step {
        self.stopped = Some(reason);
        Step::Stopped(reason)
    }

    /// Text still held back by the decoder (an unfinished character, as U+FFFD): the end of the reply.
    pub fn flush(&mut self) -> String {
        self.decoder.flush()
    }

    pub fn prompt(&self) -> &[u32] {
        &self.history[..self.prompt_len]
    }

    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Prompt tokens found in the KV cache.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Prompt tokens run through the model so far.
    pub fn processed(&self) -> usize {
        self.next_prompt - self.reused
    }

    /// Seconds spent on the prompt, and on generating since (both 0 before the first step).
    pub fn seconds(&self) -> (f64, f64) {
        match self.prompt_time {
            None if self.next_prompt == self.reused => (0.0, 0.0),
            None => (self.started.elapsed().as_secs_f64(), 0.0),
            Some(prompt) => {
                (prompt.as_secs_f64(), self.started.elapsed().saturating_sub(prompt).as_secs_f64())
            }
        }
    }
}

/// A rendered conversation (or prompt and completion) with the token ids the model actually saw for
/// it: its own sampled tokens for the replies, which need not be what re-encoding the reply text
/// gives. A later prompt that extends the text keeps these ids, so it reuses the whole cache.
#[derive(Clone, Debug)]
pub struct KnownPrefix {
    pub text: String,
    pub ids: Vec<u32>,
}

impl KnownPrefix {
    /// After a reply: `rendered` is the text with the reply (e.g. the conversation rendered with it),
    /// which must be `prompt_text`, then `reply`, then anything (a template's end-of-turn token, say);
    /// the ids are the prompt's, the sampled ones, then that rest encoded. None when `rendered` does
    /// not have that form (a template that rewrites earlier turns).
    pub fn after_reply(
        tok: &Tokenizer,
        rendered: String,
        prompt_text: &str,
        prompt_ids: &[u32],
        reply: &str,
        reply_ids: &[u32],
    ) -> Result<Option<KnownPrefix>> {
        let Some(after_reply) = rendered.strip_prefix(prompt_text).and_then(|t| t.strip_prefix(reply)) else {
            return Ok(None);
        };
        let mut ids = prompt_ids.to_vec();
        ids.extend_from_slice(reply_ids);
        ids.extend(tok.encode(after_reply, false)?);
        Ok(Some(KnownPrefix { text: rendered, ids }))
    }

    /// The ids of `text` when it extends this prefix: these ids, then the rest encoded.
    pub fn extend(&self, tok: &Tokenizer, text: &str) -> Result<Option<Vec<u32>>> {
        let Some(rest) = text.strip_prefix(self.text.as_str()) else { return Ok(None) };
        let mut ids = self.ids.clone();
        ids.extend(tok.encode(rest, false)?);
        Ok(Some(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::text::SamplingParams;

    /// An engine whose next token is always `last + 1` (so greedy output is predictable), counting
    /// the tokens it is given.
    struct Counting {
        cfg: ModelConfig,
        position: usize,
        ctx: usize,
        forwarded: usize,
    }

    impl Engine for Counting {
        fn forward(&mut self, tokens: &[u32], _all_logits: bool) -> Result<Vec<f32>> {
            anyhow::ensure!(self.position + tokens.len() <= self.ctx, "context full");
            self.position += tokens.len();
            self.forwarded += tokens.len();
            let mut logits = vec![0.0; self.cfg.vocab_size];
            logits[(*tokens.last().unwrap() as usize + 1) % self.cfg.vocab_size] = 1.0;
            Ok(logits)
        }
        fn position(&self) -> usize {
            self.position
        }
        fn context_size(&self) -> usize {
            self.ctx
        }
        fn truncate(&mut self, n: usize) {
            self.position = self.position.min(n);
        }
        fn config(&self) -> &ModelConfig {
            &self.cfg
        }
    }

    fn counting(ctx: usize) -> Counting {
        let mut cfg = ModelConfig::mixtral_8x7b(1);
        cfg.vocab_size = 512;
        Counting { cfg, position: 0, ctx, forwarded: 0 }
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_hf_file(std::path::Path::new("models/tiny-mixtral/tokenizer.json")).unwrap()
    }

    fn greedy() -> Sampler {
        Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() })
    }

    /// Steps until the generation stops; returns the tokens and why it stopped.
    fn run(generation: &mut Generation, seq: &mut Sequence) -> (Vec<u32>, StopReason) {
        let mut ids = Vec::new();
        loop {
            match generation.step(seq, &mut greedy()).unwrap() {
                Step::Prompt => {}
                Step::Token { id, .. } => ids.push(id),
                Step::Stopped(reason) => return (ids, reason),
            }
        }
    }

    #[test]
    fn a_reply_runs_its_prompt_in_chunks_and_stops_without_a_wasted_forward() {
        let tok = tokenizer();
        let mut engine = counting(4096);
        let mut seq = Sequence::new(&mut engine);
        let prompt: Vec<u32> = (0..PREFILL_CHUNK as u32 + 10).map(|i| 3 + i % 100).collect();
        let mut generation = Generation::new(&mut seq, &tok, prompt.clone(), 5);
        assert_eq!(generation.step(&mut seq, &mut greedy()).unwrap(), Step::Prompt);
        assert_eq!(seq.cached().len(), PREFILL_CHUNK);
        let (ids, reason) = run(&mut generation, &mut seq);
        let last = *prompt.last().unwrap();
        assert_eq!(ids, (last + 1..last + 6).collect::<Vec<_>>());
        assert_eq!(reason, StopReason::MaxTokens);
        // The fifth token was sampled but never run.
        assert_eq!(seq.cached().len(), prompt.len() + 4);
        assert_eq!(generation.processed(), prompt.len());
        assert_eq!(generation.step(&mut seq, &mut greedy()).unwrap(), Step::Stopped(StopReason::MaxTokens));
        drop(seq);
        assert_eq!(engine.forwarded, prompt.len() + 4);
    }

    #[test]
    fn a_prompt_that_extends_the_cache_runs_only_its_new_tokens() {
        let tok = tokenizer();
        let mut engine = counting(4096);
        let mut seq = Sequence::new(&mut engine);
        let first = vec![1, 10, 20, 30];
        let mut generation = Generation::new(&mut seq, &tok, first.clone(), 3);
        let (reply, _) = run(&mut generation, &mut seq);
        let mut second = first.clone();
        second.extend(&reply);
        second.extend([40, 50]);
        let mut generation = Generation::new(&mut seq, &tok, second.clone(), 1);
        // Everything the engine saw is reused: the prompt and the reply but its unrun last token.
        assert_eq!(generation.reused(), first.len() + reply.len() - 1);
        run(&mut generation, &mut seq);
        assert_eq!(generation.processed(), 3);
        // A different prompt keeps only the common part, and always runs at least one token.
        let generation = Generation::new(&mut seq, &tok, vec![1, 10, 99], 1);
        assert_eq!(generation.reused(), 2);
        let generation = Generation::new(&mut seq, &tok, vec![1, 10], 1);
        assert_eq!(generation.reused(), 1);
    }

    #[test]
    fn eos_and_a_full_context_end_a_reply() {
        let tok = tokenizer();
        let eos = tok.eos_id();
        let mut engine = counting(4096);
        let mut seq = Sequence::new(&mut engine);
        // The token after `eos - 1` is EOS.
        let mut generation = Generation::new(&mut seq, &tok, vec![1, eos - 1], 10);
        assert_eq!(run(&mut generation, &mut seq), (vec![], StopReason::Eos));
        let mut generation = Generation::new(&mut seq, &tok, vec![1, eos - 1], 10);
        generation.set_ignore_eos(true);
        let (ids, _) = run(&mut generation, &mut seq);
        assert_eq!(ids.len(), 10);
        assert!(!ids.contains(&eos));

        let mut small = counting(8);
        let mut seq = Sequence::new(&mut small);
        let mut generation = Generation::new(&mut seq, &tok, vec![1, 100, 101], 100);
        let (ids, reason) = run(&mut generation, &mut seq);
        assert_eq!((ids.len(), reason), (6, StopReason::ContextFull));
        assert_eq!(seq.cached().len(), 8);
    }

    #[test]
    fn known_prefix_keeps_the_sampled_ids() {
        let tok = tokenizer();
        let prompt_ids = tok.encode("<s>[INST] hi [/INST]", false).unwrap();
        let reply_ids = vec![300, 301];
        let known = KnownPrefix::after_reply(
            &tok,
            "<s>[INST] hi [/INST]reply</s>".into(),
            "<s>[INST] hi [/INST]",
            &prompt_ids,
            "reply",
            &reply_ids,
        )
        .unwrap()
        .unwrap();
        assert_eq!(known.ids[..prompt_ids.len()], prompt_ids[..]);
        assert_eq!(known.ids[prompt_ids.len()..], [300, 301, tok.eos_id()]);
        let ids = known.extend(&tok, "<s>[INST] hi [/INST]reply</s>[INST] more [/INST]").unwrap().unwrap();
        assert_eq!(ids[..known.ids.len()], known.ids[..]);
        assert!(ids.len() > known.ids.len());
        assert_eq!(known.extend(&tok, "<s>[INST] other").unwrap(), None);
        // A rendering that does not continue the prompt with the reply gives no prefix.
        let other = KnownPrefix::after_reply(&tok, "x".into(), "<s>", &prompt_ids, "reply", &reply_ids);
        assert!(other.unwrap().is_none());
    }

    #[test]
    fn common_prefix_length() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
