//! The conversion itself: validate every source tensor, lay out the GGUF, convert (or copy) and
//! write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::permute;
use super::plan::{tensor_types, Target, TypeOverrides};
use super::source::{RowSource, SourceLayout};
use crate::format::codec;
use crate::format::gguf::{GgufFileWriter, GgufLayout, MetaValue, Metadata};
use crate::format::imatrix::ImportanceMatrix;
use crate::format::output::AtomicOutput;
use crate::format::safetensors::Checkpoint;
use crate::format::GgmlType;
use crate::model::names;
use crate::model::ModelConfig;

/// Options of one conversion.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub target: Target,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Measure and report every tensor's relative RMSE.
    pub verbose: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Set from a Ctrl-C handler: the conversion stops and removes its temporary file.
    pub cancel: Option<Arc<AtomicBool>>,
    /// An importance matrix (`--imatrix`): the tensors it has entries for are quantized minimizing
    /// the importance-weighted error. `path` names it in the output's metadata, as llama-quantize does.
    pub imatrix: Option<Arc<(PathBuf, ImportanceMatrix)>>,
    /// Convert tensors the source already stores quantized to another type (llama-quantize's
    /// `--allow-requantize`). Off, such a source is refused: its weights would be rounded twice.
    pub allow_requantize: bool,
    /// Types chosen per tensor over the mix's rules.
    pub overrides: TypeOverrides,
}

impl QuantizeOptions {
    pub fn new(target: Target) -> QuantizeOptions {
        QuantizeOptions {
            target,
            threads: None,
            verbose: false,
            progress: false,
            cancel: None,
            imatrix: None,
            allow_requantize: false,
            overrides: TypeOverrides::default(),
        }
    }
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct TensorReport {
    pub name: String,
    pub ty: GgmlType,
    pub n_elements: u64,
    /// ‖dequant(W) − W‖ / ‖W‖, when `verbose` was set (W: the source's values).
    pub rel_rmse: Option<f64>,
    /// The source stored every matrix of it in `ty` already: its bytes were copied unchanged.
    pub copied: bool,
}

#[derive(Clone, Debug)]
pub struct QuantizeReport {
    pub output: PathBuf,
    pub config: ModelConfig,
    pub tensors: Vec<TensorReport>,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
}

/// One GGUF tensor and where its values come from.
struct TensorJob {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    /// Source tensors in the order their rows are stacked (experts: one per expert).
    sources: Vec<String>,
    /// q and k rows are reordered for llama.cpp's RoPE: the rows per head.
    permute_head_dim: Option<usize>,
}

/// A converted source matrix on its way to the writer.
struct Piece {
    tensor: usize,
    offset: u64,
    bytes: Vec<u8>,
}

/// Converts a Hugging Face checkpoint directory to a GGUF file at `out`.
pub fn quantize_checkpoint(hf_dir: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let cfg = ModelConfig::from_hf_config_file(&hf_dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(hf_dir)?;
    let model_name = hf_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "mixtral".into());
    let mut meta = Metadata::new();
    meta.set("general.name", MetaValue::String(model_name));
    crate::text::tokenizer_metadata(hf_dir, &mut meta)?;
    write_gguf(&checkpoint, &cfg, new_model_metadata(&cfg, meta, opts.target), out, opts)
}

/// The metadata of a model written from scratch: `extra`'s `general.*` keys (the name), the model
/// keys of `cfg`, the file type of `target`, then the rest of `extra` (the tokenizer).
pub fn new_model_metadata(cfg: &ModelConfig, extra: Metadata, target: Target) -> Metadata {
    let mut meta = Metadata::new();
    meta.set("general.architecture", MetaValue::String("llama".into()));
    for (key, value) in extra.iter().filter(|(k, _)| k.starts_with("general.")) {
        meta.set(key, value.clone());
    }
    cfg.to_gguf(&mut meta);
    set_file_type(&mut meta, target);
    for (key, value) in extra.iter().filter(|(k, _)| !k.starts_with("general.")) {
        meta.set(key, value.clone());
    }
    meta
}

/// `general.file_type` and `general.quantization_version` for `target`, in place when `meta` has
/// them (as llama-quantize sets them in a file it requantizes).
pub fn set_file_type(meta: &mut Metadata, target: Target) {
    meta.set("general.file_type", MetaValue::U32(target.file_type()));
    // ggml's GGML_QNT_VERSION: the block formats of today's quantized types.
    meta.set("general.quantization_version", MetaValue::U32(2));
}

/// Writes a GGUF of `cfg`'s tensors converted from `source`, with the metadata `meta` (its file
/// type set for `opts.target`). Every source tensor is checked before the output is created.
pub fn write_gguf(
    source: &dyn RowSource,
    cfg: &ModelConfig,
    mut meta: Metadata,
    out: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    let start = Instant::now();
    let jobs = plan_jobs(cfg, opts, source.layout());
    check_sources(source, cfg, &jobs, opts).with_context(|| format!("in {}", source.origin()))?;
    let input_bytes = jobs.iter().flat_map(|j| &j.sources).map(|s| source.source_bytes(s)).sum();
    set_file_type(&mut meta, opts.target);
    if let Some(imatrix) = &opts.imatrix {
        let used = check_imatrix(&imatrix.1, &jobs)?;
        imatrix_metadata(&imatrix.0, &imatrix.1, used, &mut meta);
    }

    let layout =
        GgufLayout::new(meta, jobs.iter().map(|j| (j.name.clone(), j.dims.clone(), j.ty)).collect())?;
    let output_bytes = layout.total_size();
    let tmp = AtomicOutput::create(out)?;
    let writer = GgufFileWriter::new(tmp.file(), layout)
        .with_context(|| format!("cannot write {}", tmp.temp_path().display()))?;

    let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads.unwrap_or(0)).build()?;
    let bar = progress_bar(opts.progress, input_bytes, jobs.len());
    let tensors = pool
        .install(|| convert_all(source, &jobs, &writer, opts, &bar))
        .with_context(|| format!("cannot write {}", out.display()))?;
    bar.finish_and_clear();
    writer.finish().with_context(|| format!("cannot write {}", out.display()))?;
    tmp.commit()?;

    Ok(QuantizeReport {
        output: out.to_path_buf(),
        config: cfg.clone(),
        tensors,
        input_bytes,
        output_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Every GGUF tensor in llama.cpp's order, its type and its sources in `layout`.
fn plan_jobs(cfg: &ModelConfig, opts: &QuantizeOptions, layout: SourceLayout) -> Vec<TensorJob> {
    tensor_types(cfg, opts.target)
        .into_iter()
        .map(|(name, dims, ty)| {
            let ty = opts.overrides.apply(&name, dims[0] as usize, ty);
            let (sources, permute_head_dim) = match layout {
                SourceLayout::HuggingFace => hf_sources(cfg, &name),
                SourceLayout::Gguf => (gguf_sources(cfg, &name), None),
            };
            TensorJob { name, ty, dims, sources, permute_head_dim }
        })
        .collect()
}

/// The Hugging Face tensors GGUF tensor `name` is made of, and the head size its rows are permuted
/// by (q and k).
fn hf_sources(cfg: &ModelConfig, name: &str) -> (Vec<String>, Option<usize>) {
    let one = |hf: &str| (vec![hf.to_string()], None);
    match name {
        names::TOKEN_EMBD => one(names::HF_TOKEN_EMBD),
        names::OUTPUT => one(names::HF_OUTPUT),
        names::OUTPUT_NORM => one(names::HF_OUTPUT_NORM),
        _ => {
            let (layer, t) =
                names::split_layer_tensor(name).expect("gguf_tensors names only known layer tensors");
            let sources = if t.is_expert() {
                (0..cfg.n_experts).map(|e| t.hf_name(layer, e)).collect()
            } else {
                vec![t.hf_name(layer, 0)]
            };
            let permute =
                matches!(t, names::LayerTensor::AttnQ | names::LayerTensor::AttnK).then_some(cfg.head_dim);
            (sources, permute)
        }
    }
}

/// The GGUF source matrices of GGUF tensor `name`: itself, or one per expert by per-expert name.
fn gguf_sources(cfg: &ModelConfig, name: &str) -> Vec<String> {
    match names::split_layer_tensor(name) {
        Some((layer, t)) if t.is_expert() => {
            (0..cfg.n_experts).filter_map(|e| t.per_expert_gguf_name(layer, e)).collect()
        }
        _ => vec![name.to_string()],
    }
}

/// Checks, before any output is created, that every source tensor exists with the shape the
/// hyperparameters imply, and that none stored quantized would be requantized unasked.
fn check_sources(
    source: &dyn RowSource,
    cfg: &ModelConfig,
    jobs: &[TensorJob],
    opts: &QuantizeOptions,
) -> Result<()> {
    // (tensor, its first source stored quantized in another type, that type)
    let mut requantized = Vec::new();
    for job in jobs {
        let expected = source_shape(job);
        let mut first_requantized = None;
        for name in &job.sources {
            let shape = source.shape(name)?;
            if shape != expected {
                bail!(
                    "tensor {} has shape {shape:?}, but the hyperparameters ({} layers, hidden {}, FFN {}, {} heads, {} KV heads, {} experts) imply {expected:?}",
                    source.describe(name), cfg.n_layers, cfg.hidden_size, cfg.ffn_size, cfg.n_heads, cfg.n_kv_heads,
                    cfg.n_experts
                );
            }
            match source.stored(name) {
                Some((ty, _)) if ty.is_quantized() && ty != job.ty => {
                    first_requantized.get_or_insert((name, ty));
                }
                _ => {}
            }
        }
        if let Some((name, ty)) = first_requantized {
            requantized.push((job, source.describe(name), ty));
        }
    }
    if let Some((job, name, from)) = requantized.first().filter(|_| !opts.allow_requantize) {
        let count = match requantized.len() {
            1 => "1 tensor is".to_string(),
            n => format!("{n} tensors are"),
        };
        bail!(
            "{count} stored quantized already and would be requantized ({name} from {from} to {}), which \
             rounds their weights a second time and loses quality: pass --allow-requantize to do it anyway, \
             or quantize from an F32, F16 or BF16 file",
            job.ty
        );
    }
    Ok(())
}

/// Row-major shape of one source tensor of `job` (one expert's matrix for merged experts).
fn source_shape(job: &TensorJob) -> Vec<usize> {
    let dims: Vec<usize> = job.dims.iter().map(|&d| d as usize).collect();
    match dims.len() {
        1 => vec![dims[0]],
        _ => vec![dims[1], dims[0]],
    }
}

fn convert_all(
    source_rows: &dyn RowSource,
    jobs: &[TensorJob],
    writer: &GgufFileWriter<'_>,
    opts: &QuantizeOptions,
    bar: &ProgressBar,
) -> Result<Vec<TensorReport>> {
    // One writer thread, fed through a short queue: conversion of the next matrix overlaps the write of
    // the previous one, and at most a few converted matrices are in memory at once.
    let (send, receive) = crossbeam::channel::bounded::<Piece>(2);
    std::thread::scope(|scope| {
        let writing = scope.spawn(move || -> Result<()> {
            for piece in receive {
                writer.write_tensor_part(piece.tensor, piece.offset, &piece.bytes)?;
            }
            Ok(())
        });
        let converted = (|| -> Result<Vec<TensorReport>> {
            let mut reports = Vec::with_capacity(jobs.len());
            for (index, job) in jobs.iter().enumerate() {
                let mut err = ErrorSums::default();
                let mut offset = 0u64;
                let mut copied = true;
                for source in &job.sources {
                    if opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                        bail!("interrupted");
                    }
                    let (bytes, sums) = match stored_in(source_rows, source, job) {
                        // Already in the target type: copied, so that its values are not rounded again.
                        Some(bytes) => (bytes.to_vec(), ErrorSums::default()),
                        None => {
                            copied = false;
                            let importance = match &opts.imatrix {
                                Some(m) => m.1.importance(
                                    &job.name,
                                    matrix_index(job, source),
                                    job.sources.len(),
                                    cols_of(job),
                                )?,
                                None => None,
                            };
                            convert_matrix(source_rows, source, job, importance.as_deref(), opts.verbose)
                                .with_context(|| {
                                    format!(
                                        "converting tensor {} to {}",
                                        source_rows.describe(source),
                                        job.ty
                                    )
                                })?
                        }
                    };
                    source_rows.done_with(source);
                    err.add(sums);
                    let len = bytes.len() as u64;
                    if send.send(Piece { tensor: index, offset, bytes }).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                    offset += len;
                    bar.inc(source_rows.source_bytes(source));
                }
                bar.set_message(format!("{}/{} tensors", index + 1, jobs.len()));
                reports.push(TensorReport {
                    name: job.name.clone(),
                    ty: job.ty,
                    n_elements: job.dims.iter().product(),
                    rel_rmse: opts.verbose.then(|| err.relative_rmse()),
                    copied,
                });
            }
            Ok(reports)
        })();
        drop(send);
        let written = writing.join().unwrap_or_else(|_| bail!("the writer thread panicked"));
        // A write error (say, a full disk) explains a conversion that stopped early: report it first.
        written?;
        converted
    })
}

/// The bytes of source matrix `name` when the source stores them in `job`'s type and row order.
fn stored_in<'s>(source_rows: &'s dyn RowSource, name: &str, job: &TensorJob) -> Option<&'s [u8]> {
    match source_rows.stored(name) {
        Some((ty, bytes)) if ty == job.ty && job.permute_head_dim.is_none() => Some(bytes),
        _ => None,
    }
}

/// Sums for the relative RMSE of a tensor.
#[derive(Default, Clone, Copy)]
struct ErrorSums {
    err2: f64,
    ref2: f64,
}

impl ErrorSums {
    fn add(&mut self, o: ErrorSums) {
        self.err2 += o.err2;
        self.ref2 += o.ref2;
    }

    fn relative_rmse(&self) -> f64 {
        if self.ref2 > 0.0 {
            (self.err2 / self.ref2).sqrt()
        } else {
            self.err2.sqrt()
        }
    }
}

/// Converts one source matrix (or vector) to the job's type, rows in parallel; with `importance` (one
/// weight per column), minimizing the importance-weighted error.
fn convert_matrix(
    source_rows: &dyn RowSource,
    name: &str,
    job: &TensorJob,
    importance: Option<&[f32]>,
    measure: bool,
) -> Result<(Vec<u8>, ErrorSums)> {
    let shape = source_shape(job);
    let cols = *shape.last().unwrap_or(&1);
    let rows = shape.iter().product::<usize>() / cols.max(1);
    let row_bytes = job.ty.bytes_for(cols).context("row length is not a whole number of blocks")?;
    let mut out = vec![0u8; rows * row_bytes];
    // Enough rows per task to amortise scheduling, few enough to keep every core busy.
    let rows_per_chunk = (65536 / cols.max(1)).clamp(1, 256);
    let sums = out
        .par_chunks_mut(rows_per_chunk * row_bytes)
        .enumerate()
        .map(|(chunk, dst)| -> Result<ErrorSums> {
            let first = chunk * rows_per_chunk;
            let n = dst.len() / row_bytes;
            let mut values = vec![0f32; n * cols];
            for (i, row) in values.chunks_mut(cols).enumerate() {
                let src = match job.permute_head_dim {
                    Some(hd) => permute::source_row(first + i, hd),
                    None => first + i,
                };
                source_rows.read_row(name, src, row)?;
            }
            match importance {
                Some(w) => codec::quantize_weighted(job.ty, &values, w, dst)?,
                None => codec::quantize(job.ty, &values, dst)?,
            }
            let mut sums = ErrorSums::default();
            if measure {
                let back = codec::dequantize_to_vec(job.ty, dst, values.len())?;
                for (a, b) in values.iter().zip(&back) {
                    sums.err2 += ((a - b) as f64).powi(2);
                    sums.ref2 += (*a as f64).powi(2);
                }
            }
            Ok(sums)
        })
        .try_reduce(ErrorSums::default, |mut a, b| {
            a.add(b);
            Ok(a)
        })?;
    Ok((out, sums))
}

/// Which matrix of its tensor `source` is (the expert index of a merged expert tensor, else 0).
fn matrix_index(job: &TensorJob, source: &str) -> usize {
    job.sources.iter().position(|s| s == source).unwrap_or(0)
}

/// The row length of `job`'s matrices.
fn cols_of(job: &TensorJob) -> usize {
    job.dims.first().map_or(1, |&d| d as usize)
}

/// Checks, before any output exists, that every entry of `imatrix` for one of `jobs` has that
/// tensor's shape and that some tensor has one; returns how many tensors use it.
fn check_imatrix(imatrix: &ImportanceMatrix, jobs: &[TensorJob]) -> Result<usize> {
    let mut used = 0;
    for job in jobs.iter().filter(|j| j.dims.len() > 1) {
        if imatrix.importance(&job.name, 0, job.sources.len(), cols_of(job))?.is_some() {
            used += 1;
        }
    }
    if used == 0 {
        bail!("the importance matrix has no entry for any tensor of this model (is it another model's?)");
    }
    Ok(used)
}

/// llama-quantize's record of the importance matrix used.
fn imatrix_metadata(path: &Path, imatrix: &ImportanceMatrix, used: usize, meta: &mut Metadata) {
    meta.set("quantize.imatrix.file", MetaValue::String(path.display().to_string()));
    if let Some(dataset) = imatrix.datasets.last() {
        meta.set("quantize.imatrix.dataset", MetaValue::String(dataset.clone()));
    }
    meta.set("quantize.imatrix.entries_count", MetaValue::I32(used as i32));
    meta.set("quantize.imatrix.chunks_count", MetaValue::I32(imatrix.chunk_count as i32));
}

fn progress_bar(show: bool, total_bytes: u64, n_tensors: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("0/{n_tensors} tensors"));
    bar
}
