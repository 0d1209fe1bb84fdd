//! The analysis as text for a terminal: the expert-share and repetition tables, and the text coloured
//! by first-choice expert with ANSI 24-bit colours (paper Fig. 8).

use std::fmt::Write;

use super::palette::expert_color;
use super::Report;

/// The tables and the verdict, plain text.
pub fn tables(report: &Report) -> String {
    let (trace, stats) = (&report.trace, &report.stats);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Expert routing: {} on {}: {} tokens, {} layers, {} experts, top-{}",
        trace.model,
        report.source,
        stats.tokens,
        stats.layers.len(),
        stats.n_experts,
        stats.top_k
    );
    let header: String = (0..stats.n_experts).map(|e| format!("{:>6}", format!("e{e}"))).collect();
    for (title, uniform, pick) in
        [("first choice", stats.uniform_share_first, 0), ("either choice", stats.uniform_share_any, 1)]
    {
        let _ = writeln!(
            s,
            "\nShare of tokens per expert, {title} (%; uniform {:.1}%, paper Fig. 7):",
            100.0 * uniform
        );
        let _ = writeln!(s, "layer{header}");
        for l in &stats.layers {
            let shares = if pick == 0 { &l.share_first } else { &l.share_any };
            let row: String = shares.iter().map(|v| format!("{:>6.1}", 100.0 * v)).collect();
            let _ = writeln!(s, "{:>5}{row}", l.layer);
        }
    }
    let _ = writeln!(
        s,
        "\nConsecutive tokens routed to the same expert (paper Table 5): same first choice, or top-{} sets sharing \
         one, over {} pairs (* above chance, z > {}):",
        stats.top_k,
        stats.pairs,
        stats.z_above_chance
    );
    let _ = writeln!(s, "{:>6} | {:^15} | shuffled order", "", "this text");
    let _ = writeln!(s, "{:>6} | {:>7} {:>7} | {:>6} {:>6}", "layer", "first", "either", "first", "either");
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    let mark = |above: bool| if above { "*" } else { " " };
    for l in &stats.layers {
        let _ = writeln!(
            s,
            "{:>6} | {:>6}{} {:>6}{} | {:>6} {:>6}",
            l.layer,
            pct(l.repeat_first),
            mark(l.repeat_first_above_chance),
            pct(l.repeat_any),
            mark(l.repeat_any_above_chance),
            pct(l.shuffled_repeat_first),
            pct(l.shuffled_repeat_any),
        );
    }
    let _ = writeln!(
        s,
        "{:>6} | {:>6}  {:>6}  |   (uniform routing: {} experts, top-{})",
        "chance",
        pct(stats.chance_repeat_first),
        pct(stats.chance_repeat_any),
        stats.n_experts,
        stats.top_k
    );
    let _ = writeln!(s, "\n{}\n\n{}", stats.verdict(), super::stats::NOTE);
    s
}

/// The text of the trace with each token on the background colour of its first-choice expert in
/// `layer`, preceded by a legend. Newlines end the colour, so that no coloured band runs to the margin.
pub fn coloured_text(report: &Report, layer: usize) -> String {
    let n = report.stats.n_experts;
    let paint = |e: usize, text: &str| {
        let (r, g, b) = expert_color(e, n);
        format!("\x1b[38;2;0;0;0;48;2;{r};{g};{b}m{text}\x1b[0m")
    };
    let legend: Vec<String> = (0..n).map(|e| paint(e, &format!(" {e} "))).collect();
    let mut s = format!(
        "Layer {layer}, each token coloured by its first-choice expert (paper Fig. 8): {}\n",
        legend.join(" ")
    );
    for (t, chosen) in report.trace.layer(layer).enumerate() {
        let text = report.token_text(t);
        for (i, line) in text.split('\n').enumerate() {
            if i > 0 {
                s.push('\n');
            }
            if !line.is_empty() {
                s.push_str(&paint(chosen[0], line));
            }
        }
    }
    s.push('\n');
    s
}
