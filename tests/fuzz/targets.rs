//! One fuzz target per reader of bytes from a user's file, with its seeds and mutations.

use std::path::{Path, PathBuf};

use mixtral_q::engine::cpu::CpuEngine;
use mixtral_q::engine::Engine;
use mixtral_q::format::codec;
use mixtral_q::format::gguf::{GgufFile, GgufLayout, MetaValue, Metadata};
use mixtral_q::format::safetensors::SafetensorsFile;
use mixtral_q::format::GgmlType;
use mixtral_q::model::weights::{Model, SUPPORTED_TYPES};
use mixtral_q::model::ModelConfig;
use mixtral_q::text::{tokenizer_metadata, ChatTemplate, Message, StreamDecoder, Tokenizer};

use super::harness::{mutate_bytes, Rng, Target};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch file per target for readers that take a path (each target runs on one thread); in
/// memory (/dev/shm) where the machine has it, since it is rewritten for every input.
fn scratch(name: &str) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() { base.to_path_buf() } else { PathBuf::from(env!("CARGO_TARGET_TMPDIR")) };
    let dir = base.join(format!("mixtral-q-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Removes the scratch folder when dropped (also when a test fails).
pub struct ScratchCleanup;

impl Drop for ScratchCleanup {
    fn drop(&mut self) {
        if let Some(dir) = scratch("x").parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn all() -> Vec<Target> {
    vec![gguf(), tokenizer(), chat_template(), safetensors(), hf_config(), model()]
}

pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// A metadata-only GGUF (the bytes of its header).
fn metadata_file(meta: Metadata) -> Vec<u8> {
    GgufLayout::new(meta, Vec::new()).map(|l| l.header().to_vec()).unwrap_or_default()
}

/// A GGUF file in memory: header, then each tensor's bytes at its offset.
fn gguf_bytes(meta: Metadata, tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>) -> Option<Vec<u8>> {
    let layout =
        GgufLayout::new(meta, tensors.iter().map(|(n, d, t, _)| (n.clone(), d.clone(), *t)).collect())
            .ok()?;
    let mut out = vec![0u8; layout.total_size() as usize];
    out[..layout.header().len()].copy_from_slice(layout.header());
    for (info, (_, _, _, data)) in layout.tensors().iter().zip(&tensors) {
        let start = (layout.data_offset() + info.offset) as usize;
        let n = data.len().min(info.n_bytes() as usize);
        out[start..start + n].copy_from_slice(&data[..n]);
    }
    Some(out)
}

/// Header length of a GGUF seed: where byte mutations are most useful.
fn header_len(bytes: &[u8]) -> usize {
    GgufFile::from_bytes(Path::new("seed"), bytes).map_or(bytes.len(), |f| f.data_offset as usize)
}

fn tiny_tokenizer_metadata(with_hf_json: bool) -> Metadata {
    let mut meta = Metadata::new();
    tokenizer_metadata(&repo().join("models/tiny-mixtral"), &mut meta).unwrap();
    let mut out = Metadata::new();
    for (k, v) in meta.iter() {
        if with_hf_json || k != "tokenizer.huggingface.json" {
            out.set(k, v.clone());
        }
    }
    out
}

// ---- GGUF header, metadata and tensor infos ----

fn gguf() -> Target {
    let mut model = small_model(&mut Rng::new(7), false).unwrap();
    // The tiny model's tokenizer too, so that the metadata holds long arrays.
    let file = GgufFile::from_bytes(Path::new("seed"), &model).unwrap();
    let mut meta = file.metadata.clone();
    for (k, v) in tiny_tokenizer_metadata(false).iter() {
        meta.set(k, v.clone());
    }
    let tensors = file
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.ty, file.tensor_data(t).to_vec()))
        .collect();
    model = gguf_bytes(meta, tensors).unwrap();
    // llama.cpp's own writer: the header of its file (the tensor data is left out).
    let llama = std::fs::read(repo().join("tests/fixtures/llamacpp/tiny-q4_k_m.gguf")).unwrap();
    let llama_header = llama[..header_len(&llama)].to_vec();
    let seeds = vec![model, llama_header];
    let focus: Vec<usize> = seeds.iter().map(|s| header_len(s)).collect();
    let dictionary: Vec<&'static [u8]> = vec![
        b"GGUF",
        b"general.alignment",
        b"llama.block_count",
        b"tokenizer.ggml.tokens",
        b"blk.0.",
        b".weight",
    ];
    Target {
        name: "gguf",
        mutate: Box::new(move |rng, input, seeds| {
            let focus = seeds.iter().position(|s| s == input).map_or(input.len(), |i| focus[i]);
            mutate_bytes(rng, input, seeds, focus, &dictionary)
        }),
        seeds,
        run: Box::new(|input| {
            let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), input) else { return };
            for t in &file.tensors {
                assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes());
                let _ = t.shape();
            }
            if let Ok(cfg) = ModelConfig::from_gguf(&file.metadata) {
                let _ = cfg.n_params();
            }
            let _ = ChatTemplate::from_metadata(&file.metadata);
        }),
    }
}

// ---- the tokenizer rebuilt from GGUF metadata (and tokenizer.huggingface.json) ----

const TEXTS: [&str; 6] = [
    "Hello, world!",
    "  leading spaces\nand\ttabs",
    "<s>[INST] hi [/INST]</s>",
    "émoji 🦀 中文",
    "",
    "\u{0}\u{7f}<0x41>▁▁",
];

fn tokenizer() -> Target {
    let seeds =
        vec![metadata_file(tiny_tokenizer_metadata(false)), metadata_file(tiny_tokenizer_metadata(true))];
    Target {
        name: "tokenizer",
        seeds,
        mutate: Box::new(|rng, input, seeds| {
            if rng.chance(0.3) {
                return mutate_bytes(
                    rng,
                    input,
                    seeds,
                    0,
                    &[b"<0x", b"\xe2\x96\x81", b"<s>", b"\"merges\"", b"\"vocab\""],
                );
            }
            let Ok(file) = GgufFile::from_bytes(Path::new("seed"), input) else { return input.to_vec() };
            let mut meta = file.metadata;
            for _ in 0..1 + rng.below(3) {
                mutate_tokenizer_metadata(rng, &mut meta);
            }
            metadata_file(meta)
        }),
        run: Box::new(|input| {
            let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), input) else { return };
            // A folder without a tokenizer.json, so that only the metadata counts.
            let Ok(tok) = Tokenizer::from_gguf(&file.metadata, Path::new("/nonexistent-fuzz-dir/fuzz.gguf"))
            else {
                return;
            };
            for text in TEXTS {
                let Ok(ids) = tok.encode(text, true) else { continue };
                let _ = tok.decode(&ids);
                let mut stream = StreamDecoder::new(&tok);
                for &id in &ids {
                    let _ = stream.push(id);
                }
                stream.flush();
            }
            for id in [0, 1, 2, 3, 258, 511, 512, u32::MAX] {
                let _ = tok.piece(id);
                let _ = tok.decode(&[id]);
                let _ = StreamDecoder::new(&tok).push(id);
            }
            let _ = (tok.bos_id(), tok.eos_id());
            let _ = ChatTemplate::from_metadata(&file.metadata)
                .map(|t| t.render(&[Message::new("user", "hi")], true));
        }),
    }
}

fn mutate_tokenizer_metadata(rng: &mut Rng, meta: &mut Metadata) {
    const KEYS: [&str; 9] = [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ];
    let key = *rng.pick(&KEYS);
    let value = meta.get(key).cloned();
    let new = match (rng.below(4), value) {
        (0, _) => None,
        (1, _) => Some(random_scalar(rng)),
        (_, Some(MetaValue::Array { elem_type, mut values })) => {
            let n = values.len();
            match rng.below(4) {
                0 => values.truncate(rng.below(n + 1)),
                1 if n > 0 => {
                    let i = rng.below(n);
                    values[i] = match &values[i] {
                        MetaValue::String(_) => MetaValue::String(
                            rng.pick(&[
                                "",
                                "<0x41>",
                                "<0xZZ>",
                                "▁",
                                "<s>",
                                "\u{fffd}",
                                "▁▁▁▁▁▁▁▁",
                                "a\u{0}b",
                            ])
                            .to_string(),
                        ),
                        MetaValue::F32(_) => {
                            MetaValue::F32(*rng.pick(&[f32::NAN, f32::INFINITY, -f32::INFINITY, 1e30, -0.0]))
                        }
                        MetaValue::I32(_) => {
                            MetaValue::I32(*rng.pick(&[0, 1, 2, 3, 4, 5, 6, 7, -1, i32::MAX, i32::MIN]))
                        }
                        other => other.clone(),
                    };
                }
                2 if n > 0 => {
                    let i = rng.below(n);
                    let v = values[i].clone();
                    values.push(v);
                }
                _ => values.reverse(),
            }
            Some(MetaValue::Array { elem_type, values })
        }
        (_, Some(MetaValue::String(s))) => {
            let mut bytes = s.into_bytes();
            let at = rng.below(bytes.len() + 1);
            bytes.splice(
                at..at,
                rng.pick(&[b"{%".as_slice(), b"}}", b"\xe2\x96", b"{{ raise_exception('x') }}"])
                    .iter()
                    .copied(),
            );
            Some(MetaValue::String(String::from_utf8_lossy(&bytes).into_owned()))
        }
        (_, _) => Some(random_scalar(rng)),
    };
    let mut out = Metadata::new();
    for (k, v) in meta.iter() {
        if k != key {
            out.set(k, v.clone());
        }
    }
    if let Some(v) = new {
        out.set(key, v);
    }
    *meta = out;
}

fn random_scalar(rng: &mut Rng) -> MetaValue {
    match rng.below(7) {
        0 => MetaValue::U32(*rng.pick(&[0, 1, 2, 511, 512, u32::MAX])),
        1 => MetaValue::U64(*rng.pick(&[0, 1 << 32, u64::MAX])),
        2 => MetaValue::I32(-1),
        3 => MetaValue::Bool(rng.chance(0.5)),
        4 => MetaValue::F32(f32::NAN),
        5 => MetaValue::String(rng.pick(&["llama", "gpt2", "", "bert"]).to_string()),
        _ => MetaValue::Array {
            elem_type: mixtral_q::format::gguf::value_type::U8,
            values: vec![MetaValue::U8(1)],
        },
    }
}

// ---- the chat template (code from the model file) ----

const TEMPLATES: [&str; 4] = [
    // Llama-2 chat (with a system role).
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    // Zephyr.
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    // A namespace accumulating text, as tool-calling templates do.
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.system = ns.system + m.content %}{% endif %}{% endfor %}{{ ns.system|upper }}{% for m in messages|selectattr('role', 'ne', 'system') %}{{ m.get('role', 'user') ~ ': ' ~ m['content']|trim }}{% if not loop.last %}\n{% endif %}{% endfor %}",
    "{% macro render(m, depth) %}{% if depth < 3 %}{{ render(m, depth + 1) }}{% endif %}{{ m.content }}{% endmacro %}{% for m in messages %}{{ render(m, 0) }}{% endfor %}",
];

fn chat_template() -> Target {
    let mut seeds: Vec<Vec<u8>> = TEMPLATES.iter().map(|t| t.as_bytes().to_vec()).collect();
    for name in ChatTemplate::builtin_names() {
        seeds.push(ChatTemplate::builtin(name).unwrap().as_bytes().to_vec());
    }
    let dictionary: Vec<&'static [u8]> = vec![
        b"{% for x in range(100000) %}",
        b"{% endfor %}",
        b"{% if ",
        b"{% endif %}",
        b"{{ ",
        b" }}",
        b"loop.index",
        b"messages",
        b"|join",
        b"|length",
        b" * 100000",
        b" ~ ",
        b"namespace(",
        b"{% set ",
        b"{% macro m() %}{{ m() }}{% endmacro %}",
        b"raise_exception(",
        b".strip()",
        b".items()",
        b"[::-1]",
        b"range(",
        b"'x'",
        b"{%- ",
        b" -%}",
        b"{# ",
        b" #}",
    ];
    Target {
        name: "chat_template",
        seeds,
        mutate: Box::new(move |rng, input, seeds| mutate_bytes(rng, input, seeds, 0, &dictionary)),
        run: Box::new(|input| {
            let Ok(template) = ChatTemplate::from_source(&String::from_utf8_lossy(input)) else { return };
            let conversations = [
                vec![Message::new("user", "Hello")],
                vec![
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                    Message::new("assistant", "Hey"),
                    Message::new("user", "?"),
                ],
                vec![],
            ];
            for messages in &conversations {
                for add in [true, false] {
                    let _ = template.render(messages, add);
                }
                let _ = template.render(&template.conversation(Some("sys"), messages), true);
            }
        }),
    }
}

// ---- safetensors headers (and the tensors they describe) ----

fn safetensors() -> Target {
    use safetensors::tensor::{Dtype, TensorView};
    let f32s: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let halves: Vec<u8> = (0..8u16).flat_map(|i| (i * 1000).to_le_bytes()).collect();
    let views = [
        ("model.layers.0.w", TensorView::new(Dtype::F32, vec![3, 4], &f32s).unwrap()),
        ("b", TensorView::new(Dtype::BF16, vec![2, 2, 2], &halves).unwrap()),
        ("h", TensorView::new(Dtype::F16, vec![8], &halves).unwrap()),
        ("i", TensorView::new(Dtype::I64, vec![1], &f32s[..8]).unwrap()),
        ("empty", TensorView::new(Dtype::F32, vec![0, 5], &[]).unwrap()),
    ];
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let seed = safetensors::serialize(views, Some(meta)).unwrap();
    let real = std::fs::read(repo().join("models/tiny-mixtral/model-00002-of-00002.safetensors")).unwrap();
    let header_of = |b: &[u8]| 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let real_header = real[..header_of(&real)].to_vec();
    let focus = [header_of(&seed), real_header.len()];
    let dictionary: Vec<&'static [u8]> = vec![
        b"\"dtype\":\"F32\"",
        b"\"dtype\":\"BF16\"",
        b"\"shape\":[",
        b"\"data_offsets\":[",
        b"18446744073709551615",
        b"4294967296",
        b"-1",
        b"0",
        b"1e309",
        b"null",
        b"]",
        b"}",
        b",",
        b"\"__metadata__\"",
    ];
    let path = scratch("fuzz.safetensors");
    Target {
        name: "safetensors",
        seeds: vec![seed, real_header],
        mutate: Box::new(move |rng, input, seeds| {
            let focus = if input.len() == focus[1] { focus[1] } else { focus[0] };
            mutate_bytes(rng, input, seeds, focus, &dictionary)
        }),
        run: Box::new(move |input| {
            std::fs::write(&path, input).unwrap();
            let Ok(file) = SafetensorsFile::open(&path) else { return };
            for name in file.tensor_names() {
                let Ok(t) = file.tensor(&name) else { continue };
                let n = t.n_elements();
                if n > 1 << 20 {
                    continue;
                }
                let mut out = vec![0f32; n];
                let _ = t.to_f32(&mut out);
                let cols = t.shape.last().copied().unwrap_or(1);
                let mut row = vec![0f32; cols.min(1 << 20)];
                for r in [0, 1, n / cols.max(1), usize::MAX] {
                    let _ = t.row_to_f32(r, &mut row);
                }
                file.release(&name);
            }
        }),
    }
}

// ---- a checkpoint's config.json ----

fn hf_config() -> Target {
    let seed = std::fs::read(repo().join("models/tiny-mixtral/config.json")).unwrap();
    let dictionary: Vec<&'static [u8]> = vec![
        b"0",
        b"-1",
        b"1e400",
        b"4294967296",
        b"1048576",
        b"1048577",
        b"null",
        b"true",
        b"\"mixtral\"",
        b"3.5",
        b"[]",
        b"{}",
        b"\"num_hidden_layers\": ",
        b"\"head_dim\": ",
        b"\"num_local_experts\": ",
    ];
    Target {
        name: "hf_config",
        seeds: vec![seed],
        mutate: Box::new(move |rng, input, seeds| {
            // Half of the time a value of a key, so that sizes at and past every limit are tried.
            let parsed = serde_json::from_slice::<serde_json::Value>(input);
            match parsed {
                Ok(serde_json::Value::Object(mut map)) if !map.is_empty() && rng.chance(0.5) => {
                    let key = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
                    let n = *rng.pick(&[
                        0u64,
                        1,
                        2,
                        3,
                        8,
                        1023,
                        1024,
                        1025,
                        1 << 20,
                        (1 << 20) + 1,
                        1 << 32,
                        u64::MAX,
                    ]);
                    map.insert(key, serde_json::json!(n));
                    serde_json::to_vec(&map).unwrap_or_default()
                }
                _ => mutate_bytes(rng, input, seeds, 0, &dictionary),
            }
        }),
        run: Box::new(|input| {
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(input) else { return };
            let Ok(cfg) = ModelConfig::from_hf_config(&json) else { return };
            // What `quantize` derives from a config before it reads any tensor.
            let _ = cfg.gguf_tensors();
            let _ = cfg.n_params();
        }),
    }
}

// ---- model config and weight handles from metadata, and the forward pass over them ----

/// Metadata keys the model config is read from.
const MODEL_KEYS: [&str; 12] = [
    "llama.vocab_size",
    "llama.context_length",
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.expert_count",
    "llama.expert_used_count",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
];

/// A small Mixtral-shaped GGUF of random (but consistent) hyperparameters and tensor types; with
/// `lie`, one to three of its claims (metadata values, tensor shapes or types, names) are false.
fn small_model(rng: &mut Rng, lie: bool) -> Option<Vec<u8>> {
    let head_dim = *rng.pick(&[2usize, 4, 8, 16]);
    let n_kv_heads = 1 + rng.below(2);
    let n_heads = n_kv_heads * (1 + rng.below(2));
    let n_experts = 1 + rng.below(4);
    let cfg = ModelConfig {
        vocab_size: *rng.pick(&[8usize, 33, 64]),
        // 256-wide rows (K-quant blocks) now and then: they make a model ~30 times bigger.
        hidden_size: if rng.chance(0.1) { 256 } else { *rng.pick(&[32usize, 64]) },
        ffn_size: if rng.chance(0.1) { 256 } else { *rng.pick(&[32usize, 64, 96]) },
        n_layers: 1 + rng.below(2),
        n_heads,
        n_kv_heads,
        head_dim,
        n_experts,
        n_experts_used: 1 + rng.below(n_experts),
        context_length: *rng.pick(&[1usize, 4, 16, 64]),
        rope_theta: *rng.pick(&[1e4, 1e6, 0.0, -1.0, f32::NAN, f32::INFINITY]),
        rms_norm_eps: *rng.pick(&[1e-5, 0.0, -1.0, f32::NAN, 1e30]),
        // Mixtral layers: the loader refuses the other layer kinds before any tensor is read.
        ..ModelConfig::mixtral_8x7b(1)
    };
    let cfg = ModelConfig { dense_ffn_size: cfg.ffn_size, ..cfg };
    let mut meta = Metadata::new();
    cfg.to_gguf(&mut meta);
    let mut tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> = cfg
        .gguf_tensors()
        .into_iter()
        .map(|(name, dims)| {
            let fits: Vec<GgmlType> = SUPPORTED_TYPES
                .iter()
                .copied()
                .filter(|t| (dims[0] as usize).is_multiple_of(t.block_len()))
                .collect();
            let ty = if dims.len() == 1 || rng.chance(0.3) { GgmlType::F32 } else { *rng.pick(&fits) };
            let n: u64 = dims.iter().product();
            // Real values through the cheap codecs; random bytes (any scales, NaN included) otherwise.
            let cheap = matches!(
                ty,
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0
            );
            let data = if rng.chance(0.7) && cheap && codec::can_quantize(ty) {
                let values: Vec<f32> =
                    (0..n).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
                codec::quantize_to_vec(ty, &values).ok()?
            } else {
                let bytes = (n / ty.block_len() as u64 * ty.block_bytes() as u64) as usize;
                (0..bytes).map(|_| rng.next() as u8).collect()
            };
            Some((name, dims, ty, data))
        })
        .collect::<Option<_>>()?;
    if lie {
        for _ in 0..1 + rng.below(3) {
            match rng.below(6) {
                0 | 1 => {
                    let key = *rng.pick(&MODEL_KEYS);
                    let v = *rng.pick(&[
                        0u64,
                        1,
                        2,
                        3,
                        7,
                        16,
                        31,
                        32,
                        33,
                        64,
                        4096,
                        1 << 20,
                        1 << 21,
                        u32::MAX as u64,
                    ]);
                    meta.set(key, if rng.chance(0.8) { MetaValue::U32(v as u32) } else { MetaValue::U64(v) });
                }
                2 => {
                    let t = rng.below(tensors.len());
                    let dims = &mut tensors[t].1;
                    let d = rng.below(dims.len());
                    match rng.below(3) {
                        0 => dims[d] *= 2,
                        1 => dims.swap(0, d),
                        _ => dims.push(1 + rng.below(3) as u64),
                    }
                    let n: u64 = dims.iter().product();
                    let ty = tensors[t].2;
                    if !n.is_multiple_of(ty.block_len() as u64) {
                        tensors[t].2 = GgmlType::F32;
                    }
                    let ty = tensors[t].2;
                    let bytes = (n / ty.block_len() as u64 * ty.block_bytes() as u64) as usize;
                    tensors[t].3.resize(bytes, 0x3c);
                }
                3 => {
                    let t = rng.below(tensors.len());
                    let ty = *rng.pick(&[
                        GgmlType::F16,
                        GgmlType::BF16,
                        GgmlType::Q8_0,
                        GgmlType::Q4_K,
                        GgmlType::Q2_K,
                        GgmlType::Q8_1,
                    ]);
                    let n: u64 = tensors[t].1.iter().product();
                    if tensors[t].1[0].is_multiple_of(ty.block_len() as u64) {
                        tensors[t].2 = ty;
                        let bytes = (n / ty.block_len() as u64 * ty.block_bytes() as u64) as usize;
                        tensors[t].3.resize(bytes, 0xff);
                    }
                }
                4 => {
                    let t = rng.below(tensors.len());
                    tensors.remove(t);
                }
                _ => {
                    let t = rng.below(tensors.len());
                    tensors[t].0 = tensors[t].0.replace("_exps", ".0").replace("attn_q", "attn_k");
                }
            }
        }
    }
    gguf_bytes(meta, tensors)
}

fn model() -> Target {
    let mut rng = Rng::new(99);
    let seeds: Vec<Vec<u8>> = (0..8).filter_map(|_| small_model(&mut rng, false)).collect();
    let path = scratch("fuzz-model.gguf");
    Target {
        name: "model",
        seeds,
        mutate: Box::new(|rng, input, seeds| {
            if rng.chance(0.25) {
                let focus = header_len(input);
                return mutate_bytes(rng, input, seeds, focus, &[b"llama.", b"blk.1.", b"_exps"]);
            }
            let lie = rng.chance(0.8);
            small_model(rng, lie).unwrap_or_else(|| input.to_vec())
        }),
        run: Box::new(move |input| {
            std::fs::write(&path, input).unwrap();
            let Ok(model) = Model::load(&path) else { return };
            let cfg = model.config.clone();
            let ctx = cfg.context_length.min(16);
            let Ok(mut engine) = CpuEngine::new(&model, ctx) else { return };
            let vocab = cfg.vocab_size as u32;
            let n = ctx.min(3);
            let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 1) % vocab).collect();
            for all in [true, false] {
                engine.truncate(0);
                if let Ok(logits) = engine.forward(&tokens, all) {
                    let rows = if all { n } else { 1 };
                    assert_eq!(logits.len(), rows * cfg.vocab_size, "logits of {rows} tokens");
                    assert_eq!(engine.position(), n);
                }
            }
            assert!(engine.forward(&[vocab], false).is_err(), "an id outside the vocabulary was accepted");
            engine.truncate(0);
            assert!(
                engine.forward(&vec![0; ctx + 1], false).is_err(),
                "more tokens than the context were accepted"
            );
            if ctx > n {
                let _ = engine.forward(&[0], false);
            }
        }),
    }
}
