//! The one thread that runs the engines. Each slot is an engine with its own KV cache over the one
//! mapped model; requests wait in arrival order for a free slot, and the active slots take turns, one
//! step each (a prompt chunk or one token), so every stream advances at the same pace. The engine runs
//! one sequence per forward call: steps of different slots are interleaved, not batched.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crossbeam::channel::Receiver;
use mixtral_q::engine::{Engine, ExpertStats};
use mixtral_q::text::{
    common_prefix, ChatTemplate, Generation, KnownPrefix, Message, Sampler, Sequence, Step, StopReason,
    StopSequences, Tokenizer,
};
use tokio::sync::mpsc::UnboundedSender;

use super::api::{Endpoint, Finish, Outcome, Request};

/// What a request's handler hears from the scheduler.
#[derive(Debug)]
pub enum Event {
    /// More of the reply.
    Text(String),
    Done(Outcome),
    /// The engine failed (the reply ends).
    Failed(String),
}

/// A request on its way to a slot. The handler holds the receiving end of `events`: when it goes
/// (the client disconnected), the scheduler stops the request at its next step.
pub struct Job {
    pub id: u64,
    pub request: Request,
    /// The prompt's token ids (the scheduler may use a slot's own ids for a prefix it knows).
    pub ids: Vec<u32>,
    pub events: UnboundedSender<Event>,
}

/// Counters shared with the HTTP side: `/health` reports them and the queue limit reads them.
#[derive(Default)]
pub struct Load {
    /// Requests sent to the scheduler and not yet in a slot.
    pub waiting: AtomicUsize,
    /// Slots running a request.
    pub busy: AtomicUsize,
    /// Set on Ctrl-C / SIGTERM: every request is stopped.
    pub shutdown: AtomicBool,
    /// Each slot's engine's expert counters after the last round (for `/stats`).
    pub experts: Mutex<Vec<Option<ExpertStats>>>,
}

struct Slot<'a> {
    seq: Sequence<'a>,
    /// The last conversation in this slot, with the ids the model saw for it.
    known: Option<KnownPrefix>,
    /// When it last finished a request (for least-recently-used eviction; 0: never).
    last_used: u64,
    active: Option<Active<'a>>,
}

struct Active<'a> {
    job: Job,
    generation: Generation<'a>,
    sampler: Sampler,
    stops: StopSequences,
    /// What was sent so far.
    reply: String,
}

impl Active<'_> {
    fn send(&mut self, text: String) {
        if !text.is_empty() {
            self.reply.push_str(&text);
            // A closed channel is noticed before the next step.
            let _ = self.job.events.send(Event::Text(text));
        }
    }
}

pub struct Scheduler<'a> {
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    slots: Vec<Slot<'a>>,
    waiting: VecDeque<Job>,
    jobs: Receiver<Job>,
    load: &'a Load,
    clock: u64,
}

impl<'a> Scheduler<'a> {
    pub fn new(
        engines: &'a mut [Box<dyn Engine + Send + '_>],
        tok: &'a Tokenizer,
        template: &'a ChatTemplate,
        load: &'a Load,
        jobs: Receiver<Job>,
    ) -> Self {
        let slots = engines
            .iter_mut()
            .map(|e| Slot { seq: Sequence::new(e.as_mut()), known: None, last_used: 0, active: None })
            .collect();
        Scheduler { tok, template, slots, waiting: VecDeque::new(), jobs, load, clock: 0 }
    }

    /// Serves until every sender of jobs is gone.
    pub fn run(mut self) {
        while self.receive() {
            self.round();
        }
    }

    /// Takes the jobs sent since the last round, waiting for one when there is nothing to do.
    /// False when there is nothing to do and no job can come any more.
    fn receive(&mut self) -> bool {
        let idle = self.waiting.is_empty() && self.slots.iter().all(|s| s.active.is_none());
        if idle {
            match self.jobs.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        while let Ok(job) = self.jobs.try_recv() {
            self.waiting.push_back(job);
        }
        true
    }

    /// Admits what fits, then gives every active slot one step.
    fn round(&mut self) {
        self.admit();
        for i in 0..self.slots.len() {
            self.step(i);
        }
        let stats = self.slots.iter().map(|s| s.seq.expert_stats()).collect();
        *self.load.experts.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }

    /// Moves waiting requests into free slots, first come first served.
    fn admit(&mut self) {
        let shutdown = self.load.shutdown.load(Ordering::Relaxed);
        let load = self.load;
        self.waiting.retain(|job| {
            let gone = shutdown || job.events.is_closed();
            if gone {
                load.waiting.fetch_sub(1, Ordering::Relaxed);
                eprintln!("request {}: dropped before it started (client gone or shutting down)", job.id);
            }
            !gone
        });
        while let Some(job) = self.waiting.front() {
            let Some((slot, ids)) = self.choose_slot(job) else { break };
            let job = self.waiting.pop_front().expect("a front job");
            load.waiting.fetch_sub(1, Ordering::Relaxed);
            load.busy.fetch_add(1, Ordering::Relaxed);
            self.start(slot, job, ids);
        }
    }

    /// The free slot for `job` and the prompt ids to run there: the slot holding the most of the
    /// prompt, when the prompt continues its conversation or it holds at least half of the prompt;
    /// else the least recently used slot (empty ones first).
    fn choose_slot(&self, job: &Job) -> Option<(usize, Vec<u32>)> {
        let free = || self.slots.iter().enumerate().filter(|(_, s)| s.active.is_none());
        let mut best: Option<(usize, usize, Vec<u32>)> = None;
        for (i, slot) in free() {
            // The slot's own ids for the conversation it knows, when the prompt extends it.
            let known_ids =
                slot.known.as_ref().and_then(|k| k.extend(self.tok, &job.request.text).ok().flatten());
            let ids = known_ids
                .filter(|ids| ids.len() < slot.seq.context_size())
                .unwrap_or_else(|| job.ids.clone());
            let cached = slot.seq.cached();
            let reused = common_prefix(cached, &ids);
            let continues = reused > 0 && reused == cached.len();
            if (continues || 2 * reused >= ids.len()) && best.as_ref().is_none_or(|b| reused > b.1) {
                best = Some((i, reused, ids));
            }
        }
        if let Some((i, _, ids)) = best {
            return Some((i, ids));
        }
        let (i, _) = free().min_by_key(|(_, s)| s.last_used)?;
        Some((i, job.ids.clone()))
    }

    fn start(&mut self, i: usize, job: Job, ids: Vec<u32>) {
        let slot = &mut self.slots[i];
        let max_tokens = job.request.max_tokens.unwrap_or(usize::MAX);
        let mut generation = Generation::new(&mut slot.seq, self.tok, ids, max_tokens);
        generation.set_ignore_eos(job.request.ignore_eos);
        if job.request.endpoint == Endpoint::Completion {
            generation.continue_prompt_text();
        }
        slot.known = None;
        slot.active = Some(Active {
            sampler: Sampler::new(job.request.sampling.clone()),
            stops: StopSequences::new(job.request.stop.clone()),
            generation,
            job,
            reply: String::new(),
        });
    }

    /// One step of slot `i`'s request, if it has one.
    fn step(&mut self, i: usize) {
        let shutdown = self.load.shutdown.load(Ordering::Relaxed);
        let Slot { seq, active, .. } = &mut self.slots[i];
        let Some(a) = active.as_mut() else { return };
        if shutdown {
            let _ = a.job.events.send(Event::Failed("the server is shutting down".into()));
            self.release(i);
            return;
        }
        if a.job.events.is_closed() {
            eprintln!(
                "request {}: the client went away; stopped after {} tokens (slot {i} is free)",
                a.job.id,
                a.generation.generated().len()
            );
            self.release(i);
            return;
        }
        match a.generation.step(seq, &mut a.sampler) {
            Err(e) => {
                eprintln!("request {}: {e:#}", a.job.id);
                let _ = a.job.events.send(Event::Failed(format!("{e:#}")));
                self.release(i);
            }
            Ok(Step::Prompt) => {}
            Ok(Step::Token { text, .. }) => {
                let (text, stopped) = a.stops.push(&text);
                a.send(text);
                if stopped {
                    self.finish(i, Finish::Stop, true);
                }
            }
            Ok(Step::Stopped(reason)) => {
                let rest = a.generation.flush();
                let (text, stopped) = a.stops.push(&rest);
                a.send(text);
                if !stopped {
                    let held = a.stops.finish();
                    a.send(held);
                }
                let finish = match reason {
                    StopReason::Eos => Finish::Stop,
                    StopReason::MaxTokens | StopReason::ContextFull => Finish::Length,
                };
                self.finish(i, finish, stopped);
            }
        }
    }

    /// Ends slot `i`'s request with its response. A reply cut by a stop sequence is not what the
    /// model saw, so the slot then keeps no known prefix (its cached tokens still count).
    fn finish(&mut self, i: usize, finish: Finish, by_stop_sequence: bool) {
        let Some(a) = self.slots[i].active.take() else { return };
        let g = &a.generation;
        let (prompt_secs, generate_secs) = g.seconds();
        let outcome = Outcome {
            finish,
            prompt_tokens: g.prompt().len(),
            cached_tokens: g.reused(),
            completion_tokens: g.generated().len(),
            prompt_secs,
            generate_secs,
        };
        eprintln!(
            "request {} ({:?}, slot {i}): prompt {} tokens ({} from the cache, {} processed at {:.1} tokens/s), \
             reply {} tokens at {:.1} tokens/s, finish {}",
            a.job.id,
            a.job.request.endpoint,
            outcome.prompt_tokens,
            outcome.cached_tokens,
            outcome.prompt_tokens - outcome.cached_tokens,
            (outcome.prompt_tokens - outcome.cached_tokens) as f64 / prompt_secs.max(1e-9),
            outcome.completion_tokens,
            outcome.completion_tokens as f64 / generate_secs.max(1e-9),
            finish.as_str(),
        );
        let known = if by_stop_sequence { None } else { self.known_after(&a) };
        let _ = a.job.events.send(Event::Done(outcome));
        self.slots[i].known = known;
        self.release(i);
    }

    /// The conversation with the reply, as the next request of this conversation will render it.
    fn known_after(&self, a: &Active) -> Option<KnownPrefix> {
        let request = &a.job.request;
        let rendered = match &request.messages {
            Some(messages) => {
                let mut messages = messages.clone();
                messages.push(Message::new("assistant", &a.reply));
                self.template.render(&messages, false).ok()?
            }
            None => format!("{}{}", request.text, a.reply),
        };
        let g = &a.generation;
        KnownPrefix::after_reply(self.tok, rendered, &request.text, g.prompt(), &a.reply, g.generated())
            .ok()?
    }

    /// Frees slot `i` after its request (called once per request).
    fn release(&mut self, i: usize) {
        self.load.busy.fetch_sub(1, Ordering::Relaxed);
        self.clock += 1;
        let slot = &mut self.slots[i];
        slot.active = None;
        slot.last_used = self.clock;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mixtral_q::engine::DeviceChoice;
    use mixtral_q::quantize::{quantize_checkpoint, QuantizeOptions, Target};
    use serde_json::json;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    use super::*;
    use crate::cli::load::{Loaded, ModelArgs};
    use crate::cli::serve::api;

    const CTX: usize = 512;

    /// The tiny model (Q8_0, in a temporary folder), loaded as `serve` loads it.
    struct Fixture {
        loaded: Loaded,
        template: ChatTemplate,
        load: Load,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            quantize_checkpoint(Path::new("models/tiny-mixtral"), &path, &QuantizeOptions::new(Target::Q8_0))
                .unwrap();
            let args = ModelArgs {
                model: Some(path),
                threads: Vec::new(),
                ctx: Some(CTX),
                device: DeviceChoice::Cpu,
                vram_budget: None,
                n_gpu_layers: None,
                misses: Default::default(),
                routing_trace: None,
                hot_experts: None,
            };
            Fixture {
                loaded: args.load().unwrap(),
                template: ChatTemplate::mixtral_instruct(),
                load: Load::default(),
                _dir: dir,
            }
        }

        fn engines(&self, n: usize) -> Vec<Box<dyn Engine + Send + '_>> {
            (0..n).map(|_| self.loaded.engine().unwrap()).collect()
        }

        fn scheduler<'a>(
            &'a self,
            engines: &'a mut [Box<dyn Engine + Send + '_>],
        ) -> (Scheduler<'a>, crossbeam::channel::Sender<Job>) {
            let (tx, rx) = crossbeam::channel::unbounded();
            (Scheduler::new(engines, &self.loaded.tokenizer, &self.template, &self.load, rx), tx)
        }

        /// A job for `body` (greedy unless it says otherwise), as the HTTP side makes it.
        fn job(
            &self,
            id: u64,
            endpoint: api::Endpoint,
            body: serde_json::Value,
        ) -> (Job, UnboundedReceiver<Event>) {
            let mut body = body;
            body["temperature"] = json!(body.get("temperature").cloned().unwrap_or(json!(0)));
            let bytes = body.to_string().into_bytes();
            let request = match endpoint {
                api::Endpoint::Chat => api::parse_chat(&bytes, &self.template).unwrap(),
                api::Endpoint::Completion => api::parse_completion(&bytes).unwrap(),
            };
            let ids = api::tokenize(&request, &self.loaded.tokenizer, CTX).unwrap();
            let (events, receiver) = unbounded_channel();
            self.load.waiting.fetch_add(1, Ordering::Relaxed);
            (Job { id, request, ids, events }, receiver)
        }
    }

    /// The text received so far and the outcome, if the reply is done.
    fn drain(events: &mut UnboundedReceiver<Event>, text: &mut String) -> Option<Outcome> {
        while let Ok(event) = events.try_recv() {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Done(outcome) => return Some(outcome),
                Event::Failed(e) => panic!("failed: {e}"),
            }
        }
        None
    }

    /// Runs rounds until the reply is done.
    fn finish(s: &mut Scheduler, events: &mut UnboundedReceiver<Event>) -> (String, Outcome) {
        let mut text = String::new();
        for _ in 0..10_000 {
            s.receive();
            s.round();
            if let Some(outcome) = drain(events, &mut text) {
                return (text, outcome);
            }
        }
        panic!("the reply did not finish");
    }

    fn active_job(s: &Scheduler, slot: usize) -> Option<u64> {
        s.slots[slot].active.as_ref().map(|a| a.job.id)
    }

    /// Tokens generated so far by slot `i`'s request.
    fn generated(s: &Scheduler, slot: usize) -> Option<usize> {
        s.slots[slot].active.as_ref().map(|a| a.generation.generated().len())
    }

    #[test]
    fn active_requests_take_turns_one_token_each() {
        let f = Fixture::new();
        let mut engines = f.engines(2);
        let (mut s, tx) = f.scheduler(&mut engines);
        let body = |p: &str| json!({"prompt": p, "max_tokens": 20, "ignore_eos": true});
        let (a, mut a_events) = f.job(1, api::Endpoint::Completion, body("Once upon a time"));
        let (b, mut b_events) = f.job(2, api::Endpoint::Completion, body("A long way off"));
        tx.send(a).unwrap();
        tx.send(b).unwrap();
        s.receive();
        for round in 1..=20 {
            s.round();
            // Both prompts are short (one step): from the first round on, each request gets a token.
            assert_eq!((active_job(&s, 0), active_job(&s, 1)), (Some(1), Some(2)));
            assert_eq!((generated(&s, 0), generated(&s, 1)), (Some(round), Some(round)), "round {round}");
        }
        // The next round ends both at max_tokens without running another token.
        s.round();
        let (mut a_text, mut b_text) = (String::new(), String::new());
        assert_eq!(drain(&mut a_events, &mut a_text).map(|o| o.completion_tokens), Some(20));
        assert_eq!(drain(&mut b_events, &mut b_text).map(|o| o.completion_tokens), Some(20));
        assert_eq!(f.load.busy.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_request_stops_before_the_next_token_once_its_client_is_gone() {
        let f = Fixture::new();
        let mut engines = f.engines(1);
        let (mut s, tx) = f.scheduler(&mut engines);
        let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true});
        let (long, events) = f.job(1, api::Endpoint::Completion, body.clone());
        let (queued, queued_events) = f.job(2, api::Endpoint::Completion, body);
        tx.send(long).unwrap();
        tx.send(queued).unwrap();
        for _ in 0..5 {
            s.receive();
            s.round();
        }
        assert_eq!(f.load.waiting.load(Ordering::Relaxed), 1);
        // Both clients go: the running request stops without running another token, the queued one
        // never starts.
        drop(events);
        drop(queued_events);
        let ran = s.slots[0].seq.cached().len();
        s.receive();
        s.round();
        assert_eq!(s.slots[0].seq.cached().len(), ran);
        assert_eq!(active_job(&s, 0), None);
        assert_eq!((f.load.busy.load(Ordering::Relaxed), f.load.waiting.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn requests_wait_for_a_slot_in_arrival_order() {
        let f = Fixture::new();
        let mut engines = f.engines(1);
        let (mut s, tx) = f.scheduler(&mut engines);
        let mut receivers = Vec::new();
        for id in 1..4 {
            let (job, events) = f.job(
                id,
                api::Endpoint::Completion,
                json!({"prompt": format!("Story {id}"), "max_tokens": 3}),
            );
            tx.send(job).unwrap();
            receivers.push(events);
        }
        let mut order = Vec::new();
        let mut texts = vec![String::new(); 3];
        while order.len() < 3 {
            s.receive();
            s.round();
            for (i, events) in receivers.iter_mut().enumerate() {
                if drain(events, &mut texts[i]).is_some() {
                    order.push(i + 1);
                }
            }
        }
        assert_eq!(order, [1, 2, 3]);
    }

    #[test]
    fn a_conversation_returns_to_its_slot_and_reuses_all_of_it() {
        let f = Fixture::new();
        let mut engines = f.engines(3);
        let (mut s, tx) = f.scheduler(&mut engines);
        let mut run = |id: u64, messages: serde_json::Value, max_tokens: usize| {
            let body = json!({"messages": messages, "max_tokens": max_tokens, "ignore_eos": true});
            let (job, mut events) = f.job(id, api::Endpoint::Chat, body);
            tx.send(job).unwrap();
            s.receive();
            s.round();
            let slot = (0..3).find(|&i| active_job(&s, i) == Some(id)).expect("admitted");
            let (text, outcome) = finish(&mut s, &mut events);
            (slot, text, outcome)
        };
        let question = json!({"role": "user", "content": "Tell me about the sea."});
        let (slot, reply, turn1) = run(1, json!([question]), 8);
        assert_eq!((slot, turn1.cached_tokens, turn1.completion_tokens), (0, 0, 8));
        let (slot, _, _) = run(2, json!([{"role": "user", "content": "Something else."}]), 4);
        assert_eq!(slot, 1, "an empty slot before evicting a conversation");

        // The second turn goes back to slot 0 (though slot 2, never used, is the least recent) and
        // reuses everything the model saw of the first turn: its prompt and its reply but the reply's
        // last token, which was sampled and never run.
        let conversation = json!([question, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]);
        let (slot, _, turn2) = run(3, conversation, 4);
        assert_eq!(slot, 0);
        assert_eq!(turn2.cached_tokens, turn1.prompt_tokens + turn1.completion_tokens - 1);
        let new_tokens = f.loaded.tokenizer.encode("</s>[INST] And then? [/INST]", false).unwrap().len();
        assert_eq!(turn2.prompt_tokens, turn2.cached_tokens + 1 + new_tokens);

        // New conversations: the empty slot, then the least recently used one (slot 1's).
        let (slot, _, _) = run(4, json!([{"role": "user", "content": "Third topic."}]), 4);
        assert_eq!(slot, 2);
        let (slot, _, _) = run(5, json!([{"role": "user", "content": "Fourth topic."}]), 4);
        assert_eq!(slot, 1);
    }
}
