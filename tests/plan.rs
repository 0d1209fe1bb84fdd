//! `mixtral-q plan`: placement and predicted speed from presets, given figures and routing traces,
//! and its errors.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use mixtral_q::format::gguf::{GgufLayout, MetaValue, Metadata};
use mixtral_q::model::ModelConfig;
use mixtral_q::quantize::{tensor_types, Target};

fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn mixtral_8x7b_on_every_preset_and_budget() {
    for (preset, card_gib) in [
        ("rtx3060", 12),
        ("rtx4060-laptop", 8),
        ("rtx4060ti-16g", 16),
        ("rtx3090", 24),
        ("rtx4090", 24),
        ("h100", 80),
    ] {
        let mut last_decode = f64::INFINITY;
        for gib in [22, 12, 6].into_iter().filter(|&g| g <= card_gib) {
            let vram = format!("{gib}G");
            let p = plan_json(&["--shape", "mixtral-8x7b", "--preset", preset, "--vram", &vram]);
            let plan = &p["plan"];
            assert_eq!(plan["total_experts"], 256, "{p}");
            let resident = plan["resident_experts"].as_u64().unwrap();
            assert!(resident < 256, "{preset} {vram}: {p}");
            assert!(plan["vram_bytes"].as_u64().unwrap() <= p["vram_budget"].as_u64().unwrap());
            let ours = p["mixtral_q"]["decode_tok_s"].as_f64().unwrap();
            let theirs = p["llama_cpp"]["prediction"]["decode_tok_s"].as_f64().unwrap();
            assert!(ours >= theirs && ours > 0.0, "{preset} {vram}: {p}");
            // Less VRAM, more experts on the CPU: slower.
            assert!(ours < last_decode, "{preset} {vram}: {p}");
            last_decode = ours;
            let n = p["llama_cpp"]["n_cpu_moe"].as_u64().unwrap();
            assert!(n > 0 && n <= 32, "{p}");
        }
    }
    // The text form names both and the per-layer placement.
    let o = run(&["plan", "--shape", "mixtral-8x7b", "--preset", "rtx4090"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "rtx4090 preset",
        "experts in VRAM",
        "resident experts per layer",
        "mixtral-q (hybrid)",
        "llama.cpp --n-cpu-moe",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // An 80 GB card holds the whole model: nothing on the CPU.
    let p = plan_json(&["--shape", "mixtral-8x7b", "--preset", "h100"]);
    assert_eq!(p["plan"]["resident_experts"], 256, "{p}");
    assert_eq!(p["mixtral_q"]["host_experts_per_token"], 0.0, "{p}");
}

#[test]
fn figures_given_override_the_preset_and_missing_ones_are_named() {
    let p =
        plan_json(&["--shape", "mixtral-8x7b", "--preset", "rtx4090", "--vram", "12G", "--cpu-bw", "200"]);
    let fast = p["mixtral_q"]["decode_tok_s"].as_f64().unwrap();
    let q = plan_json(&["--shape", "mixtral-8x7b", "--preset", "rtx4090", "--vram", "12G"]);
    assert!(fast > q["mixtral_q"]["decode_tok_s"].as_f64().unwrap(), "{p}");
    assert_eq!(p["machine"]["cpu_bw"], 200e9);

    let o = run(&["plan", "--shape", "mixtral-8x7b", "--vram", "12G"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no --gpu-bw: give it, or a --preset"), "{}", stderr(&o));
    let o = run(&["plan", "--shape", "mixtral-8x7b", "--preset", "rtx3060", "--vram", "22G"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("more than the preset's card has (12.00 GiB)"), "{}", stderr(&o));
    let o = run(&["plan", "--shape", "mixtral-8x7b", "--preset", "gtx480"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown preset \"gtx480\": expected one of rtx3060"), "{}", stderr(&o));
    let o = run(&[
        "plan",
        "--shape",
        "mixtral-8x7b",
        "--gpu-bw",
        "900",
        "--pcie-bw",
        "24",
        "--gpu-tflops",
        "80",
        "--cpu-bw",
        "50",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("give --vram SIZE or a --preset"), "{}", stderr(&o));
    // The experts left on the host against --ram.
    let o = run(&["plan", "--shape", "mixtral-8x7b", "--preset", "rtx3060", "--ram", "8G"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("exceed --ram"), "{}", stdout(&o));
}

#[test]
fn a_trace_of_the_demo_model_places_its_hot_experts_first() {
    let dir = tempfile::tempdir().unwrap();
    let m = fixtures().join("rustdoc-mixtral/rustdoc-q4_k_m.gguf");
    let m = m.to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "A closure captures values from its environment. Ownership moves them into it. ".repeat(8),
    )
    .unwrap();
    let o = run(&["routing", "-m", m, "-f", text.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trace = dir.path().join("trace.json");
    std::fs::write(&trace, &o.stdout).unwrap();
    let t = trace.to_str().unwrap();
    // Room for the dense part and 12 of its 32 experts.
    let all = plan_json(&["-m", m, "--preset", "h100", "--cpu-bw", "40", "-c", "256"]);
    let p = &all["plan"];
    assert_eq!(p["resident_experts"], 32, "{all}");
    let base: u64 =
        ["dense_bytes", "kv_cache_bytes", "buffer_bytes"].iter().map(|k| p[k].as_u64().unwrap()).sum();
    let vram = (base + 12 * p["largest_expert_bytes"].as_u64().unwrap()).to_string();
    let figures = ["--preset", "rtx4060-laptop", "--cpu-bw", "40", "--vram", &vram, "-c", "256"];
    let mut with_trace = vec!["-m", m, "--trace", t];
    with_trace.extend_from_slice(&figures);
    let hot = plan_json(&with_trace);
    assert_eq!(hot["routing"], "trace");
    let mut uniform_args = vec!["-m", m];
    uniform_args.extend_from_slice(&figures);
    let uniform = plan_json(&uniform_args);
    assert_eq!(uniform["routing"], "uniform");
    let resident = hot["plan"]["resident_experts"].as_u64().unwrap();
    assert!(resident > 0 && resident < 32, "{hot}");
    assert_eq!(resident, uniform["plan"]["resident_experts"].as_u64().unwrap());
    // Placing the trace's most used experts leaves fewer of its choices on the CPU than a uniform
    // router would leave with the spread placement.
    let h = hot["mixtral_q"]["host_experts_per_token"].as_f64().unwrap();
    let u = uniform["mixtral_q"]["host_experts_per_token"].as_f64().unwrap();
    assert!(h < u, "trace {h} vs uniform {u}");

    // A trace of another shape is refused.
    let o = run(&["plan", "--shape", "mixtral-8x7b", "--preset", "rtx4090", "--trace", t]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("a trace of 4 layers x 8 experts, the model has 32 x 8"), "{}", stderr(&o));
}

/// The 16 GB mix: Mixtral-8x7B in Q2_K_S fits a 16 GiB budget entirely on the GPU with a 4K context
/// (KV cache and buffers included), where plain Q2_K does not.
#[test]
fn q2_k_s_fits_16_gib_with_a_4k_context_and_q2_k_does_not() {
    let plan = |mix: &str| {
        let p = plan_json(&[
            "--shape",
            "mixtral-8x7b",
            "--type",
            mix,
            "--preset",
            "rtx4060ti-16g",
            "--vram",
            "16G",
            "--ctx",
            "4096",
        ]);
        assert_eq!(p["plan"]["kv_cache_bytes"], 4096u64 * 32 * 2 * 1024 * 2, "{p}");
        assert!(p["plan"]["buffer_bytes"].as_u64().unwrap() > 0, "{p}");
        assert!(p["plan"]["vram_bytes"].as_u64().unwrap() <= 16 << 30, "{p}");
        p
    };
    let q2_k_s = plan("Q2_K_S");
    assert_eq!(q2_k_s["plan"]["resident_experts"], 256, "{q2_k_s}");
    assert_eq!(q2_k_s["plan"]["slots"], 0, "{q2_k_s}");
    assert_eq!(q2_k_s["mixtral_q"]["host_experts_per_token"], 0.0, "{q2_k_s}");
    let q2_k = plan("q2_k");
    let resident = q2_k["plan"]["resident_experts"].as_u64().unwrap();
    assert!(resident < 256, "{q2_k}");
    assert!(q2_k["mixtral_q"]["host_experts_per_token"].as_f64().unwrap() > 0.0, "{q2_k}");
}

/// A GGUF with `cfg`'s tensors in `target`'s types whose data are all zeros, as a sparse file: real
/// Mixtral-8x7B sizes on no disk space.
fn sparse_gguf(path: &Path, cfg: &ModelConfig, target: Target) {
    let mut meta = Metadata::new();
    cfg.to_gguf(&mut meta);
    meta.set("general.file_type", MetaValue::U32(target.file_type()));
    let layout = GgufLayout::new(meta, tensor_types(cfg, target)).unwrap();
    let file = std::fs::File::create(path).unwrap();
    file.set_len(layout.total_size()).unwrap();
    file.write_all_at(layout.header(), 0).unwrap();
}

/// `info` says which preset cards hold a file entirely on the GPU and up to what context, the whole
/// card and the default budget each: the longest context with which `plan` keeps all 256 experts in
/// VRAM, one token more and it does not.
#[test]
fn info_prints_which_cards_hold_the_file_and_up_to_what_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixtral-8x7b-q2_k_s.gguf");
    sparse_gguf(&path, &ModelConfig::mixtral_8x7b(32), Target::Q2KS);
    let m = path.to_str().unwrap();
    let o = run(&["info", m]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("GPU fit:"), "{text}");
    let row = |preset: &str| {
        let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{preset} "))).unwrap();
        line.split_once(": ").unwrap().1.to_string()
    };
    assert_eq!(row("rtx3060"), "does not fit");
    assert_eq!(row("rtx4060-laptop"), "does not fit");
    assert_eq!(row("h100"), "32768 / 32768 tokens (the model's whole context)");
    let sixteen = row("rtx4060ti-16g");
    let numbers: Vec<usize> =
        sixteen.trim_end_matches(" tokens").split(" / ").map(|n| n.parse().unwrap()).collect();
    let (whole, default) = (numbers[0], numbers[1]);
    assert!(whole >= 4096 && default < whole, "{sixteen}");

    let resident = |ctx: usize, vram: Option<&str>| {
        let ctx = ctx.to_string();
        let mut args = vec!["-m", m, "--preset", "rtx4060ti-16g", "--cpu-bw", "50", "-c", &ctx];
        if let Some(v) = vram {
            args.extend(["--vram", v]);
        }
        plan_json(&args)["plan"]["resident_experts"].as_u64().unwrap()
    };
    assert_eq!(resident(whole, Some("16G")), 256);
    assert!(resident(whole + 1, Some("16G")) < 256);
    assert_eq!(resident(default, None), 256);
    assert!(resident(default + 1, None) < 256);

    let o = run(&["info", m, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cards = json["gpu_fit"]["cards"].as_array().unwrap();
    let card = cards.iter().find(|c| c["preset"] == "rtx4060ti-16g").unwrap();
    assert_eq!(
        (card["whole_card"].as_u64(), card["default_budget"].as_u64()),
        (Some(whole as u64), Some(default as u64))
    );
}
