//! `mixtral-q synth`: random-weight Mixtral models of any shape (by default the real Mixtral-8x7B
//! widths), as a Hugging Face checkpoint directory (to feed `quantize`) or directly as a GGUF (to feed
//! the engine benchmarks). Weights are deterministic for a seed: N(0, 1/cols) matrices, norms near 1.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::format::gguf::Metadata;
use crate::format::output::{write_atomic, AtomicOutput};
use crate::model::names::{self, LayerTensor};
use crate::model::ModelConfig;
use crate::quantize::{
    new_model_metadata, write_gguf, QuantizeOptions, QuantizeReport, RowSource, SourceLayout,
};

/// The fixture's tokenizer: its structure (normalizer, byte fallback, decoder) is Mistral's, and `synth`
/// grows its vocabulary with more merges to reach the requested size.
const BASE_TOKENIZER: &str = include_str!("../models/tiny-mixtral/tokenizer.json");
const BASE_TOKENIZER_CONFIG: &str = include_str!("../models/tiny-mixtral/tokenizer_config.json");

/// Deterministic random weights, addressed by Hugging Face tensor name and row.
pub struct RandomWeights {
    cfg: ModelConfig,
    seed: u64,
}

impl RandomWeights {
    pub fn new(cfg: ModelConfig, seed: u64) -> RandomWeights {
        RandomWeights { cfg, seed }
    }

    /// Row-major shape of a Hugging Face tensor of this model.
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let c = &self.cfg;
        if name == names::HF_TOKEN_EMBD || name == names::HF_OUTPUT {
            return Ok(vec![c.vocab_size, c.hidden_size]);
        }
        if name == names::HF_OUTPUT_NORM {
            return Ok(vec![c.hidden_size]);
        }
        let layer: usize =
            name.split('.').nth(2).and_then(|s| s.parse().ok()).context("not a layer tensor")?;
        for t in LayerTensor::ALL {
            let experts = if t.is_expert() { c.n_experts } else { 1 };
            if (0..experts).any(|e| t.hf_name(layer, e) == name) {
                return Ok(c.layer_tensor_shape(t));
            }
        }
        bail!("no tensor {name} in this model")
    }

    /// Every Hugging Face tensor name in checkpoint order.
    fn tensor_names(&self) -> Vec<String> {
        let c = &self.cfg;
        let mut out = vec![names::HF_TOKEN_EMBD.to_string()];
        for layer in 0..c.n_layers {
            for t in LayerTensor::ALL {
                let experts = if t.is_expert() { c.n_experts } else { 1 };
                out.extend((0..experts).map(|e| t.hf_name(layer, e)));
            }
        }
        out.push(names::HF_OUTPUT_NORM.to_string());
        out.push(names::HF_OUTPUT.to_string());
        out
    }
}

impl RowSource for RandomWeights {
    fn layout(&self) -> SourceLayout {
        SourceLayout::HuggingFace
    }

    fn origin(&self) -> String {
        "synth's random weights".into()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        RandomWeights::shape(self, name)
    }

    fn read_row(&self, name: &str, row: usize, out: &mut [f32]) -> Result<()> {
        let shape = self.shape(name)?;
        let cols = *shape.last().unwrap_or(&1);
        if out.len() != cols {
            bail!("row of {name} has {cols} values, not {}", out.len());
        }
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ fnv1a(name) ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if shape.len() == 1 {
            out.iter_mut().for_each(|v| *v = 1.0 + 0.1 * normal(&mut rng));
        } else {
            let std = 1.0 / (cols as f32).sqrt();
            out.iter_mut().for_each(|v| *v = std * normal(&mut rng));
        }
        Ok(())
    }

    fn source_bytes(&self, name: &str) -> u64 {
        self.shape(name).map(|s| s.iter().product::<usize>() as u64 * 4).unwrap_or(0)
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// A Mistral-style tokenizer.json with `vocab_size` tokens: the fixture's 512-token BPE grown with
/// merges of existing tokens (deterministic for the seed).
pub fn tokenizer_json(vocab_size: usize, seed: u64) -> Result<String> {
    let mut json: serde_json::Value = serde_json::from_str(BASE_TOKENIZER)?;
    let model = json.get_mut("model").context("tokenizer.json without a model")?;
    let vocab =
        model.get("vocab").and_then(|v| v.as_object()).context("tokenizer.json without a vocab")?.clone();
    if vocab_size < vocab.len() {
        bail!("synth needs a vocabulary of at least {} tokens (got {vocab_size})", vocab.len());
    }
    let mut tokens: Vec<String> = vec![String::new(); vocab.len()];
    for (piece, id) in &vocab {
        tokens[id.as_u64().context("bad vocab id")? as usize] = piece.clone();
    }
    let mergeable: Vec<usize> =
        (0..tokens.len()).filter(|&i| !tokens[i].starts_with('<') && !tokens[i].is_empty()).collect();
    let mut known: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let mut pieces: Vec<String> = mergeable.iter().map(|&i| tokens[i].clone()).collect();
    let mut merges = model.get("merges").and_then(|m| m.as_array()).cloned().unwrap_or_default();
    let mut rng = StdRng::seed_from_u64(seed);
    while tokens.len() < vocab_size {
        let a = pieces[rng.random_range(0..pieces.len())].clone();
        let b = pieces[rng.random_range(0..pieces.len())].clone();
        let joined = format!("{a}{b}");
        if joined.chars().count() > 12 || !known.insert(joined.clone()) {
            continue;
        }
        merges.push(serde_json::json!([a, b]));
        pieces.push(joined.clone());
        tokens.push(joined);
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    model["vocab"] = serde_json::Value::Object(vocab);
    model["merges"] = serde_json::Value::Array(merges);
    Ok(serde_json::to_string(&json)?)
}

/// The `config.json` of a Hugging Face Mixtral checkpoint with `cfg`'s shapes.
pub fn hf_config_json(cfg: &ModelConfig, dtype: &str) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "max_position_embeddings": cfg.context_length,
        "num_attention_heads": cfg.n_heads,
        "num_experts_per_tok": cfg.n_experts_used,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_local_experts": cfg.n_experts,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "torch_dtype": dtype,
        "vocab_size": cfg.vocab_size,
    })
}

/// Element type of the safetensors `synth --hf` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HfDtype {
    Bf16,
    F16,
    F32,
}

impl HfDtype {
    fn safetensors_name(self) -> &'static str {
        match self {
            HfDtype::Bf16 => "BF16",
            HfDtype::F16 => "F16",
            HfDtype::F32 => "F32",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            HfDtype::Bf16 => "bfloat16",
            HfDtype::F16 => "float16",
            HfDtype::F32 => "float32",
        }
    }

    fn size(self) -> usize {
        match self {
            HfDtype::Bf16 | HfDtype::F16 => 2,
            HfDtype::F32 => 4,
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        for &v in values {
            match self {
                HfDtype::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                HfDtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                HfDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            }
        }
    }
}

/// Writes a Hugging Face checkpoint directory: config.json, tokenizer files, safetensors shards of at
/// most `shard_bytes` each and model.safetensors.index.json.
pub fn write_hf_checkpoint(
    dir: &Path,
    weights: &RandomWeights,
    dtype: HfDtype,
    shard_bytes: u64,
    seed: u64,
) -> Result<()> {
    let cfg = &weights.cfg;
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        bail!("{} exists and is not a directory (--hf writes a checkpoint directory)", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: &str| write_atomic(&dir.join(name), text.as_bytes());
    write("config.json", &serde_json::to_string_pretty(&hf_config_json(cfg, dtype.torch_name()))?)?;
    write("tokenizer.json", &tokenizer_json(cfg.vocab_size, seed)?)?;
    write("tokenizer_config.json", BASE_TOKENIZER_CONFIG)?;

    // Group tensors into shards by size.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut current = 0u64;
    for name in weights.tensor_names() {
        let shape = weights.shape(&name)?;
        let bytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        if current > 0 && current + bytes > shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        current += bytes;
        shards.last_mut().expect("at least one shard").push((name, shape));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, tensors) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        total += write_safetensors(&dir.join(&file_name), tensors, weights, dtype)?;
        for (name, _) in tensors {
            weight_map.insert(name.clone(), serde_json::json!(file_name));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write("model.safetensors.index.json", &serde_json::to_string_pretty(&index)?)
}

/// One safetensors file, streamed tensor by tensor (rows generated in parallel). Returns data bytes.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    weights: &RandomWeights,
    dtype: HfDtype,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_string(&header)?.into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let context = || format!("cannot write {}", path.display());
    let file = AtomicOutput::create(path)?;
    let mut out = BufWriter::new(file.file());
    out.write_all(&(header.len() as u64).to_le_bytes()).with_context(context)?;
    out.write_all(&header).with_context(context)?;
    for (name, shape) in tensors {
        let cols = *shape.last().unwrap_or(&1);
        let rows = shape.iter().product::<usize>() / cols;
        let bytes: Vec<Vec<u8>> = (0..rows)
            .into_par_iter()
            .map(|r| -> Result<Vec<u8>> {
                let mut row = vec![0f32; cols];
                weights.read_row(name, r, &mut row)?;
                let mut encoded = Vec::with_capacity(cols * dtype.size());
                dtype.encode(&row, &mut encoded);
                Ok(encoded)
            })
            .collect::<Result<_>>()?;
        for b in bytes {
            out.write_all(&b).with_context(context)?;
        }
    }
    out.flush().with_context(context)?;
    drop(out);
    file.commit()?;
    Ok(offset as u64)
}

/// Writes a random-weight GGUF directly (no Hugging Face checkpoint in between).
pub fn write_random_gguf(
    out: &Path,
    weights: &RandomWeights,
    opts: &QuantizeOptions,
    seed: u64,
) -> Result<QuantizeReport> {
    // The tokenizer keys come from the same code path as `quantize`'s, over a throwaway directory.
    let tok_dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    std::fs::write(tok_dir.path().join("tokenizer.json"), tokenizer_json(weights.cfg.vocab_size, seed)?)?;
    std::fs::write(tok_dir.path().join("tokenizer_config.json"), BASE_TOKENIZER_CONFIG)?;
    let mut meta = Metadata::new();
    meta.set("general.name", crate::format::gguf::MetaValue::String("mixtral-synth".into()));
    crate::text::tokenizer_metadata(tok_dir.path(), &mut meta)?;
    write_gguf(weights, &weights.cfg, new_model_metadata(&weights.cfg, meta, opts.target), out, opts)
}
