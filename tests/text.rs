//! The text layer against the fixture: HF tokenizer.json and the rebuilt GGUF vocabulary give the ids
//! `transformers` gave; streaming decode; chat template rendering; sampling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mixtral_q::format::gguf::{MetaValue, Metadata};
use mixtral_q::text::{
    fold_system_prompt, tokenizer_metadata, ChatTemplate, Message, Sampler, SamplingParams, StreamDecoder,
    Tokenizer,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
    chat: Vec<Chat>,
    tokenizer: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    input_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<Message>,
    rendered: String,
    input_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    input_ids: Vec<u32>,
    decoded: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("models/tiny-mixtral")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(root().join("tests/fixtures/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn gguf_metadata() -> Metadata {
    let mut meta = Metadata::new();
    tokenizer_metadata(&model_dir(), &mut meta).unwrap();
    meta
}

/// What a third-party GGUF carries: only tokenizer.ggml.*, no tokenizer.json.
fn third_party_metadata() -> Metadata {
    let mut meta = Metadata::new();
    for (key, value) in gguf_metadata().iter().filter(|(k, _)| *k != "tokenizer.huggingface.json") {
        meta.set(key, value.clone());
    }
    meta
}

/// The tokenizer rebuilt from the vocabulary (the GGUF sits in a folder without tokenizer.json).
fn gguf_vocab_tokenizer() -> Tokenizer {
    let meta = third_party_metadata();
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::from_gguf(&meta, &dir.path().join("model.gguf")).unwrap();
    assert_eq!(tok.source(), "gguf vocab");
    tok
}

fn hf_tokenizer() -> Tokenizer {
    let tok = Tokenizer::from_hf_file(&model_dir().join("tokenizer.json")).unwrap();
    assert_eq!(tok.source(), "tokenizer.json");
    tok
}

fn all_tokenizers() -> Vec<(&'static str, Tokenizer)> {
    let embedded = Tokenizer::from_gguf(&gguf_metadata(), Path::new("/nonexistent/model.gguf")).unwrap();
    assert_eq!(embedded.source(), "tokenizer.huggingface.json");
    vec![("hf", hf_tokenizer()), ("embedded", embedded), ("gguf vocab", gguf_vocab_tokenizer())]
}

/// Texts with the ids transformers gave them (BOS included).
fn reference_texts() -> Vec<(String, Vec<u32>)> {
    let r = reference();
    let mut texts: Vec<(String, Vec<u32>)> = r.tokenizer.into_iter().map(|t| (t.text, t.input_ids)).collect();
    texts.extend(r.cases.into_iter().map(|c| (c.text, c.input_ids)));
    texts
}

#[test]
fn every_tokenizer_reproduces_reference_ids() {
    let texts = reference_texts();
    assert!(texts.len() >= 10);
    for (name, tok) in all_tokenizers() {
        for (text, ids) in &texts {
            assert_eq!(&tok.encode(text, true).unwrap(), ids, "{name} tokenizer on {text:?}");
            let without_bos = tok.encode(text, false).unwrap();
            assert_eq!(without_bos[..], ids[1..], "{name} tokenizer without BOS on {text:?}");
        }
    }
}

#[test]
fn every_tokenizer_decodes_like_reference() {
    let r = reference();
    for (name, tok) in all_tokenizers() {
        for case in &r.tokenizer {
            assert_eq!(tok.decode(&case.input_ids).unwrap(), case.decoded, "{name} tokenizer");
        }
        for case in &r.cases {
            assert_eq!(tok.decode(&case.input_ids).unwrap(), case.text, "{name} tokenizer");
        }
    }
}

#[test]
fn special_ids_and_pieces_agree_across_sources() {
    let tokenizers = all_tokenizers();
    let (_, hf) = &tokenizers[0];
    assert_eq!((hf.bos_id(), hf.eos_id(), hf.vocab_size()), (1, 2, 512));
    assert_eq!(hf.piece(13), "<0x0A>");
    for (name, tok) in &tokenizers {
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.vocab_size()), (1, 2, 512), "{name}");
        assert!(tok.adds_bos(), "{name}");
        for id in 0..512 {
            assert_eq!(tok.piece(id), hf.piece(id), "{name} piece {id}");
        }
    }
}

#[test]
fn bos_is_never_doubled() {
    for (name, tok) in all_tokenizers() {
        let ids = tok.encode("<s>[INST] hi [/INST]", true).unwrap();
        assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1, "{name}: {ids:?}");
        assert_eq!(ids[0], 1);
    }
}

#[test]
fn gguf_vocab_metadata_is_llama_style() {
    let meta = gguf_metadata();
    assert_eq!(meta.get_str("tokenizer.ggml.model"), Some("llama"));
    let tokens = meta.get_array("tokenizer.ggml.tokens").unwrap();
    let scores = meta.get_array("tokenizer.ggml.scores").unwrap();
    let types = meta.get_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!((tokens.len(), scores.len(), types.len()), (512, 512, 512));
    let type_of = |id: usize| types[id].as_i64().unwrap();
    assert_eq!((type_of(0), type_of(1), type_of(2)), (2, 3, 3));
    assert!((3..259).all(|id| type_of(id) == 6));
    assert!((259..512).all(|id| type_of(id) == 1));
    assert_eq!(tokens[13], MetaValue::String("<0x0A>".into()));
    assert_eq!(meta.get_u64("tokenizer.ggml.bos_token_id"), Some(1));
    assert_eq!(meta.get_u64("tokenizer.ggml.eos_token_id"), Some(2));
    assert_eq!(meta.get_u64("tokenizer.ggml.unknown_token_id"), Some(0));
    assert_eq!(meta.get_bool("tokenizer.ggml.add_bos_token"), Some(true));
    assert_eq!(meta.get_bool("tokenizer.ggml.add_eos_token"), Some(false));
    assert!(meta.get_str("tokenizer.chat_template").unwrap().contains("[INST]"));
    let json = std::fs::read_to_string(model_dir().join("tokenizer.json")).unwrap();
    assert_eq!(meta.get_str("tokenizer.huggingface.json"), Some(json.as_str()));
    // Merged tokens score by merge rank: the first merge ("e" + "▁") scores highest.
    let score_of = |piece: &str| {
        let id = tokens.iter().position(|t| t.as_str() == Some(piece)).unwrap();
        scores[id].as_f64().unwrap()
    };
    assert!(score_of("e▁") > score_of("s▁"));
    assert!(score_of("s▁") > score_of("▁▁"));
}

/// The tokenizers crate panics on some malformed tokenizer.json (a broken "decoder" object; found by
/// tests/fuzz): that is an error naming the file, from a file beside the GGUF or from its metadata.
#[test]
fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
    let json = std::fs::read_to_string(model_dir().join("tokenizer.json")).unwrap();
    let at = json.find("\"decoder\": {").unwrap() + "\"decoder\": {".len();
    let broken = format!("{}\"type\": \"Sequence\" 7{}", &json[..at], &json[at..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, &broken).unwrap();
    let err =
        format!("{:#}", Tokenizer::from_hf_file(&path).err().expect("a malformed tokenizer.json loaded"));
    assert!(err.contains("tokenizer.json: malformed (the tokenizers library panicked on it)"), "{err}");
    let mut meta = gguf_metadata();
    meta.set("tokenizer.huggingface.json", MetaValue::String(broken));
    let err = format!("{:#}", Tokenizer::from_gguf(&meta, Path::new("/nonexistent/m.gguf")).err().unwrap());
    assert!(err.contains("tokenizer.huggingface.json in /nonexistent/m.gguf"), "{err}");
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = tokenizer_metadata(dir.path(), &mut Metadata::new()).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&dir.path().join("tokenizer.json").display().to_string()), "{message}");
}

#[test]
fn tokenizer_json_beside_the_gguf_is_used() {
    let mut meta = Metadata::new();
    meta.set("tokenizer.ggml.model", MetaValue::String("llama".into()));
    let tok = Tokenizer::from_gguf(&meta, &model_dir().join("model.gguf")).unwrap();
    assert_eq!(tok.source(), "tokenizer.json");
}

const MULTIBYTE: &str = "héllo wörld — 日本語 🚀 ¿Qué tal? 数字";

#[test]
fn multibyte_text_round_trips_and_streams() {
    for (name, tok) in all_tokenizers() {
        for text in [MULTIBYTE, "  two leading spaces", "€", "a\tb\nc 🙂🙂", ""] {
            let ids = tok.encode(text, true).unwrap();
            let decoded = tok.decode(&ids).unwrap();
            assert_eq!(decoded, text, "{name} round trip");

            let mut stream = StreamDecoder::new(&tok);
            let mut streamed = String::new();
            for &id in &ids {
                let part = stream.push(id).unwrap();
                assert!(!part.contains('\u{FFFD}'), "{name}: U+FFFD streaming {text:?}");
                streamed.push_str(&part);
            }
            streamed.push_str(&stream.flush());
            assert_eq!(streamed, decoded, "{name} stream of {text:?}");
        }
        // Byte-fallback characters really do arrive in pieces: "日" is three byte tokens.
        let ids = tok.encode("日", false).unwrap();
        assert!(ids.len() >= 3, "{name}: {ids:?}");
        let mut stream = StreamDecoder::new(&tok);
        let parts: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(parts.concat(), "日");
        assert!(parts[..parts.len() - 1].iter().all(String::is_empty), "{name}: {parts:?}");
    }
}

/// A continuation streamed after its prompt reads as the whole sequence decoded: the leading space of
/// its first word stays ("Ownership is" + " to" is not "Ownership isto"). Every split of an ASCII text
/// at a token boundary (with the tiny vocabulary, few of them fall before a space).
#[test]
fn a_continuation_keeps_its_leading_space() {
    for (name, tok) in all_tokenizers() {
        let text = "hello world, two  spaces and\ta tab";
        let ids = tok.encode(text, true).unwrap();
        let mut before_a_space = 0;
        for k in 2..ids.len() {
            let mut stream = StreamDecoder::new(&tok);
            stream.keep_leading_space();
            let mut streamed = String::new();
            for &id in &ids[k..] {
                streamed.push_str(&stream.push(id).unwrap());
            }
            streamed.push_str(&stream.flush());
            before_a_space += usize::from(streamed.starts_with(' '));
            let prompt = tok.decode(&ids[..k]).unwrap();
            assert_eq!(format!("{prompt}{streamed}"), text, "{name}: split after {k} tokens");
        }
        assert!(before_a_space >= 1, "{name}: no split before a space");
    }
}

#[test]
fn stream_flush_reports_an_unfinished_character() {
    let tok = hf_tokenizer();
    let mut stream = StreamDecoder::new(&tok);
    let first_byte = tok.encode("日", false).unwrap()[1];
    assert_eq!(stream.push(first_byte).unwrap(), "");
    assert_eq!(stream.flush(), "\u{FFFD}");
    assert!(stream.push(100_000).is_err());
}

#[test]
fn chat_renderings_match_reference() {
    let r = reference();
    assert_eq!(r.chat.len(), 2);
    let meta = gguf_metadata();
    let templates = [
        ("metadata", ChatTemplate::from_metadata(&meta).unwrap()),
        ("built-in", ChatTemplate::mixtral_instruct()),
    ];
    for (name, template) in &templates {
        for chat in &r.chat {
            let rendered = template.render(&chat.messages, true).unwrap();
            assert_eq!(rendered, chat.rendered, "{name} template");
            for (tok_name, tok) in all_tokenizers() {
                let ids = tok.encode(&rendered, false).unwrap();
                assert_eq!(ids, chat.input_ids, "{name} template, {tok_name} tokenizer");
                assert_eq!(tok.encode(&rendered, true).unwrap(), chat.input_ids, "BOS once");
            }
        }
    }
    assert_eq!(
        ChatTemplate::from_metadata(&Metadata::new()).unwrap().render(&r.chat[1].messages, true).unwrap(),
        r.chat[1].rendered
    );
}

#[test]
fn mixtral_rejects_system_and_folding_helps() {
    let template = ChatTemplate::mixtral_instruct();
    assert!(!template.supports_system());
    let messages = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
    let err = template.render(&messages, true).unwrap_err();
    assert!(format!("{err}").contains("alternate"), "{err}");
    let folded = fold_system_prompt(&messages);
    assert_eq!(folded, vec![Message::new("user", "Be brief.\n\nHi")]);
    assert_eq!(template.render(&folded, true).unwrap(), "<s>[INST] Be brief.\n\nHi [/INST]");
    let err = template.render(&[Message::new("user", "a"), Message::new("user", "b")], true).unwrap_err();
    assert!(format!("{err}").contains("alternate"), "{err}");
}

#[test]
fn namespaces_used_as_templates_use_them_still_render() {
    // Reading from a namespace, accumulating into it, strings that mention it: all fine.
    let source = "{% set ns = namespace(text='', n=0) %}{% for m in messages %}{% set ns.text = ns.text ~ m['content'] %}\
                  {% set ns.n = ns.n + 1 %}{% set ns.label = 'ns' %}{% endfor %}{{ ns.text }}/{{ ns.n }}/{{ ns.label }}";
    let template = ChatTemplate::from_source(source).unwrap();
    let out = template.render(&[Message::new("user", "a"), Message::new("assistant", "b")], true).unwrap();
    assert_eq!(out, "ab/2/ns");
}

#[test]
fn templates_with_system_and_python_methods_render() {
    let source = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].strip() }}\n{% endfor %}\
                  {% if add_generation_prompt %}<|assistant|>{% endif %}";
    let template = ChatTemplate::from_source(source).unwrap();
    assert!(template.supports_system());
    let out = template.render(&[Message::new("system", "  S  "), Message::new("user", "U\n")], true).unwrap();
    assert_eq!(out, "<|system|>S\n<|user|>U\n<|assistant|>");
    assert_eq!(template.render(&[Message::new("user", "U")], false).unwrap(), "<|user|>U\n");
    assert!(ChatTemplate::from_source("{% for %}").is_err());
}

/// A template is code from the model file: runaway loops, deep recursion and huge output are refused
/// with an error that says so, quickly, instead of hanging or filling memory.
#[test]
fn hostile_templates_are_refused() {
    let user = [Message::new("user", "hi")];
    let cases = [
        // 10^10 iterations.
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "instructions"),
        // 10^10 bytes of output.
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
            "refused",
        ),
        ("{% for a in range(1000) %}{{ 'x' * 100000 }}{% endfor %}", "output exceeds"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nests deeper"),
        ("{% for a in range(1000000000) %}x{% endfor %}", "too many elements"),
        // minijinja 2.24 panics on a reversed slice of an empty list (found by tests/fuzz).
        ("{% for m in messages[1:][::-1] %}{% endfor %}", "crashed the template engine"),
        // A namespace holding itself: printing it recursed until the stack overflowed (found by
        // tests/fuzz), directly, through a list, an alias or a loop variable.
        ("{% set ns = namespace(a='') %}{% set ns.a = ns %}{{ ns.a|upper }}", "namespace inside a namespace"),
        ("{% set ns = namespace() %}{% set ns.a = [1, ns] %}{{ ns }}", "namespace inside a namespace"),
        (
            "{% set n = namespace() %}{% set alias = n %}{%- set n.a = alias -%}{{ n }}",
            "namespace inside a namespace",
        ),
        (
            "{% set n = namespace() %}{% for x in [n] %}{% set n.a = x %}{% endfor %}{{ n }}",
            "namespace inside a namespace",
        ),
    ];
    for (source, want) in cases {
        let start = std::time::Instant::now();
        let err = ChatTemplate::from_source(source).and_then(|t| t.render(&user, true));
        let err = format!("{:#}", err.unwrap_err());
        assert!(err.contains(want) && err.contains("chat template"), "{source}: {err}");
        assert!(start.elapsed().as_secs_f64() < 2.0, "{source}: took {:?}", start.elapsed());
    }
}

fn logits() -> Vec<f32> {
    vec![1.0, 3.0, 2.5, -1.0, 3.0, 0.0, 2.9, -2.0]
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
    assert_eq!(sampler.sample(&logits(), &[]), 1);
    assert_eq!(sampler.sample(&[0.5, 0.1, 4.0, 3.9], &[]), 2);
}

#[test]
fn top_k_one_is_greedy() {
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 1.5,
        top_k: 1,
        top_p: 1.0,
        min_p: 0.0,
        ..Default::default()
    });
    for _ in 0..50 {
        assert_eq!(sampler.sample(&logits(), &[]), 1);
    }
}

#[test]
fn fixed_seed_is_reproducible() {
    let params =
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 7, ..Default::default() };
    let draw = |params: SamplingParams| {
        let mut sampler = Sampler::new(params);
        (0..200).map(|_| sampler.sample(&logits(), &[])).collect::<Vec<u32>>()
    };
    let a = draw(params.clone());
    assert_eq!(a, draw(params.clone()));
    assert_ne!(a, draw(SamplingParams { seed: 8, ..params }));
    assert!(a.iter().collect::<std::collections::HashSet<_>>().len() >= 4, "sampling is not degenerate");
}

fn histogram(params: SamplingParams, logits: &[f32], draws: usize) -> HashMap<u32, usize> {
    let mut sampler = Sampler::new(params);
    let mut counts = HashMap::new();
    for _ in 0..draws {
        *counts.entry(sampler.sample(logits, &[])).or_insert(0) += 1;
    }
    counts
}

#[test]
fn unrestricted_sampling_follows_softmax() {
    // Probabilities 0.5, 0.25, 0.125, 0.125.
    let logits = [2f32.ln() * 2.0, 2f32.ln(), 0.0, 0.0];
    let draws = 20_000;
    let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() };
    let counts = histogram(params, &logits, draws);
    for (id, p) in [(0u32, 0.5), (1, 0.25), (2, 0.125), (3, 0.125)] {
        let freq = counts.get(&id).copied().unwrap_or(0) as f64 / draws as f64;
        assert!((freq - p).abs() < 0.015, "token {id}: {freq} vs {p}");
    }
}

#[test]
fn top_p_and_min_p_exclude_the_tail() {
    let logits = [2f32.ln() * 2.0, 2f32.ln(), 0.0, 0.0]; // 0.5, 0.25, 0.125, 0.125
    let base = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() };
    // top_p 0.7: 0.5 < 0.7 ≤ 0.75 keeps tokens 0 and 1, renormalized to 2/3 and 1/3.
    let counts = histogram(SamplingParams { top_p: 0.7, ..base.clone() }, &logits, 6000);
    assert_eq!(counts.keys().copied().max(), Some(1), "{counts:?}");
    let freq0 = counts[&0] as f64 / 6000.0;
    assert!((freq0 - 2.0 / 3.0).abs() < 0.03, "{freq0}");
    // min_p 0.3: keeps p ≥ 0.15 → tokens 0 and 1; min_p 0.2 (≥ 0.1) keeps all four.
    let counts = histogram(SamplingParams { min_p: 0.3, ..base.clone() }, &logits, 6000);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.contains_key(&0) && counts.contains_key(&1));
    let counts = histogram(SamplingParams { min_p: 0.2, ..base.clone() }, &logits, 6000);
    assert_eq!(counts.len(), 4, "{counts:?}");
    // top_k 3 drops one of the tied tail tokens: the higher id.
    let counts = histogram(SamplingParams { top_k: 3, ..base }, &logits, 6000);
    assert_eq!(counts.len(), 3);
    assert!(!counts.contains_key(&3), "{counts:?}");
}

#[test]
fn repeat_penalty_lowers_recent_tokens() {
    let greedy =
        SamplingParams { temperature: 0.0, repeat_penalty: 1.5, repeat_last_n: 2, ..Default::default() };
    // Positive logit divided: 3.0 / 1.5 = 2.0 < 2.9 → token 6 wins over 1 and 4 (both penalized).
    let mut sampler = Sampler::new(greedy.clone());
    assert_eq!(sampler.sample(&logits(), &[1, 4]), 6);
    // Only the last 2 tokens count: 1 is too old.
    assert_eq!(sampler.sample(&logits(), &[1, 0, 4]), 1);
    // Negative logit multiplied: -1.0 × 1.5 < -1.2, so token 1 (not penalized) beats it.
    let mut sampler = Sampler::new(greedy);
    assert_eq!(sampler.sample(&[-1.0, -1.2], &[0]), 1);
    // Off by default.
    let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
    assert_eq!(sampler.sample(&logits(), &[1, 4]), 1);
}

#[test]
fn gguf_vocab_tokenizer_matches_hf_on_random_text() {
    use rand::{Rng, SeedableRng};
    let hf = hf_tokenizer();
    let spm = gguf_vocab_tokenizer();
    let pieces: Vec<String> = (259..512).map(|id| hf.piece(id).replace('\u{2581}', " ")).collect();
    let extra = [" ", "  ", "\n", "\t", "é", "日本", "🚀", "<s>", "</s>", "x", "Q"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut mismatches = Vec::new();
    for _ in 0..3000 {
        let len = rng.random_range(1..12);
        let text: String = (0..len)
            .map(|_| {
                if rng.random_bool(0.8) {
                    pieces[rng.random_range(0..pieces.len())].clone()
                } else {
                    extra[rng.random_range(0..extra.len())].to_owned()
                }
            })
            .collect();
        let (a, b) = (hf.encode(&text, true).unwrap(), spm.encode(&text, true).unwrap());
        if a != b {
            mismatches.push(text);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of 3000 differ, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(5)]
    );
}

#[test]
fn merge_rank_scores_are_what_makes_the_gguf_vocab_agree() {
    // Control: with flat scores the SPM merge order is not BPE's, and the fixture ids are missed.
    let mut meta = third_party_metadata();
    meta.set("tokenizer.ggml.scores", MetaValue::f32_array(vec![0.0; 512]));
    let dir = tempfile::tempdir().unwrap();
    let flat = Tokenizer::from_gguf(&meta, &dir.path().join("model.gguf")).unwrap();
    let differing =
        reference_texts().iter().filter(|(text, ids)| &flat.encode(text, true).unwrap() != ids).count();
    assert!(differing > 0);
}
