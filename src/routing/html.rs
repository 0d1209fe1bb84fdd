//! The HTML report: the SVG figure, the repetition table, and the text with every token coloured by its
//! first-choice expert in the chosen layers (paper Fig. 8). One self-contained file.

use std::fmt::Write;

use super::palette::{expert_color, hex};
use super::svg::{self, esc};
use super::Report;

pub fn render(report: &Report, layers: &[usize]) -> String {
    let (trace, stats) = (&report.trace, &report.stats);
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Expert routing: {model} on {source}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
th {{ background: #f4f4f4; }}
.above {{ font-weight: bold; }}
.text {{ font-family: Menlo, Consolas, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.55;
        border: 1px solid #ddd; padding: 10px; }}
.legend span {{ display: inline-block; padding: 1px 8px; margin: 0 4px 4px 0; font-family: monospace; }}
{classes}</style></head><body>
<h1>Expert routing: {model} on {source}</h1>
<p>{tokens} tokens, {n_layers} layers, {n_experts} experts, top-{k}; the router choices of mixtral-q's CPU engine.
The analysis of the Mixtral paper (Jiang et al. 2024, §5: Fig. 7, Table 5, Fig. 8).</p>
<p><b>{verdict}</b></p>
"#,
        model = esc(&trace.model),
        source = esc(&report.source),
        tokens = stats.tokens,
        n_layers = stats.layers.len(),
        n_experts = stats.n_experts,
        k = stats.top_k,
        verdict = esc(&stats.verdict()),
        classes = (0..stats.n_experts)
            .map(|e| format!(".e{e} {{ background: {}; }}\n", hex(expert_color(e, stats.n_experts))))
            .collect::<String>(),
    );
    h.push_str(&svg::render(report));
    let _ = write!(
        h,
        "<h2>Consecutive tokens routed to the same expert (paper Table 5)</h2>\n<p>Share of the {} consecutive \
         token pairs whose first choices are the same (\"first\"), and whose top-{k} sets share an expert \
         (\"either\"); bold: above chance (z &gt; {}).</p>\n\
         <table><tr><th></th><th colspan=\"2\">this text</th><th colspan=\"2\">shuffled order</th></tr>\n\
         <tr><th>layer</th><th>first</th><th>either</th><th>first</th><th>either</th></tr>\n",
        stats.pairs,
        stats.z_above_chance,
        k = stats.top_k
    );
    let cell = |rate: f64, bold: bool| {
        format!("<td{}>{:.1}%</td>", if bold { " class=\"above\"" } else { "" }, 100.0 * rate)
    };
    for l in &stats.layers {
        let _ = writeln!(
            h,
            "<tr><td>{}</td>{}{}{}{}</tr>",
            l.layer,
            cell(l.repeat_first, l.repeat_first_above_chance),
            cell(l.repeat_any, l.repeat_any_above_chance),
            cell(l.shuffled_repeat_first, false),
            cell(l.shuffled_repeat_any, false),
        );
    }
    let _ = writeln!(
        h,
        "<tr><th>chance</th><th>{:.1}%</th><th>{:.1}%</th><th colspan=\"2\"></th></tr></table>\n<p>{}</p>",
        100.0 * stats.chance_repeat_first,
        100.0 * stats.chance_repeat_any,
        esc(super::stats::NOTE)
    );
    h.push_str("<h2>The text, each token coloured by its first-choice expert (paper Fig. 8)</h2>\n<p class=\"legend\">");
    for e in 0..stats.n_experts {
        let _ = write!(h, "<span class=\"e{e}\">expert {e}</span>");
    }
    h.push_str("</p>\n");
    for &layer in layers {
        let _ =
            writeln!(h, "<h3>Layer {layer}</h3>\n<div class=\"text\">{}</div>", coloured_text(report, layer));
    }
    h.push_str("</body></html>\n");
    h
}

/// The tokens as spans of their first-choice expert's class, with a tooltip naming all their experts.
fn coloured_text(report: &Report, layer: usize) -> String {
    let trace = &report.trace;
    let mut out = String::new();
    for (t, chosen) in trace.layer(layer).enumerate() {
        let text = report.token_text(t);
        let experts = chosen.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
        let _ = write!(
            out,
            "<span class=\"e{}\" title=\"token {t} (id {}): experts {experts}\">{}</span>",
            chosen[0],
            trace.tokens[t],
            esc(&text)
        );
    }
    out
}
