//! `mixtral-q info FILE.gguf`: what a GGUF file holds, without loading its weights.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use mixtral_q::engine::DEFAULT_MAX_BATCH;
use mixtral_q::format::gguf::{GgufFile, MetaValue, TensorInfo};
use mixtral_q::format::{FileType, GgmlType};
use mixtral_q::model::weights::ModelWeights;
use mixtral_q::model::ModelConfig;
use mixtral_q::placement::fit::{preset_fits, CardFit, DEFAULT_RESERVE_MIB};
use mixtral_q::placement::ModelSizes;
use serde::Serialize;

use super::{human_count, plural};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// The GGUF file to describe.
    pub file: PathBuf,
    /// List every tensor (name, type, shape).
    #[arg(long)]
    pub tensors: bool,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InfoArgs) -> Result<()> {
    super::load::check_gguf_path(&args.file)?;
    let file = GgufFile::open(&args.file)?;
    let report = Report::new(&file, args.tensors);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        report.write_text(&mut out)?;
    }
    Ok(())
}

/// The model in a few rows, as ollama's `/show info` lists it (for the chat REPL).
pub fn summary(model: &mixtral_q::model::weights::Model, ctx: usize) -> Vec<(String, String)> {
    let c = &model.config;
    let meta = &model.file.metadata;
    let file_type = meta.get_u64("general.file_type");
    let quantization = file_type
        .and_then(FileType::from_id)
        .map(|f| f.name.to_string())
        .or(file_type.map(|f| f.to_string()));
    let rows = [
        ("name", meta.get_str("general.name").unwrap_or("(none)").to_string()),
        ("architecture", format!("{} (Mixtral)", meta.get_str("general.architecture").unwrap_or("?"))),
        ("parameters", human_count(c.n_params())),
        ("layers", c.n_layers.to_string()),
        ("experts", format!("{} ({} per token)", c.n_experts, c.n_experts_used)),
        ("embedding length", c.hidden_size.to_string()),
        ("heads", format!("{} ({})", plural(c.n_heads, "query head"), plural(c.n_kv_heads, "KV head"))),
        ("context length", format!("{} (this chat: {ctx})", c.context_length)),
        ("vocabulary", c.vocab_size.to_string()),
        ("quantization", quantization.unwrap_or_else(|| "(not set)".into())),
        ("file", format!("{} ({})", model.file.path.display(), human_bytes(model.file.file_size()))),
    ];
    rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Arrays longer than this, and strings longer than `MAX_STRING`, are summarised.
const MAX_ARRAY: usize = 8;
const MAX_STRING: usize = 120;

#[derive(Serialize)]
struct Report {
    file: String,
    gguf_version: u32,
    size_bytes: u64,
    architecture: Option<String>,
    name: Option<String>,
    /// `None` when the metadata does not describe a Mixtral model (`config_error` says why).
    hyperparameters: Option<Hyperparameters>,
    config_error: Option<String>,
    experts: Experts,
    tensor_types: Vec<TypeRow>,
    total_parameters: u64,
    tensor_bytes: u64,
    bits_per_weight: f64,
    tokenizer: Tokenizer,
    file_type: Option<u64>,
    file_type_name: Option<&'static str>,
    /// The mix's `llama-quantize` name ("Q3_K_M").
    mix: Option<&'static str>,
    metadata: Vec<MetaRow>,
    /// Which preset cards hold the whole model on the GPU, and up to what context; `None` when the
    /// file is not a Mixtral the engine loads.
    gpu_fit: Option<GpuFit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<TensorRow>>,
}

#[derive(Serialize)]
struct GpuFit {
    /// The model's context length: no card is credited with more.
    context_length: usize,
    cards: Vec<CardFit>,
}

impl GpuFit {
    /// The placement plan's arithmetic (`plan -m FILE`) on every preset's card, with the buffers
    /// the CUDA engine allocates.
    fn of(file: &GgufFile, cfg: &ModelConfig) -> Option<GpuFit> {
        if !cfg.is_mixtral() {
            return None;
        }
        let weights = ModelWeights::from_gguf(file, cfg).ok()?;
        let scratch = mixtral_q::engine::cuda::activation_bytes(cfg, DEFAULT_MAX_BATCH);
        let sizes = ModelSizes::of(&weights, cfg, 1, scratch);
        Some(GpuFit { context_length: cfg.context_length, cards: preset_fits(&sizes, cfg) })
    }

    fn write_text(&self, w: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            w,
            "GPU fit:         longest context with every weight in VRAM (f16 KV cache and buffers included, \
             as plan counts), on the whole card / with {DEFAULT_RESERVE_MIB} MiB kept free (the default budget):"
        )?;
        let tokens = |ctx: Option<usize>| ctx.map_or("no".to_string(), |c| c.to_string());
        for card in &self.cards {
            let line = match (card.whole_card, card.default_budget) {
                (None, None) => "does not fit".to_string(),
                (whole, default) => {
                    let all = if default == Some(self.context_length) {
                        " (the model's whole context)"
                    } else {
                        ""
                    };
                    format!("{} / {} tokens{all}", tokens(whole), tokens(default))
                }
            };
            writeln!(w, "  {:<15} {:>3} GiB: {line}", card.preset, card.vram >> 30)?;
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Hyperparameters {
    vocab_size: usize,
    hidden_size: usize,
    ffn_size: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    n_experts: usize,
    n_experts_used: usize,
    context_length: usize,
    rope_theta: f32,
    rms_norm_eps: f32,
}

impl From<ModelConfig> for Hyperparameters {
    fn from(c: ModelConfig) -> Self {
        Hyperparameters {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            ffn_size: c.ffn_size,
            n_layers: c.n_layers,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            n_experts: c.n_experts,
            n_experts_used: c.n_experts_used,
            context_length: c.context_length,
            rope_theta: c.rope_theta,
            rms_norm_eps: c.rms_norm_eps,
        }
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct Experts {
    /// "merged" (`blk.N.ffn_gate_exps.weight`), "per-expert" (`blk.N.ffn_gate.E.weight`) or "none".
    layout: &'static str,
    layers: usize,
    experts_per_layer: usize,
    /// Types of the expert tensors (llama.cpp gives all experts of a layer one type).
    types: Vec<String>,
    bytes: u64,
}

#[derive(Serialize)]
struct TypeRow {
    #[serde(rename = "type")]
    ty: String,
    tensors: usize,
    parameters: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct Tokenizer {
    model: Option<String>,
    vocab_size: Option<usize>,
    bos_token_id: Option<u64>,
    eos_token_id: Option<u64>,
    has_huggingface_json: bool,
    has_chat_template: bool,
}

#[derive(Serialize)]
struct MetaRow {
    key: String,
    /// Scalars and short arrays as JSON values; long arrays and strings as a summary string.
    value: serde_json::Value,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    /// Row-major.
    shape: Vec<usize>,
    bytes: u64,
}

impl Report {
    fn new(file: &GgufFile, list_tensors: bool) -> Report {
        let meta = &file.metadata;
        let (hyperparameters, config_error, gpu_fit) = match ModelConfig::from_gguf(meta) {
            Ok(c) => (Some(c.clone().into()), None, GpuFit::of(file, &c)),
            Err(e) => (None, Some(format!("{e:#}")), None),
        };
        let total_parameters: u64 = file.tensors.iter().map(TensorInfo::n_elements).sum();
        let tensor_bytes: u64 = file.tensors.iter().map(TensorInfo::n_bytes).sum();
        let bits_per_weight =
            if total_parameters == 0 { 0.0 } else { tensor_bytes as f64 * 8.0 / total_parameters as f64 };
        let file_type = meta.get_u64("general.file_type");
        Report {
            file: file.path.display().to_string(),
            gguf_version: file.version,
            size_bytes: file.file_size(),
            architecture: meta.get_str("general.architecture").map(str::to_string),
            name: meta.get_str("general.name").map(str::to_string),
            hyperparameters,
            config_error,
            experts: Experts::of(&file.tensors),
            tensor_types: type_histogram(&file.tensors),
            total_parameters,
            tensor_bytes,
            bits_per_weight,
            tokenizer: Tokenizer {
                model: meta.get_str("tokenizer.ggml.model").map(str::to_string),
                vocab_size: meta.get_array("tokenizer.ggml.tokens").map(<[MetaValue]>::len),
                bos_token_id: meta.get_u64("tokenizer.ggml.bos_token_id"),
                eos_token_id: meta.get_u64("tokenizer.ggml.eos_token_id"),
                has_huggingface_json: meta.get("tokenizer.huggingface.json").is_some(),
                has_chat_template: meta.get("tokenizer.chat_template").is_some(),
            },
            file_type,
            file_type_name: file_type.and_then(FileType::from_id).map(|f| f.name),
            mix: file_type.and_then(FileType::from_id).map(|f| f.mix()),
            metadata: meta.iter().map(|(k, v)| MetaRow { key: k.to_string(), value: summarise(v) }).collect(),
            gpu_fit,
            tensors: list_tensors.then(|| {
                file.tensors
                    .iter()
                    .map(|t| TensorRow {
                        name: t.name.clone(),
                        ty: t.ty.to_string(),
                        shape: t.shape(),
                        bytes: t.n_bytes(),
                    })
                    .collect()
            }),
        }
    }

    fn write_text(&self, w: &mut impl Write) -> std::io::Result<()> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        writeln!(w, "file:            {}", self.file)?;
        writeln!(w, "GGUF version:    {}", self.gguf_version)?;
        writeln!(w, "size:            {} ({} bytes)", human_bytes(self.size_bytes), self.size_bytes)?;
        writeln!(w, "architecture:    {}", opt(&self.architecture))?;
        if let Some(name) = &self.name {
            writeln!(w, "name:            {name}")?;
        }
        match (&self.hyperparameters, &self.config_error) {
            (Some(h), _) => {
                writeln!(
                    w,
                    "hyperparameters: {}, hidden {}, FFN {}, {} / {} × {}, \
                     {} ({} used), vocab {}, context {}, rope theta {}, rms eps {:e}",
                    plural(h.n_layers, "layer"),
                    h.hidden_size,
                    h.ffn_size,
                    plural(h.n_heads, "head"),
                    plural(h.n_kv_heads, "KV head"),
                    h.head_dim,
                    plural(h.n_experts, "expert"),
                    h.n_experts_used,
                    h.vocab_size,
                    h.context_length,
                    h.rope_theta,
                    h.rms_norm_eps
                )?;
            }
            (None, error) => writeln!(w, "hyperparameters: not a Mixtral model: {}", opt(error))?,
        }
        let e = &self.experts;
        if e.layout == "none" {
            writeln!(w, "experts:         none")?;
        } else {
            writeln!(
                w,
                "experts:         {} layout, {} per layer in {}, types {}, {}",
                e.layout,
                e.experts_per_layer,
                plural(e.layers, "layer"),
                e.types.join("/"),
                human_bytes(e.bytes)
            )?;
        }
        writeln!(w, "tensor types:")?;
        for t in &self.tensor_types {
            writeln!(
                w,
                "  {:<6} {:>13} {:>16} params {:>11}",
                t.ty,
                plural(t.tensors, "tensor"),
                t.parameters,
                human_bytes(t.bytes)
            )?;
        }
        writeln!(
            w,
            "parameters:      {} ({}), {} in tensors, {:.2} bits per weight",
            self.total_parameters,
            human_count(self.total_parameters),
            human_bytes(self.tensor_bytes),
            self.bits_per_weight
        )?;
        let t = &self.tokenizer;
        let id = |v: Option<u64>| v.map_or("(none)".to_string(), |v| v.to_string());
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        writeln!(
            w,
            "tokenizer:       {}, {} tokens, bos {}, eos {}, tokenizer.huggingface.json {}, chat template {}",
            opt(&t.model),
            t.vocab_size.map_or("(unknown)".to_string(), |v| v.to_string()),
            id(t.bos_token_id),
            id(t.eos_token_id),
            yes_no(t.has_huggingface_json),
            yes_no(t.has_chat_template)
        )?;
        if let Some(fit) = &self.gpu_fit {
            fit.write_text(w)?;
        }
        match (self.file_type, self.file_type_name) {
            (Some(ft), Some(name)) => {
                writeln!(w, "file type:       {ft} ({name}, mix {})", self.mix.unwrap_or("?"))?
            }
            (Some(ft), None) => writeln!(w, "file type:       {ft}")?,
            (None, _) => writeln!(w, "file type:       (not set)")?,
        }
        writeln!(w, "metadata ({} keys):", self.metadata.len())?;
        for m in &self.metadata {
            let value = match &m.value {
                // Escaped so that a value with newlines (a chat template) stays on its line.
                serde_json::Value::String(s) => s.escape_debug().to_string(),
                v => v.to_string(),
            };
            writeln!(w, "  {} = {value}", m.key)?;
        }
        if let Some(tensors) = &self.tensors {
            writeln!(w, "tensors ({}):", tensors.len())?;
            for t in tensors {
                writeln!(w, "  {:<36} {:<6} {:?}", t.name, t.ty, t.shape)?;
            }
        }
        Ok(())
    }
}

impl Experts {
    fn of(tensors: &[TensorInfo]) -> Experts {
        let mut merged_layers = BTreeSet::new();
        let mut per_expert: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut merged_experts = 0;
        let mut types = BTreeSet::new();
        let mut bytes = 0;
        for t in tensors {
            let Some((layer, rest)) = t.name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
                continue;
            };
            let Ok(layer) = layer.parse::<usize>() else { continue };
            let merged = ["ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"];
            let expert = ["ffn_gate.", "ffn_up.", "ffn_down."]
                .iter()
                .find_map(|p| rest.strip_prefix(p)?.strip_suffix(".weight")?.parse::<usize>().ok());
            if merged.contains(&rest) {
                merged_layers.insert(layer);
                merged_experts = merged_experts.max(t.dims.get(2).copied().unwrap_or(1) as usize);
            } else if let Some(e) = expert {
                per_expert.entry(layer).or_default().insert(e);
            } else {
                continue;
            }
            types.insert(t.ty);
            bytes += t.n_bytes();
        }
        let (layout, layers, experts_per_layer) = if !merged_layers.is_empty() {
            ("merged", merged_layers.len(), merged_experts)
        } else if !per_expert.is_empty() {
            let most = per_expert.values().map(BTreeSet::len).max().unwrap_or(0);
            ("per-expert", per_expert.len(), most)
        } else {
            ("none", 0, 0)
        };
        Experts {
            layout,
            layers,
            experts_per_layer,
            types: types.iter().map(GgmlType::to_string).collect(),
            bytes,
        }
    }
}

/// Tensor count, parameters and bytes per type, largest first.
fn type_histogram(tensors: &[TensorInfo]) -> Vec<TypeRow> {
    let mut by_type: BTreeMap<GgmlType, (usize, u64, u64)> = BTreeMap::new();
    for t in tensors {
        let row = by_type.entry(t.ty).or_default();
        row.0 += 1;
        row.1 += t.n_elements();
        row.2 += t.n_bytes();
    }
    let mut rows: Vec<TypeRow> = by_type
        .into_iter()
        .map(|(ty, (tensors, parameters, bytes))| TypeRow { ty: ty.to_string(), tensors, parameters, bytes })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.bytes));
    rows
}

/// A metadata value as JSON, with long strings and arrays replaced by a one-line summary.
fn summarise(v: &MetaValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        MetaValue::String(s) if s.chars().count() > MAX_STRING => {
            J::String(format!("<string of {} bytes>", s.len()))
        }
        MetaValue::String(s) => J::String(s.clone()),
        MetaValue::Bool(b) => J::Bool(*b),
        MetaValue::F32(f) => serde_json::json!(f),
        MetaValue::F64(f) => serde_json::json!(f),
        MetaValue::Array { values, .. } if values.len() <= MAX_ARRAY => {
            J::Array(values.iter().map(summarise).collect())
        }
        MetaValue::Array { elem_type, values } => {
            let name = values.first().map_or_else(|| format!("type {elem_type}"), value_type_name);
            J::String(format!("<array of {} {name}>", values.len()))
        }
        int => int.as_i64().map_or_else(|| serde_json::json!(int.as_u64()), |i| serde_json::json!(i)),
    }
}

fn value_type_name(v: &MetaValue) -> String {
    match v {
        MetaValue::U8(_) => "u8",
        MetaValue::I8(_) => "i8",
        MetaValue::U16(_) => "u16",
        MetaValue::I16(_) => "i16",
        MetaValue::U32(_) => "u32",
        MetaValue::I32(_) => "i32",
        MetaValue::U64(_) => "u64",
        MetaValue::I64(_) => "i64",
        MetaValue::F32(_) => "f32",
        MetaValue::F64(_) => "f64",
        MetaValue::Bool(_) => "bool",
        MetaValue::String(_) => "string",
        MetaValue::Array { .. } => "array",
    }
    .to_string()
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixtral_q::format::gguf::{GgufFileWriter, GgufLayout, Metadata};

    /// A tiny Mixtral-shaped GGUF (all F32, zero weights), merged or per-expert.
    fn tiny_gguf(dir: &std::path::Path, per_expert: bool) -> GgufFile {
        let cfg = ModelConfig { vocab_size: 64, ..ModelConfig::mixtral_8x7b(2) };
        let cfg =
            ModelConfig { hidden_size: 64, ffn_size: 96, n_heads: 4, n_kv_heads: 2, head_dim: 16, ..cfg };
        let mut meta = Metadata::new();
        cfg.to_gguf(&mut meta);
        meta.set("general.file_type", MetaValue::U32(0));
        meta.set("tokenizer.ggml.model", MetaValue::String("llama".into()));
        meta.set("tokenizer.ggml.tokens", MetaValue::string_array((0..64).map(|i| format!("t{i}"))));
        meta.set("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
        meta.set("tokenizer.chat_template", MetaValue::String("x".repeat(500)));
        let mut tensors = Vec::new();
        for (name, dims) in cfg.gguf_tensors() {
            match name.strip_suffix("_exps.weight") {
                Some(base) if per_expert => {
                    for e in 0..cfg.n_experts {
                        tensors.push((format!("{base}.{e}.weight"), dims[..2].to_vec(), GgmlType::F32));
                    }
                }
                _ => tensors.push((name, dims, GgmlType::F32)),
            }
        }
        let layout = GgufLayout::new(meta, tensors).unwrap();
        let path = dir.join(if per_expert { "per.gguf" } else { "merged.gguf" });
        let file = std::fs::File::create(&path).unwrap();
        let sizes: Vec<u64> = layout.tensors().iter().map(TensorInfo::n_bytes).collect();
        let writer = GgufFileWriter::new(&file, layout).unwrap();
        for (i, n) in sizes.into_iter().enumerate() {
            writer.write_tensor(i, &vec![0; n as usize]).unwrap();
        }
        writer.finish().unwrap();
        GgufFile::open(&path).unwrap()
    }

    #[test]
    fn reports_both_expert_layouts_and_summarises_long_values() {
        let dir = tempfile::tempdir().unwrap();
        for per_expert in [false, true] {
            let f = tiny_gguf(dir.path(), per_expert);
            let r = Report::new(&f, true);
            let expected_layout = if per_expert { "per-expert" } else { "merged" };
            let expert_bytes = 2 * 8 * 3 * 64 * 96 * 4;
            assert_eq!(
                r.experts,
                Experts {
                    layout: expected_layout,
                    layers: 2,
                    experts_per_layer: 8,
                    types: vec!["f32".into()],
                    bytes: expert_bytes
                }
            );
            let h = r.hyperparameters.as_ref().unwrap();
            assert_eq!((h.n_layers, h.n_experts, h.hidden_size), (2, 8, 64));
            assert_eq!(r.total_parameters, f.tensors.iter().map(|t| t.n_elements()).sum::<u64>());
            assert!((r.bits_per_weight - 32.0).abs() < 1e-9);
            assert_eq!(r.tokenizer.vocab_size, Some(64));
            assert!(r.tokenizer.has_chat_template && !r.tokenizer.has_huggingface_json);
            assert_eq!(r.file_type_name, Some("ALL_F32"));
            assert_eq!(r.mix, Some("F32"));
            assert_eq!(r.tensors.as_ref().unwrap().len(), f.tensors.len());

            let mut text = Vec::new();
            r.write_text(&mut text).unwrap();
            let text = String::from_utf8(text).unwrap();
            assert!(
                text.contains("<array of 64 string>") && text.contains("<string of 500 bytes>"),
                "{text}"
            );
            assert!(!text.contains("t63") && !text.contains("xxxxxxxxxx"), "long values were dumped");
            // A model this small fits every preset card with its whole context.
            let fit = r.gpu_fit.as_ref().unwrap();
            assert_eq!(fit.cards.len(), mixtral_q::placement::predict::PRESETS.len());
            assert!(fit.cards.iter().all(|c| c.default_budget == Some(32768)), "{:?}", fit.cards);
            assert!(text.contains("GPU fit:") && text.contains("rtx4060ti-16g"), "{text}");
            let json: serde_json::Value = serde_json::to_value(&r).unwrap();
            assert_eq!(json["experts"]["layout"], expected_layout);
            assert_eq!(json["tensor_types"][0]["type"], "f32");
        }
    }

    #[test]
    fn a_non_mixtral_file_still_gets_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dense.gguf");
        let layout = GgufLayout::new(Metadata::new(), vec![("w".into(), vec![32], GgmlType::Q8_0)]).unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let writer = GgufFileWriter::new(&file, layout).unwrap();
        writer.write_tensor(0, &[0; 34]).unwrap();
        writer.finish().unwrap();
        let r = Report::new(&GgufFile::open(&path).unwrap(), false);
        assert!(r.hyperparameters.is_none() && r.gpu_fit.is_none());
        assert!(r.config_error.as_ref().unwrap().contains("general.architecture"));
        assert_eq!(r.experts.layout, "none");
        assert!((r.bits_per_weight - 8.5).abs() < 1e-9);
        let mut text = Vec::new();
        r.write_text(&mut text).unwrap();
        assert!(String::from_utf8(text).unwrap().contains("not a Mixtral model"));
    }
}
