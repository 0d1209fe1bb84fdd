//! The routing trace: which experts the router chose for every token of a text, in every layer. One
//! format, written by `mixtral-q routing --json` and read back by whatever replays recorded routing
//! (expert-cache simulations and benchmarks): [`RoutingTrace::read`] accepts a bare trace and a whole
//! `routing --json` report alike, since the report is the trace with its statistics beside it.
//!
//! ```json
//! {"format": "mixtral-q routing trace", "version": 1, "model": "rustdoc-mixtral",
//!  "n_layers": 4, "n_experts": 8, "top_k": 2,
//!  "tokens": [1, 783, ...], "text": ["<s>", "Modules", ...],
//!  "experts": [[[3, 5], [0, 7], [2, 6], [1, 4]], ...]}
//! ```
//! `experts[t][l]` lists the experts of token `t` in layer `l`, highest router weight first (`top_k` of
//! them). `text[t]` is what token `t` adds to the decoded text (control tokens such as BOS as their
//! piece, e.g. `<s>`; a token that only starts a multi-byte character adds ""); it is optional.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "mixtral-q routing trace";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingTrace {
    pub format: String,
    pub version: u32,
    /// The model's `general.name` ("model" when it has none).
    pub model: String,
    pub n_layers: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub tokens: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text: Vec<String>,
    /// `[token][layer]` → expert ids, highest weight first.
    pub experts: Vec<Vec<Vec<usize>>>,
}

impl RoutingTrace {
    /// A trace of `tokens` with their choices (`experts[t][l]`), checked for consistency.
    pub fn new(
        model: &str,
        n_layers: usize,
        n_experts: usize,
        top_k: usize,
        tokens: Vec<u32>,
        text: Vec<String>,
        experts: Vec<Vec<Vec<usize>>>,
    ) -> Result<RoutingTrace> {
        let trace = RoutingTrace {
            format: FORMAT.into(),
            version: VERSION,
            model: model.into(),
            n_layers,
            n_experts,
            top_k,
            tokens,
            text,
            experts,
        };
        trace.validate()?;
        Ok(trace)
    }

    /// Reads a trace (or a `routing --json` report) from a JSON file.
    pub fn read(path: &Path) -> Result<RoutingTrace> {
        let json =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&json).with_context(|| format!("{} is not a routing trace", path.display()))
    }

    pub fn from_json(json: &str) -> Result<RoutingTrace> {
        let value: serde_json::Value = serde_json::from_str(json).context("invalid JSON")?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => bail!("format is {other:?}, expected {FORMAT:?}"),
            None => bail!("no \"format\": {FORMAT:?} field"),
        }
        let trace: RoutingTrace = serde_json::from_value(value)?;
        ensure!(
            trace.version == VERSION,
            "version {} of the trace format; this build reads {VERSION}",
            trace.version
        );
        trace.validate()?;
        Ok(trace)
    }

    /// Checks the shape: one entry per token and layer, `top_k` distinct experts below `n_experts`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.top_k >= 1 && self.top_k <= self.n_experts,
            "top_k {} of {} experts",
            self.top_k,
            self.n_experts
        );
        ensure!(
            self.experts.len() == self.tokens.len(),
            "{} tokens but choices for {}",
            self.tokens.len(),
            self.experts.len()
        );
        ensure!(
            self.text.is_empty() || self.text.len() == self.tokens.len(),
            "{} texts for {} tokens",
            self.text.len(),
            self.tokens.len()
        );
        for (t, layers) in self.experts.iter().enumerate() {
            ensure!(
                layers.len() == self.n_layers,
                "token {t}: {} layers, expected {}",
                layers.len(),
                self.n_layers
            );
            for (l, chosen) in layers.iter().enumerate() {
                ensure!(
                    chosen.len() == self.top_k,
                    "token {t} layer {l}: {} experts, expected {}",
                    chosen.len(),
                    self.top_k
                );
                for (i, &e) in chosen.iter().enumerate() {
                    ensure!(e < self.n_experts, "token {t} layer {l}: expert {e} of {}", self.n_experts);
                    ensure!(!chosen[..i].contains(&e), "token {t} layer {l}: expert {e} chosen twice");
                }
            }
        }
        Ok(())
    }

    /// The experts of every token in `layer` (`[token]` → ids, highest weight first).
    pub fn layer(&self, layer: usize) -> impl Iterator<Item = &[usize]> + '_ {
        self.experts.iter().map(move |layers| layers[layer].as_slice())
    }

    /// The JSON text of the trace.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RoutingTrace {
        let experts =
            vec![vec![vec![0, 1], vec![2, 3]], vec![vec![1, 0], vec![3, 7]], vec![vec![5, 4], vec![6, 2]]];
        RoutingTrace::new("m", 2, 8, 2, vec![1, 20, 30], vec!["<s>".into(), "a".into(), " b".into()], experts)
            .unwrap()
    }

    #[test]
    fn round_trips_and_reads_a_report_with_extra_fields() {
        let trace = sample();
        assert_eq!(trace.n_layers, 2);
        assert_eq!(RoutingTrace::from_json(&trace.to_json().unwrap()).unwrap(), trace);
        let mut report: serde_json::Value = serde_json::from_str(&trace.to_json().unwrap()).unwrap();
        report["statistics"] = serde_json::json!({"layers": []});
        assert_eq!(RoutingTrace::from_json(&report.to_string()).unwrap(), trace);
        assert_eq!(trace.layer(1).map(|c| c[0]).collect::<Vec<_>>(), [2, 3, 6]);
    }

    #[test]
    fn rejects_what_is_not_a_consistent_trace() {
        let good: serde_json::Value = serde_json::from_str(&sample().to_json().unwrap()).unwrap();
        let broken = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            edit(&mut v);
            RoutingTrace::from_json(&v.to_string()).unwrap_err().to_string()
        };
        assert!(broken(&|v| v["format"] = "other".into()).contains("expected"));
        assert!(broken(&|v| v["version"] = 2.into()).contains("version 2"));
        assert!(broken(&|v| v["experts"][1][0] = serde_json::json!([1, 1])).contains("twice"));
        assert!(broken(&|v| v["experts"][2][1] = serde_json::json!([9, 1])).contains("expert 9"));
        assert!(broken(&|v| v["experts"][0][1] = serde_json::json!([1])).contains("1 experts"));
        assert!(broken(&|v| v["tokens"] = serde_json::json!([1])).contains("1 tokens"));
        assert!(RoutingTrace::from_json("{").is_err());
    }
}
