//! `mixtral-q plan`: placement and predicted speed from presets, given figures and routing traces,
//! and its errors.

mod common;

use common::*;

fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn mixtral_8x7b_on_every_preset_and_budget() {
    for (preset, card_gib) in
        [("rtx3060", 12), ("rtx4060-laptop", 8), ("rtx3090", 24), ("rtx4090", 24), ("h100", 80)]
    {
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
