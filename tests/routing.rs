//! `mixtral-q routing` and `mixtral_q::routing` against transformers' router on the trained demo model
//! (tests/fixtures/rustdoc-mixtral/routing.json, made by make_routing_fixture.py beside it): the same
//! expert choices for every token and layer, the same statistics, above chance in the same layers; and
//! the command's outputs (JSON trace, SVG, HTML, tables) on the trained and the random model.

mod common;

use common::fixture::{
    demo_file, demo_json, demo_tokenizer, id_list, quantized_model, DEMO_FIXTURE, DEMO_MODEL,
};
use common::*;
use mixtral_q::quantize::Target;
use mixtral_q::routing::{self, Report, RoutingTrace};
use safetensors::SafeTensors;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// transformers' choices, `[layer][token]` → experts, highest weight first.
fn their_choices(fixture: &Value) -> Vec<Vec<Vec<usize>>> {
    fixture["top_k_experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            layer
                .as_array()
                .unwrap()
                .iter()
                .map(|t| id_list(t).into_iter().map(|e| e as usize).collect())
                .collect()
        })
        .collect()
}

/// The fixture's choices are the top-k of its float64 router logits, in order.
#[test]
fn fixture_choices_are_the_top_k_of_its_router_logits() {
    let fixture = demo_json("routing.json");
    let bytes = std::fs::read(format!("{DEMO_FIXTURE}/routing.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let logits = st.tensor("router_logits_f64").unwrap();
    let (n_layers, n_tokens, n_experts) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let values: Vec<f64> =
        logits.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
    let choices = their_choices(&fixture);
    assert_eq!((choices.len(), choices[0].len()), (n_layers, n_tokens));
    for l in 0..n_layers {
        for t in 0..n_tokens {
            let row = &values[(l * n_tokens + t) * n_experts..][..n_experts];
            let mut order: Vec<usize> = (0..n_experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            assert_eq!(&order[..2], choices[l][t].as_slice(), "layer {l} token {t}");
        }
    }
}

#[test]
fn router_choices_and_statistics_match_transformers_on_the_trained_model() {
    let fixture = demo_json("routing.json");
    let (_dir, model) = quantized_model(DEMO_MODEL, Target::F32);
    let tok = demo_tokenizer();
    let trace = routing::trace_text(&model, &tok, &demo_file("routing.txt"), 1024).expect("trace");
    assert_eq!(trace.tokens, id_list(&fixture["input_ids"]), "tokens vs transformers' tokenizer");
    let theirs = their_choices(&fixture);
    for (l, layer) in theirs.iter().enumerate() {
        for (t, experts) in layer.iter().enumerate() {
            assert_eq!(&trace.experts[t][l], experts, "layer {l} token {t} (first choice first)");
        }
    }

    let report = Report::new(trace, "routing.txt").unwrap();
    let stats = &report.stats;
    assert_eq!((stats.n_experts, stats.top_k), (8, 2));
    assert!((stats.chance_repeat_first - fixture["chance_first"].as_f64().unwrap()).abs() < 1e-12);
    assert!((stats.chance_repeat_any - fixture["chance_any"].as_f64().unwrap()).abs() < 1e-12);
    println!(
        "layer | repeat first: ours, transformers | repeat either: ours, transformers (chance 12.5%, 46.4%)"
    );
    let close =
        |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    for (ours, theirs) in stats.layers.iter().zip(fixture["layers"].as_array().unwrap()) {
        println!(
            "{} | {:.4} {:.4} | {:.4} {:.4} | above chance: {} {}",
            ours.layer,
            ours.repeat_first,
            theirs["repeat_first"].as_f64().unwrap(),
            ours.repeat_any,
            theirs["repeat_any"].as_f64().unwrap(),
            ours.above_chance(),
            theirs["repeat_first_above_chance"].as_bool().unwrap()
                || theirs["repeat_any_above_chance"].as_bool().unwrap()
        );
        assert!(close(&ours.share_first, &floats(&theirs["share_first"])), "layer {}", ours.layer);
        assert!(close(&ours.share_any, &floats(&theirs["share_any"])), "layer {}", ours.layer);
        assert!(close(
            &[ours.repeat_first, ours.repeat_any],
            &[theirs["repeat_first"].as_f64().unwrap(), theirs["repeat_any"].as_f64().unwrap()]
        ));
        assert_eq!(ours.repeat_first_above_chance, theirs["repeat_first_above_chance"].as_bool().unwrap());
        assert_eq!(ours.repeat_any_above_chance, theirs["repeat_any_above_chance"].as_bool().unwrap());
    }
    // transformers finds the trained router above chance (in all four layers); so must we.
    let above: Vec<usize> = fixture["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["repeat_first_above_chance"].as_bool().unwrap()
                || l["repeat_any_above_chance"].as_bool().unwrap()
        })
        .map(|l| l["layer"].as_u64().unwrap() as usize)
        .collect();
    assert!(!above.is_empty());
    assert_eq!(stats.layers_above_chance(), above);
}

/// The 4-bit demo file routes nearly like the f32 one (quantization flips some near-ties).
#[test]
fn q4_k_routing_stays_close_to_transformers() {
    let fixture = demo_json("routing.json");
    let (_dir, model) = quantized_model(DEMO_MODEL, Target::Q4K);
    let tok = demo_tokenizer();
    let trace = routing::trace_text(&model, &tok, &demo_file("routing.txt"), 1024).unwrap();
    let theirs = their_choices(&fixture);
    let n = trace.tokens.len() * trace.n_layers;
    let same_first = (0..trace.n_layers)
        .flat_map(|l| (0..trace.tokens.len()).map(move |t| (l, t)))
        .filter(|&(l, t)| trace.experts[t][l][0] == theirs[l][t][0])
        .count();
    println!("q4_k: first choice as transformers' for {same_first} of {n} (token, layer)");
    assert!(same_first as f64 >= 0.9 * n as f64);
    let stats = Report::new(trace, "routing.txt").unwrap().stats;
    for (ours, theirs) in stats.layers.iter().zip(fixture["layers"].as_array().unwrap()) {
        assert!(
            (ours.repeat_any - theirs["repeat_any"].as_f64().unwrap()).abs() < 0.03,
            "layer {}",
            ours.layer
        );
    }
}

#[test]
fn the_command_writes_a_replayable_trace_an_svg_and_an_html_page() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let o = run(&[
        "quantize",
        tiny_model_dir().to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
        "--type",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (svg, html) = (dir.path().join("r.svg"), dir.path().join("r.html"));
    let text = format!("{DEMO_FIXTURE}/routing.txt");
    let args = |extra: &[&str]| {
        let mut a = vec!["routing", "-m", model.to_str().unwrap(), "-f", &text];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let o = bin()
        .args(args(&["--json", "--svg", svg.to_str().unwrap(), "--html", html.to_str().unwrap()]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // The JSON is a routing trace (what replays read) with every statistic beside it.
    let json_path = dir.path().join("routing.json");
    std::fs::write(&json_path, &o.stdout).unwrap();
    let trace = RoutingTrace::read(&json_path).expect("routing --json is a trace");
    assert_eq!(
        (trace.n_layers, trace.n_experts, trace.top_k, trace.model.as_str()),
        (2, 8, 2, "tiny-mixtral")
    );
    assert_eq!(trace.text.concat().trim_start_matches("<s>"), demo_file("routing.txt").trim_start());
    let json: Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = json["statistics"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for key in ["share_first", "share_any", "repeat_first", "repeat_any", "shuffled_repeat_any", "z_any"] {
        assert!(!layers[0][key].is_null(), "{key} missing");
    }
    assert!(
        json["verdict"].as_str().unwrap().contains("Repetition is above chance in all 2 layers"),
        "{}",
        json["verdict"]
    );

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<rect").count() - 1 - 40, 2 * 2 * 8, "two heatmaps of 2 layers × 8 experts");
    assert_eq!(svg.matches("<circle").count(), 2 * 2, "two rates per layer");
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(html.contains("<svg") && html.contains("Table 5") && html.contains("Fig. 8"));
    // The default layers of a 2-layer model are 0 and 1: the text twice, one span per token.
    assert_eq!(html.matches("<span class=\"e").count(), 8 + 2 * trace.tokens.len());

    // Tables on stdout (no terminal: no ANSI colours), the verdict, errors as one line.
    let o = bin().args(args(&["--layer", "1"])).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && out.contains("paper Table 5")
            && out.contains("Random weights come near it only"),
        "{out}"
    );
    assert!(!out.contains('\x1b'));
    let o = bin().args(args(&["--layer", "2"])).output().unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("--layer 2: the model has layers 0 to 1"),
        "{}",
        stderr(&o)
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let o = run(&["routing", "-m", model.to_str().unwrap(), "-f", empty.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("no text"), "{}", stderr(&o));
    let o = run(&["routing", "-m", model.to_str().unwrap(), "-f", "/nonexistent.txt"]);
    assert!(!o.status.success() && stderr(&o).contains("cannot read /nonexistent.txt"), "{}", stderr(&o));
}
