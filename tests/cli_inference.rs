//! The inference commands as a user runs them: generate, perplexity, tokenize, bench, and bad input.

mod common;

use std::path::{Path, PathBuf};

use common::fixture::{cases, id_list, perplexity, reference_json};
use common::*;

/// The tiny fixture converted with the CLI, in a temp dir.
fn convert(dir: &Path, target: &str) -> PathBuf {
    let out = dir.join(format!("tiny-{target}.gguf"));
    let o =
        run(&["quantize", tiny_model_dir().to_str().unwrap(), "-o", out.to_str().unwrap(), "--type", target]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

fn json_of(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    assert!(o.status.success(), "mixtral-q {args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

#[test]
fn greedy_generate_reproduces_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "f32");
    for g in reference_json()["greedy"].as_array().unwrap() {
        let want = id_list(&g["greedy_new_ids"]);
        let n = want.len().to_string();
        let json = json_of(&[
            "generate",
            "-m",
            model.to_str().unwrap(),
            "-p",
            g["text"].as_str().unwrap(),
            "-n",
            &n,
            "--temp",
            "0",
            "--json",
        ]);
        assert_eq!(id_list(&json["prompt_ids"]), id_list(&g["input_ids"]));
        assert_eq!(id_list(&json["generated_ids"]), want, "{}", g["text"]);
        assert!(json["timings"]["generate_tokens_per_second"].as_f64().unwrap() > 0.0);
    }
}

/// `perplexity` against the reference logits: with --all-tokens over one window holding the whole `long`
/// case it is the reference's perplexity; scored like llama-perplexity (second half of each window) it
/// is the reference's over those positions, with llama-perplexity's ± estimate.
#[test]
fn perplexity_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "f32");
    let long =
        reference_json()["cases"].as_array().unwrap().iter().find(|c| c["name"] == "long").unwrap().clone();
    let text = dir.path().join("long.txt");
    std::fs::write(&text, long["text"].as_str().unwrap()).unwrap();
    let ppl = |extra: &[&str]| {
        let mut args =
            vec!["perplexity", "-m", model.to_str().unwrap(), "-f", text.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        json_of(&args)
    };
    let case = cases().into_iter().find(|c| c.name == "long").unwrap();
    let vocab = case.logits.len() / case.ids.len();
    let json = ppl(&["--ctx", "512", "--all-tokens"]);
    let want = perplexity(&case.logits, &case.ids, vocab);
    let got = json["perplexity"].as_f64().unwrap();
    assert!(((got - want) / want).abs() < 1e-4, "perplexity {got} vs reference {want}");
    assert_eq!(json["tokens_scored"].as_u64().unwrap() as usize, case.ids.len() - 1);

    // Smaller windows: consecutive windows of --ctx tokens, each starting with BOS, all scored.
    let json = ppl(&["--ctx", "32", "--all-tokens"]);
    assert_eq!(json["tokens_scored"].as_u64().unwrap() as usize, case.ids.len() - 1);
    assert!(json["perplexity"].as_f64().unwrap() > 1.0);

    // llama-perplexity's scoring over the first window of 48 (it starts with the text's BOS, so its
    // logits are the reference's): rows 24..46 predict tokens 25..47.
    assert_eq!(case.ids.len(), 96);
    let nll: Vec<f64> = (24..47)
        .map(|t| {
            let row = &case.logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - row[case.ids[t + 1] as usize]
        })
        .collect();
    let n = nll.len() as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|x| x * x).sum::<f64>() / n - mean * mean;
    let (want, want_error) = (mean.exp(), (var / (n - 1.0)).sqrt() * mean.exp());
    let json = ppl(&["--ctx", "48", "--chunks", "1"]);
    assert_eq!(json["tokens_scored"], 23);
    let (got, got_error) = (json["perplexity"].as_f64().unwrap(), json["perplexity_error"].as_f64().unwrap());
    assert!(((got - want) / want).abs() < 1e-4, "perplexity {got} vs reference {want}");
    assert!(((got_error - want_error) / want_error).abs() < 1e-3, "± {got_error} vs {want_error}");
    // Both windows of 48 (the second's first token replaced by BOS): 23 tokens each.
    let json = ppl(&["--ctx", "48"]);
    assert_eq!((json["tokens_scored"].as_u64(), json["windows"].as_u64()), (Some(46), Some(2)));
    let o = run(&["perplexity", "-m", model.to_str().unwrap(), "-f", text.to_str().unwrap(), "--ctx", "64"]);
    assert!(!o.status.success() && stderr(&o).contains("at least 2 × ctx = 128 tokens"), "{}", stderr(&o));
}

/// `--kl-divergence-base FILE` saves a base model's log-probabilities; `--kl-divergence` compares
/// another model over the same windows.
#[test]
fn perplexity_kl_divergence_against_a_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let base_model = convert(dir.path(), "f32");
    let quantized = convert(dir.path(), "q4_k");
    let long =
        reference_json()["cases"].as_array().unwrap().iter().find(|c| c["name"] == "long").unwrap().clone();
    let text = dir.path().join("long.txt");
    std::fs::write(&text, long["text"].as_str().unwrap()).unwrap();
    let base = dir.path().join("base.kld");
    let ppl = |model: &Path, extra: &[&str]| {
        let mut args = vec!["perplexity", "-m", model.to_str().unwrap(), "-f", text.to_str().unwrap()];
        args.extend_from_slice(&["--json", "--ctx", "32", "--kl-divergence-base", base.to_str().unwrap()]);
        args.extend_from_slice(extra);
        json_of(&args)
    };
    let saved = ppl(&base_model, &[]);
    assert!(base.exists());

    // Against itself: no divergence at all.
    let same = ppl(&base_model, &["--kl-divergence"]);
    let kl = &same["kl_divergence"];
    assert_eq!(
        (kl["mean"].as_f64(), kl["max"].as_f64(), kl["same_top_p"].as_f64()),
        (Some(0.0), Some(0.0), Some(1.0))
    );
    assert_eq!(kl["base_perplexity"], saved["perplexity"]);

    // A 4-bit model: some divergence; its own perplexity is what perplexity alone says.
    let q = ppl(&quantized, &["--kl-divergence"]);
    let kl = &q["kl_divergence"];
    let (mean, max, median) =
        (kl["mean"].as_f64().unwrap(), kl["max"].as_f64().unwrap(), kl["median"].as_f64().unwrap());
    assert!(mean > 0.0 && mean < 1.0 && kl["error"].as_f64().unwrap() > 0.0, "{kl}");
    assert!(
        max >= kl["p99"].as_f64().unwrap() && kl["p99"].as_f64().unwrap() >= median && median >= 0.0,
        "{kl}"
    );
    assert!(kl["same_top_p"].as_f64().unwrap() > 0.0);
    assert_eq!(kl["base_perplexity"], saved["perplexity"]);
    let alone = json_of(&[
        "perplexity",
        "-m",
        quantized.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--json",
        "--ctx",
        "32",
    ]);
    assert_eq!(q["perplexity"], alone["perplexity"]);

    // Other windows than the base's are refused.
    let o = run(&[
        "perplexity",
        "-m",
        quantized.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "48",
        "--kl-divergence",
        "--kl-divergence-base",
        base.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("other tokens"), "{}", stderr(&o));
}

#[test]
fn tokenize_renders_the_chat_template_like_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q8_0");
    for chat in reference_json()["chat"].as_array().unwrap() {
        let messages = dir.path().join("messages.json");
        std::fs::write(&messages, chat["messages"].to_string()).unwrap();
        let json = json_of(&[
            "tokenize",
            "-m",
            model.to_str().unwrap(),
            "--chat",
            messages.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(json["text"], chat["rendered"]);
        assert_eq!(id_list(&json["ids"]), id_list(&chat["input_ids"]));
    }
    for t in reference_json()["tokenizer"].as_array().unwrap() {
        let json =
            json_of(&["tokenize", "-m", model.to_str().unwrap(), t["text"].as_str().unwrap(), "--json"]);
        assert_eq!(id_list(&json["ids"]), id_list(&t["input_ids"]), "{}", t["text"]);
    }
}

#[test]
fn bench_reports_both_tests() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q4_k");
    let json =
        json_of(&["bench", "-m", model.to_str().unwrap(), "-p", "16", "-n", "8", "-r", "2", "-o", "json"]);
    let rows = json.as_array().unwrap();
    let tests: Vec<&str> = rows.iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["pp16", "tg8"]);
    for r in rows {
        assert_eq!(r["samples_ts"].as_array().unwrap().len(), 2);
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
    }
}

/// llama-bench's comma lists: a row per combination of thread count, depth and test.
#[test]
fn bench_runs_every_combination_of_its_lists() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q4_k");
    let m = model.to_str().unwrap();
    let json = json_of(&[
        "bench", "-m", m, "-p", "4,8", "-n", "2", "-t", "1,2", "-d", "0,4", "-r", "1", "-o", "json",
    ]);
    let rows: Vec<(u64, u64, String)> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["n_threads"].as_u64().unwrap(),
                r["n_depth"].as_u64().unwrap(),
                r["test"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut expected = Vec::new();
    for t in [1, 2] {
        for (d, at) in [(0, ""), (4, " @ d4")] {
            for test in ["pp4", "pp8", "tg2"] {
                expected.push((t, d, format!("{test}{at}")));
            }
        }
    }
    assert_eq!(rows, expected);
    expect_error(&["generate", "-m", m, "-p", "hi", "-t", "1,2"], "comma list is for `mixtral-q bench`");
}

/// An `error: ` line naming `needle`, non-zero exit, no panic.
fn expect_error(args: &[&str], needle: &str) {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "mixtral-q {args:?} succeeded");
    assert!(!err.contains("panicked"), "{err}");
    // Our errors are the last line; clap's usage errors add a "For more information" hint after theirs.
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    assert!(line.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q8_0");
    let m = model.to_str().unwrap();
    expect_error(&["generate", "-m", m, "-p", ""], "empty");
    let long_prompt = "word ".repeat(50);
    expect_error(&["generate", "-m", m, "-p", &long_prompt, "--ctx", "16"], "context");
    let not_gguf = dir.path().join("not.gguf");
    std::fs::write(&not_gguf, b"definitely not a model").unwrap();
    expect_error(&["generate", "-m", not_gguf.to_str().unwrap(), "-p", "hi"], "not.gguf");
    expect_error(
        &["generate", "-m", dir.path().join("missing.gguf").to_str().unwrap(), "-p", "hi"],
        "missing.gguf",
    );
    expect_error(&["perplexity", "-m", m, "-f", dir.path().join("nope.txt").to_str().unwrap()], "nope.txt");
    expect_error(&["info", not_gguf.to_str().unwrap()], "not.gguf");
    // Sampling values are checked as the REPL's /set checks them.
    for (flag, value, needle) in [
        ("--min-p", "3", "--min-p must be in [0, 1]"),
        ("--top-p", "2", "--top-p must be in (0, 1]"),
        ("--top-p", "0", "--top-p must be in (0, 1]"),
        ("--temp", "-1", "--temp must be a number ≥ 0"),
        ("--temp", "nan", "--temp must be a number ≥ 0"),
        ("--temp", "inf", "--temp must be a number ≥ 0"),
        ("--repeat-penalty", "0", "--repeat-penalty must be a number > 0"),
        ("--repeat-penalty", "-2", "--repeat-penalty must be a number > 0"),
    ] {
        expect_error(&["generate", "-m", m, "-p", "hi", flag, value], needle);
        expect_error(&["chat", "-m", m, flag, value], needle);
    }
    // A Hugging Face checkpoint (its directory, or a shard, renamed or not) where a GGUF belongs.
    let hf = tiny_model_dir();
    let shard = hf.join("model-00001-of-00002.safetensors");
    let renamed = dir.path().join("shard.bin");
    std::fs::copy(&shard, &renamed).unwrap();
    for (path, needle) in
        [(&hf, "is a directory"), (&shard, "is a safetensors file"), (&renamed, "is a safetensors file")]
    {
        let p = path.to_str().unwrap();
        expect_error(&["generate", "-m", p, "-p", "hi"], needle);
        expect_error(&["generate", "-m", p, "-p", "hi"], "mixtral-q quantize");
        expect_error(&["info", p], needle);
    }
    // A truncated copy of a real model.
    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&["generate", "-m", truncated.to_str().unwrap(), "-p", "hi"], "truncated.gguf");
}

/// A GGUF that is not Mixtral (a dense llama: no experts), and one without any tokenizer.
#[test]
fn non_mixtral_and_tokenizer_less_files_are_rejected() {
    use mixtral_q::format::gguf::{GgufFileWriter, GgufLayout, MetaValue, Metadata};
    use mixtral_q::format::GgmlType;
    use mixtral_q::model::ModelConfig;

    let dir = tempfile::tempdir().unwrap();
    let write = |path: &Path, meta: Metadata, tensors: Vec<(String, Vec<u64>)>| {
        let layout =
            GgufLayout::new(meta, tensors.into_iter().map(|(n, d)| (n, d, GgmlType::F32)).collect()).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let writer = GgufFileWriter::new(&file, layout).unwrap();
        for (i, t) in writer.layout().tensors().to_vec().iter().enumerate() {
            writer.write_tensor(i, &vec![0u8; t.n_bytes() as usize]).unwrap();
        }
        writer.finish().unwrap();
    };
    let cfg = ModelConfig::from_hf_config_file(&tiny_model_dir().join("config.json")).unwrap();

    let mut dense = Metadata::new();
    cfg.to_gguf(&mut dense);
    dense.set("llama.expert_count", MetaValue::U32(0));
    let dense_path = dir.path().join("dense.gguf");
    write(&dense_path, dense, vec![("token_embd.weight".into(), vec![128, 512])]);
    expect_error(&["generate", "-m", dense_path.to_str().unwrap(), "-p", "hi"], "not Mixtral");

    let mut no_tok = Metadata::new();
    cfg.to_gguf(&mut no_tok);
    let no_tok_path = dir.path().join("no-tokenizer.gguf");
    write(&no_tok_path, no_tok, cfg.gguf_tensors());
    expect_error(&["generate", "-m", no_tok_path.to_str().unwrap(), "-p", "hi"], "tokenizer");
}

/// `--device cuda` needs a usable GPU: without one it is a clear error, and `auto` falls back to the
/// CPU with a one-line notice; with one, both run.
#[test]
fn device_choice_without_and_with_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q8_0");
    let m = model.to_str().unwrap();
    let has_gpu = mixtral_q::engine::cuda::cuda_available().is_ok();
    let auto = run(&["generate", "-m", m, "-p", "hi", "-n", "2", "--device", "auto"]);
    assert!(auto.status.success(), "{}", stderr(&auto));
    if has_gpu {
        let o = run(&["generate", "-m", m, "-p", "hi", "-n", "2", "--device", "cuda"]);
        assert!(o.status.success(), "{}", stderr(&o));
    } else {
        expect_error(&["generate", "-m", m, "-p", "hi", "--device", "cuda"], "NVIDIA");
        let notices: Vec<_> =
            stderr(&auto).lines().filter(|l| l.contains("using the CPU")).map(String::from).collect();
        assert_eq!(notices.len(), 1, "{}", stderr(&auto));
    }
    expect_error(&["generate", "-m", m, "-p", "hi", "--device", "tpu"], "tpu");
    expect_error(&["generate", "-m", m, "-p", "hi", "--vram-budget", "lots"], "lots");
}

/// llama.cpp's spellings on `generate`: -n -1, --seed -1, -f FILE, -p -, --no-display-prompt,
/// --ignore-eos, -r/--stop; and a full context says so (stderr, `stop_reason` in --json).
#[test]
fn generate_takes_llama_cpp_flags_and_reports_why_it_stopped() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "f32");
    let m = model.to_str().unwrap();
    let prompt = "The mixture of experts";
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "-m", m, "--json"];
        args.extend_from_slice(extra);
        json_of(&args)
    };

    // No limit: generation runs until the context is full (EOS masked so that it cannot end earlier).
    let json = gen(&["-p", prompt, "-n", "-1", "--ctx", "40", "--ignore-eos", "--temp", "0"]);
    let n_prompt = json["prompt_ids"].as_array().unwrap().len();
    assert_eq!(json["stop_reason"], "context_full");
    assert_eq!(json["generated_ids"].as_array().unwrap().len(), 40 - n_prompt + 1);
    let o = run(&["generate", "-m", m, "-p", prompt, "-n", "-1", "--ctx", "40", "--ignore-eos"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("the context is full (40 tokens"), "{}", stderr(&o));

    // --ignore-eos: exactly -n tokens, none of them EOS.
    let json = gen(&["-p", prompt, "-n", "30", "--ignore-eos", "--temp", "0"]);
    let ids = id_list(&json["generated_ids"]);
    assert_eq!((ids.len(), json["stop_reason"].as_str()), (30, Some("max_tokens")));
    assert!(!ids.contains(&2), "{ids:?}");

    // Seeds: -1 picks one and reports it; the reported seed reproduces the run.
    let a = gen(&["-p", prompt, "-n", "12", "--seed", "-1", "--ignore-eos"]);
    let seed = a["seed"].as_u64().unwrap().to_string();
    let b = gen(&["-p", prompt, "-n", "12", "-s", &seed, "--ignore-eos"]);
    assert_eq!(a["generated_ids"], b["generated_ids"]);
    assert_eq!(b["seed"].as_u64().unwrap().to_string(), seed);

    // The prompt from a file or standard input gives the same ids as -p.
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, prompt).unwrap();
    let from_file = gen(&["-f", file.to_str().unwrap(), "-n", "1"]);
    assert_eq!(from_file["prompt_ids"], a["prompt_ids"]);
    let mut child = bin()
        .args(["generate", "-m", m, "--json", "-n", "1", "-p", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(prompt.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let from_stdin: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(from_stdin["prompt_ids"], a["prompt_ids"]);

    // --no-display-prompt: only the continuation is printed.
    let shown = stdout(&run(&["generate", "-m", m, "-p", prompt, "-n", "4", "--temp", "0"]));
    let hidden =
        stdout(&run(&["generate", "-m", m, "-p", prompt, "-n", "4", "--temp", "0", "--no-display-prompt"]));
    assert!(shown.starts_with(prompt), "{shown:?}");
    assert_eq!(format!("{prompt}{hidden}"), shown);

    // A stop string: the text ends just before its first appearance, which is not printed.
    let full = gen(&["-p", prompt, "-n", "30", "--ignore-eos", "--temp", "0"]);
    let text = full["text"].as_str().unwrap();
    let chars: Vec<char> = text.chars().collect();
    let at = (chars.len() / 2..chars.len() - 2)
        .find(|&k| !chars[k..k + 3].contains(&'\u{FFFD}'))
        .expect("printable text in the continuation");
    let stop: String = chars[at..at + 3].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];
    for flag in ["-r", "--reverse-prompt", "--stop"] {
        let json = gen(&["-p", prompt, "-n", "30", "--ignore-eos", "--temp", "0", flag, &stop]);
        assert_eq!(json["stop_reason"], "stop_string");
        assert_eq!(json["text"], before, "stop {stop:?}");
    }
    let streamed = stdout(&run(&[
        "generate",
        "-m",
        m,
        "-p",
        prompt,
        "-n",
        "30",
        "--ignore-eos",
        "--temp",
        "0",
        "-r",
        &stop,
    ]));
    assert_eq!(streamed, format!("{prompt}{before}\n"));
    expect_error(&["generate", "-m", m, "-p", prompt, "--seed", "-2"], "not a seed");
    expect_error(&["generate", "-m", m, "-p", prompt, "-n", "-3"], "not a token count");
}

/// `-ngl N` (llama.cpp's layer offload) is accepted by every inference command: 0 runs on the CPU;
/// llama.cpp-only flags get a message naming what to use instead of a confusing parse error.
#[test]
fn llama_cpp_layer_offload_and_unsupported_flags() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q8_0");
    let m = model.to_str().unwrap();
    let o = run(&["generate", "-m", m, "-p", "hi", "-n", "2", "-ngl", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("-ngl 0: running on the CPU"), "{}", stderr(&o));
    for ngl in ["-ngl", "--n-gpu-layers", "--gpu-layers"] {
        let o = run(&["generate", "-m", m, "-p", "hi", "-n", "2", ngl, "99", "--ctx-size", "64"]);
        assert!(o.status.success(), "{ngl}: {}", stderr(&o));
    }
    let o = run(&["bench", "-m", m, "-p", "4", "-n", "2", "-r", "1", "-ngl", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (flag, needle) in [
        ("-ncmoe", "--vram-budget"),
        ("-fa", "llama.cpp"),
        ("--mlock", "memory-mapped"),
        ("-cnv", "mixtral-q chat"),
    ] {
        let o = run(&["generate", "-m", m, "-p", "hi", flag, "4"]);
        assert_eq!(o.status.code(), Some(2), "{flag}");
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!("error: {flag} is a llama.cpp option")) && err.contains(needle),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// `tokenize --chat` takes what the REPL and chat APIs take: a list of messages, `{"messages": [...]}`
/// (with "system"), and a `/save` file; the system prompt is folded as the REPL folds it. A template
/// override is used; a template that would eat the machine's memory is refused.
#[test]
fn tokenize_chat_takes_the_repl_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert(dir.path(), "q8_0");
    let m = model.to_str().unwrap();
    let tokenize = |conversation: serde_json::Value, extra: &[&str]| {
        let path = dir.path().join("conversation.json");
        std::fs::write(&path, conversation.to_string()).unwrap();
        let mut args = vec!["tokenize", "-m", m, "--json", "--chat", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        json_of(&args)
    };
    let user = |text: &str| serde_json::json!({"role": "user", "content": text});
    let folded = tokenize(serde_json::json!([user("Be brief.\n\nHi")]), &[]);
    assert_eq!(folded["text"], "<s>[INST] Be brief.\n\nHi [/INST]");
    let system_message = serde_json::json!([{"role": "system", "content": "Be brief."}, user("Hi")]);
    for conversation in [
        system_message.clone(),
        serde_json::json!({"messages": system_message}),
        serde_json::json!({"system": "Be brief.", "messages": [user("Hi")]}),
        // A /save file.
        serde_json::json!({"system": "Be brief.", "messages": [user("Hi")], "settings": {"temperature": 0.8}}),
    ] {
        assert_eq!(tokenize(conversation.clone(), &[])["ids"], folded["ids"], "{conversation}");
    }
    let chatml = tokenize(system_message.clone(), &["--chat-template", "chatml"]);
    assert_eq!(
        chatml["text"],
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );

    let path = dir.path().join("conversation.json");
    let p = path.to_str().unwrap();
    std::fs::write(&path, r#"{"turns": []}"#).unwrap();
    expect_error(&["tokenize", "-m", m, "--chat", p], "neither a JSON list");
    std::fs::write(&path, system_message.to_string()).unwrap();
    expect_error(
        &["tokenize", "-m", m, "--chat", p, "--chat-template", "nonsense"],
        "neither a built-in template",
    );
    // A string doubled 40 times would be a TiB: the budget stops it at 512 MiB, saying why.
    let doubling = "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}";
    let o = run(&["tokenize", "-m", m, "--chat", p, "--chat-template", doubling]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with("error: the chat template was refused: rendering it took more than 512 MiB"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `info` counts parameters as llama.cpp does (`1.59 M`, not `0.00 B`) and says "1 KV head".
#[test]
fn info_reads_naturally() {
    let o = run(&["info", fixtures().join("llamacpp/tiny-q4_k_m.gguf").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("2 layers, hidden 128, FFN 224, 4 heads / 1 KV head × 32, 8 experts (2 used)"),
        "{text}"
    );
    assert!(text.contains("parameters:      1591936 (1.59 M)"), "{text}");
    assert!(text.contains("8 per layer in 2 layers") && text.contains("  q8_0       6 tensors"), "{text}");
}
