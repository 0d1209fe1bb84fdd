//! Routing analysis: which experts the router picks for a text, and the statistics of the Mixtral
//! paper's §5 (Jiang et al. 2024): expert shares per layer (Fig. 7), repetition between consecutive
//! tokens against chance (Table 5), the text coloured by expert (Fig. 8).
//!
//! - `trace`: the recorded choices and their JSON format (what expert-cache replays read);
//! - `stats`: the statistics;
//! - `svg`, `html`, `terminal`: the renderings; `palette`: their colours.

mod html;
mod palette;
pub mod stats;
mod svg;
mod terminal;
pub mod trace;

use anyhow::{ensure, Result};
use serde::Serialize;

pub use stats::{LayerStats, RoutingStats, Z_ABOVE_CHANCE};
pub use trace::RoutingTrace;

use crate::engine::cpu::CpuEngine;
use crate::engine::{Engine, RouterTrace};
use crate::model::weights::Model;
use crate::text::{StreamDecoder, Tokenizer};

/// The router's choices for `tokens`, `[token][layer]` → experts (highest weight first), from
/// `engine`. A text longer than the engine's context goes through in consecutive windows, each
/// starting with an empty KV cache. This is the one place that reads the engine's router trace.
pub fn route_tokens(engine: &mut dyn Engine, tokens: &[u32]) -> Result<Vec<Vec<Vec<usize>>>> {
    let window = engine.context_size();
    let mut routes = Vec::with_capacity(tokens.len());
    engine.set_router_trace(true)?;
    for chunk in tokens.chunks(window) {
        engine.truncate(0);
        engine.forward(chunk, false)?;
        routes.extend(token_major(engine.take_router_trace()));
    }
    engine.set_router_trace(false)?;
    ensure!(routes.len() == tokens.len(), "the engine traced {} of {} tokens", routes.len(), tokens.len());
    Ok(routes)
}

/// An engine's router traces (one per forward call, each `[layer][token]`) as `[token][layer]`.
pub fn token_major(calls: Vec<RouterTrace>) -> Vec<Vec<Vec<usize>>> {
    let mut routes = Vec::new();
    for call in calls {
        let n = call.first().map_or(0, Vec::len);
        routes.extend((0..n).map(|t| call.iter().map(|layer| layer[t].clone()).collect::<Vec<_>>()));
    }
    routes
}

/// The trace of a run that recorded its router's choices (`calls`, from `take_router_trace`) for
/// `tokens`, the tokens it processed in order.
pub fn recorded(
    model: &Model,
    tokenizer: &Tokenizer,
    tokens: &[u32],
    calls: Vec<RouterTrace>,
) -> Result<RoutingTrace> {
    let experts = token_major(calls);
    ensure!(experts.len() <= tokens.len(), "the engine traced {} of {} tokens", experts.len(), tokens.len());
    let tokens = tokens[..experts.len()].to_vec();
    let cfg = &model.config;
    let name = model.file.metadata.get_str("general.name").unwrap_or("model");
    let text = token_texts(tokenizer, &tokens)?;
    RoutingTrace::new(name, cfg.n_layers, cfg.n_experts, cfg.n_experts_used, tokens, text, experts)
}

/// The routing trace of `text` on `model`: tokenized as a prompt (BOS first when the model asks for
/// it), run through the CPU engine with a context of `ctx` tokens.
pub fn trace_text(model: &Model, tokenizer: &Tokenizer, text: &str, ctx: usize) -> Result<RoutingTrace> {
    let tokens = tokenizer.encode(text, tokenizer.adds_bos())?;
    ensure!(!tokens.is_empty(), "the text has no tokens");
    let mut engine = CpuEngine::new(model, ctx)?;
    let experts = route_tokens(&mut engine, &tokens)?;
    let cfg = &model.config;
    let name = model.file.metadata.get_str("general.name").unwrap_or("model");
    let text = token_texts(tokenizer, &tokens)?;
    RoutingTrace::new(name, cfg.n_layers, cfg.n_experts, cfg.n_experts_used, tokens, text, experts)
}

/// What each token adds to the decoded text; control tokens (BOS, EOS) as their piece.
fn token_texts(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<Vec<String>> {
    let mut stream = StreamDecoder::new(tokenizer);
    tokens
        .iter()
        .map(|&id| {
            let text = stream.push(id)?;
            Ok(if text.is_empty() && tokenizer.token_bytes(id)?.is_empty() {
                tokenizer.piece(id)
            } else {
                text
            })
        })
        .collect()
}

/// A trace with its statistics, and the name of the text it came from: what every rendering takes.
pub struct Report {
    pub trace: RoutingTrace,
    pub stats: RoutingStats,
    /// The text's file name, for titles.
    pub source: String,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    trace: &'a RoutingTrace,
    source: &'a str,
    statistics: &'a RoutingStats,
    verdict: String,
}

impl Report {
    pub fn new(trace: RoutingTrace, source: &str) -> Result<Report> {
        let stats = RoutingStats::of(&trace)?;
        Ok(Report { trace, stats, source: source.into() })
    }

    /// The layers Fig. 8 shows by default: first, middle and last (0, 15, 31 for Mixtral-8x7B).
    pub fn default_layers(&self) -> Vec<usize> {
        let n = self.trace.n_layers;
        let mut layers = vec![0, (n.saturating_sub(1)) / 2, n.saturating_sub(1)];
        layers.dedup();
        layers
    }

    /// The text of token `t` for display (its id in brackets when the trace carries no text).
    pub fn token_text(&self, t: usize) -> String {
        self.trace.text.get(t).cloned().unwrap_or_else(|| format!("[{}]", self.trace.tokens[t]))
    }

    /// Every number and the raw trace: the trace's own fields (so [`RoutingTrace::read`] reads this
    /// document back), plus `source`, `statistics` and `verdict`.
    pub fn to_json(&self) -> Result<String> {
        let doc = JsonReport {
            trace: &self.trace,
            source: &self.source,
            statistics: &self.stats,
            verdict: self.stats.verdict(),
        };
        Ok(serde_json::to_string(&doc)?)
    }

    pub fn svg(&self) -> String {
        svg::render(self)
    }

    /// The HTML page, with the coloured text of `layers`.
    pub fn html(&self, layers: &[usize]) -> String {
        html::render(self, layers)
    }

    /// The tables and verdict as plain text.
    pub fn tables(&self) -> String {
        terminal::tables(self)
    }

    /// The text coloured by first-choice expert in `layer`, with ANSI colours.
    pub fn ansi_text(&self, layer: usize) -> String {
        terminal::coloured_text(self, layer)
    }
}
