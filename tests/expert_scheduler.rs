//! The expert scheduler from the command line: a stand-in device (`--device standin:N`), its
//! statistics in `--verbose` and `bench -o json`, recording a routing trace from a run and replaying
//! it (`--record-routing`, `--routing-trace`).

mod common;

use common::*;

fn demo() -> String {
    fixtures().join("rustdoc-mixtral/rustdoc-q4_k_m.gguf").to_str().unwrap().to_owned()
}

fn generate(extra: &[&str]) -> std::process::Output {
    let m = demo();
    let mut args = vec!["generate", "-m", &m, "-p", "A closure is", "-n", "12", "--temp", "0"];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn a_stand_in_device_gives_the_cpu_engines_text_and_reports_where_experts_ran() {
    let cpu = generate(&["--device", "cpu"]);
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    for slots in ["0", "5", "32"] {
        let device = format!("standin:{slots}");
        let o = generate(&["--device", &device, "--verbose"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), stdout(&cpu), "{device}");
        let err = stderr(&o);
        let line = err.lines().find(|l| l.starts_with("backend: hybrid")).unwrap_or_else(|| panic!("{err}"));
        assert!(line.contains("experts per token") && line.contains("lookahead recall"), "{line}");
        if slots == "0" {
            assert!(line.contains("0.00 on the device"), "{line}");
        }
    }
    let o = generate(&["--device", "standin:x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad number of slots"), "{}", stderr(&o));
}

#[test]
fn a_recorded_trace_is_replayed_and_benchmarks_say_which_routing_they_used() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let t = trace.to_str().unwrap();
    let o = generate(&["--record-routing", t]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let experts = json["experts"].as_array().unwrap();
    assert_eq!(json["tokens"].as_array().unwrap().len(), experts.len());
    // The prompt (BOS + 4 tokens) and every generated token but the last went through the model.
    assert!(experts.len() > 5, "{}", experts.len());
    assert!(experts.iter().all(|t| t.as_array().unwrap().len() == 4));

    // Replaying it: the replayed routing is what the engine records, position by position.
    let replayed = dir.path().join("replayed.json");
    let o = generate(&["--routing-trace", t, "--record-routing", replayed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&replayed).unwrap()).unwrap();
    for (i, choice) in again["experts"].as_array().unwrap().iter().enumerate() {
        let sorted = |v: &serde_json::Value| {
            let mut layers: Vec<Vec<u64>> = serde_json::from_value(v.clone()).unwrap();
            layers.iter_mut().for_each(|l| l.sort());
            layers
        };
        assert_eq!(sorted(choice), sorted(&experts[i % experts.len()]), "token {i}");
    }

    let m = demo();
    let bench = |extra: &[&str]| {
        let mut args =
            vec!["bench", "-m", &m, "-p", "16", "-n", "4", "-r", "1", "-o", "json", "--device", "standin:6"];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    for row in bench(&["--routing-trace", t]).as_array().unwrap() {
        assert!(row["routing"].as_str().unwrap().starts_with("replayed from"), "{row}");
        let e = &row["experts"];
        assert!(e["tokens"].as_u64().unwrap() > 0, "{row}");
        let runs = e["experts_on_device"].as_u64().unwrap() + e["experts_on_host"].as_u64().unwrap();
        assert!(runs > 0, "{row}");
        assert!(e["lookahead_recall"].as_f64().is_some(), "{row}");
    }
    for row in bench(&[]).as_array().unwrap() {
        assert_eq!(row["routing"], "the model's router", "{row}");
    }

    // The trace's most used experts fixed in the slots: the same text, and the policy says so.
    let cpu = generate(&["--device", "cpu"]);
    let hot = generate(&["--device", "standin:6", "--hot-experts", t, "--verbose"]);
    assert!(hot.status.success(), "{}", stderr(&hot));
    assert_eq!(stdout(&hot), stdout(&cpu));
    assert!(stderr(&hot).contains("hybrid (6 slots, static-popular)"), "{}", stderr(&hot));

    // A trace of another model is refused in one line.
    let tiny = dir.path().join("tiny.json");
    std::fs::write(
        &tiny,
        r#"{"format": "mixtral-q routing trace", "version": 1, "model": "x", "n_layers": 2, "n_experts": 4,
            "top_k": 2, "tokens": [1], "experts": [[[0, 1], [2, 3]]]}"#,
    )
    .unwrap();
    let o = generate(&["--routing-trace", tiny.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("does not fit this model") && err.contains("2 layers"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
