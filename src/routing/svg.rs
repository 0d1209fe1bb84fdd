//! The SVG figure: per-layer expert shares as two heatmaps (first choice, either choice; paper Fig. 7
//! as a heatmap, coloured relative to the uniform share) and the consecutive-token repetition rates per
//! layer against their chance rates (paper Table 5 as a chart).

use std::fmt::Write;

use super::palette::{hex, ratio_color};
use super::stats::RoutingStats;
use super::Report;

const MARGIN: f64 = 24.0;
const LABEL_W: f64 = 56.0;
const CELL_W: f64 = 44.0;
const CELL_H: f64 = 20.0;
const GAP: f64 = 48.0;
const CHART_H: f64 = 220.0;
const LEGEND_W: f64 = 190.0;
const FIRST_COLOR: &str = "#1f5fa8";
const ANY_COLOR: &str = "#c2401c";

pub fn render(report: &Report) -> String {
    let stats = &report.stats;
    let (n_layers, n_experts) = (stats.layers.len(), stats.n_experts);
    let map_w = LABEL_W + CELL_W * n_experts as f64;
    let map_h = CELL_H * n_layers as f64;
    let width = (2.0 * MARGIN + 2.0 * map_w + GAP).max(640.0);
    let top = 78.0;
    let legend_y = top + 26.0 + map_h + 18.0;
    let chart_y = legend_y + 74.0;
    let height = chart_y + CHART_H + 64.0;

    let mut s = String::new();
    let _ = write!(
        s,
        r###"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{MARGIN}" y="28" font-size="17" font-weight="bold">Expert routing: {model} on {source}</text>
<text x="{MARGIN}" y="48" fill="#444">{tokens} tokens, {n_layers} layers, {n_experts} experts, top-{k}. Cells: share of tokens per expert (%), coloured against the uniform share.</text>
"###,
        model = esc(&report.trace.model),
        source = esc(&report.source),
        tokens = stats.tokens,
        k = stats.top_k,
    );
    let first: Vec<&[f64]> = stats.layers.iter().map(|l| l.share_first.as_slice()).collect();
    let any: Vec<&[f64]> = stats.layers.iter().map(|l| l.share_any.as_slice()).collect();
    heatmap(
        &mut s,
        MARGIN,
        top,
        &format!("First choice (uniform {:.1}%)", 100.0 * stats.uniform_share_first),
        &first,
        stats.uniform_share_first,
    );
    heatmap(
        &mut s,
        MARGIN + map_w + GAP,
        top,
        &format!("Either choice, top-{} (uniform {:.1}%)", stats.top_k, 100.0 * stats.uniform_share_any),
        &any,
        stats.uniform_share_any,
    );
    color_legend(&mut s, MARGIN + LABEL_W, legend_y);
    repetition_chart(&mut s, stats, MARGIN, chart_y, width - 2.0 * MARGIN);
    s.push_str("</svg>\n");
    s
}

/// Rows = layers, columns = experts; each cell the share in percent.
fn heatmap(s: &mut String, x0: f64, y0: f64, title: &str, rows: &[&[f64]], uniform: f64) {
    let _ = writeln!(
        s,
        r###"<text x="{x0}" y="{}" font-size="14" font-weight="bold">{}</text>"###,
        y0 - 6.0,
        esc(title)
    );
    let grid_y = y0 + 20.0;
    let n_experts = rows.first().map_or(0, |r| r.len());
    for e in 0..n_experts {
        let x = x0 + LABEL_W + CELL_W * (e as f64 + 0.5);
        let _ = writeln!(
            s,
            r###"<text x="{x}" y="{}" text-anchor="middle" fill="#444">e{e}</text>"###,
            grid_y - 5.0
        );
    }
    for (l, row) in rows.iter().enumerate() {
        let y = grid_y + CELL_H * l as f64;
        let _ = writeln!(
            s,
            r###"<text x="{}" y="{}" text-anchor="end" fill="#444">layer {l}</text>"###,
            x0 + LABEL_W - 6.0,
            y + CELL_H * 0.7
        );
        for (e, &share) in row.iter().enumerate() {
            let x = x0 + LABEL_W + CELL_W * e as f64;
            let ratio = share / uniform;
            let ink = if !(0.3..=3.0).contains(&ratio) { "white" } else { "black" };
            let _ = writeln!(
                s,
                r###"<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{}" stroke="white"><title>layer {l}, expert {e}: {:.2}% ({ratio:.2}× uniform)</title></rect><text x="{}" y="{}" text-anchor="middle" font-size="11" fill="{ink}">{:.1}</text>"###,
                hex(ratio_color(ratio)),
                100.0 * share,
                x + CELL_W / 2.0,
                y + CELL_H * 0.7,
                100.0 * share
            );
        }
    }
}

/// The colour scale of the heatmaps: ¼× … uniform … 4×.
fn color_legend(s: &mut String, x0: f64, y0: f64) {
    let steps = 40;
    let w = 8.0 * CELL_W / steps as f64;
    for i in 0..steps {
        let ratio = 2f64.powf(-2.0 + 4.0 * (i as f64 + 0.5) / steps as f64);
        let _ = writeln!(
            s,
            r###"<rect x="{}" y="{y0}" width="{}" height="12" fill="{}"/>"###,
            x0 + w * i as f64,
            w + 0.5,
            hex(ratio_color(ratio))
        );
    }
    let label_y = y0 + 26.0;
    for (frac, label) in [(0.0, "¼× uniform or less"), (0.5, "uniform"), (1.0, "4× or more")] {
        let anchor = ["start", "middle", "end"][(frac * 2.0) as usize];
        let _ = writeln!(
            s,
            r###"<text x="{}" y="{label_y}" text-anchor="{anchor}" fill="#444">{label}</text>"###,
            x0 + 8.0 * CELL_W * frac
        );
    }
}

/// Repetition rates per layer (first choice, either choice): solid with filled markers where above
/// chance; the chance rates dashed; the shuffled-order rates (what the expert loads alone give) dotted.
fn repetition_chart(s: &mut String, stats: &RoutingStats, x0: f64, y0: f64, width: f64) {
    let _ = writeln!(
        s,
        r###"<text x="{x0}" y="{}" font-size="14" font-weight="bold">Consecutive tokens routed to the same expert (paper Table 5), {} pairs</text>"###,
        y0 - 14.0,
        stats.pairs
    );
    let (px, pw, ph) = (x0 + LABEL_W, width - LABEL_W - LEGEND_W, CHART_H - 30.0);
    let y_of = |rate: f64| y0 + ph * (1.0 - rate);
    let n = stats.layers.len();
    let x_of = |l: usize| if n <= 1 { px + pw / 2.0 } else { px + pw * l as f64 / (n - 1) as f64 };
    for pct in [0, 25, 50, 75, 100] {
        let y = y_of(pct as f64 / 100.0);
        let _ = writeln!(
            s,
            r###"<line x1="{px}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end" fill="#444">{pct}%</text>"###,
            px + pw,
            px - 8.0,
            y + 4.0
        );
    }
    for l in (0..n).step_by(n.div_ceil(16).max(1)) {
        let _ = writeln!(
            s,
            r###"<text x="{}" y="{}" text-anchor="middle" fill="#444">{l}</text>"###,
            x_of(l),
            y0 + ph + 16.0
        );
    }
    let _ = writeln!(
        s,
        r###"<text x="{}" y="{}" text-anchor="middle" fill="#444">layer</text>"###,
        px + pw / 2.0,
        y0 + ph + 34.0
    );
    let polyline = |s: &mut String, rates: &[f64], color: &str, style: &str| {
        let points: Vec<String> =
            rates.iter().enumerate().map(|(l, r)| format!("{:.1},{:.1}", x_of(l), y_of(*r))).collect();
        let _ = writeln!(
            s,
            r###"<polyline points="{}" fill="none" stroke="{color}" {style}/>"###,
            points.join(" ")
        );
    };
    let series = [
        (
            "same first choice".to_string(),
            FIRST_COLOR,
            stats.chance_repeat_first,
            stats
                .layers
                .iter()
                .map(|l| (l.repeat_first, l.repeat_first_above_chance, l.shuffled_repeat_first))
                .collect::<Vec<_>>(),
        ),
        (
            format!("either of the top-{}", stats.top_k),
            ANY_COLOR,
            stats.chance_repeat_any,
            stats
                .layers
                .iter()
                .map(|l| (l.repeat_any, l.repeat_any_above_chance, l.shuffled_repeat_any))
                .collect(),
        ),
    ];
    let lx = px + pw + 20.0;
    for (i, (name, color, chance, points)) in series.iter().enumerate() {
        let yc = y_of(*chance);
        let _ = writeln!(
            s,
            r###"<line x1="{px}" y1="{yc}" x2="{}" y2="{yc}" stroke="{color}" stroke-dasharray="6 4" opacity="0.8"/>"###,
            px + pw
        );
        polyline(
            s,
            &points.iter().map(|p| p.2).collect::<Vec<_>>(),
            color,
            r#"stroke-width="1.5" stroke-dasharray="1.5 3""#,
        );
        polyline(s, &points.iter().map(|p| p.0).collect::<Vec<_>>(), color, r#"stroke-width="2""#);
        for (l, (rate, above, shuffled)) in points.iter().enumerate() {
            let _ = writeln!(
                s,
                r###"<circle cx="{}" cy="{}" r="4" fill="{}" stroke="{color}" stroke-width="2"><title>layer {l}: {:.1}% (chance {:.1}%, shuffled order {:.1}%)</title></circle>"###,
                x_of(l),
                y_of(*rate),
                if *above { color } else { "white" },
                100.0 * rate,
                100.0 * chance,
                100.0 * shuffled
            );
        }
        let ly = y0 + 8.0 + 62.0 * i as f64;
        let _ = writeln!(
            s,
            r###"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}" fill="{color}" font-weight="bold">{}</text><text x="{}" y="{}" fill="{color}">- - chance {:.1}%</text><text x="{}" y="{}" fill="{color}">··· shuffled order</text>"###,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(name),
            lx + 24.0,
            ly + 20.0,
            100.0 * chance,
            lx + 24.0,
            ly + 36.0
        );
    }
    let _ = writeln!(
        s,
        r###"<text x="{lx}" y="{}" fill="#444">filled marker: above</text><text x="{lx}" y="{}" fill="#444">chance (z &gt; {})</text>"###,
        y0 + 140.0,
        y0 + 156.0,
        stats.z_above_chance
    );
}

/// Escapes text for XML (and HTML).
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
