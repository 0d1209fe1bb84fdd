//! The conversion itself: validate every source tensor, lay out the GGUF, convert and write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::permute;
use super::plan::{tensor_types, Target, TensorRole};
use crate::format::codec;
use crate::format::gguf::{GgufFileWriter, GgufLayout, MetaValue, Metadata};
use crate::format::imatrix::ImportanceMatrix;
use crate::format::output::AtomicOutput;
use crate::format::safetensors::Checkpoint;
use crate::format::GgmlType;
use crate::model::names::{self, LayerTensor};
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
        }
    }
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct TensorReport {
    pub name: String,
    pub ty: GgmlType,
    pub n_elements: u64,
    /// ‖dequant(W) − W‖ / ‖W‖, when `verbose` was set.
    pub rel_rmse: Option<f64>,
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

/// Where the values of the source tensors (Hugging Face names) come from: a checkpoint, or `synth`'s
/// random generator.
pub trait RowSource: Sync {
    /// Fills `out` with row `row` of the source tensor `name` (a 1-D tensor is one row).
    fn read_row(&self, name: &str, row: usize, out: &mut [f32]) -> Result<()>;
    /// Bytes the tensor takes in the source (for the progress bar and the throughput).
    fn source_bytes(&self, name: &str) -> u64;
    /// Called once a source tensor is converted: its memory may be released.
    fn done_with(&self, _name: &str) {}
}

impl RowSource for Checkpoint {
    fn read_row(&self, name: &str, row: usize, out: &mut [f32]) -> Result<()> {
        self.tensor(name)?.row_to_f32(row, out)
    }

    fn source_bytes(&self, name: &str) -> u64 {
        self.tensor(name).map(|t| t.data.len() as u64).unwrap_or(0)
    }

    fn done_with(&self, name: &str) {
        self.release(name);
    }
}

/// Converts a Hugging Face checkpoint directory to a GGUF file at `out`.
pub fn quantize_checkpoint(hf_dir: &Path, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let cfg = ModelConfig::from_hf_config_file(&hf_dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(hf_dir)?;
    validate_sources(&checkpoint, &cfg, &plan_jobs(&cfg, opts.target))?;
    let model_name = hf_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "mixtral".into());
    let mut meta = Metadata::new();
    meta.set("general.name", MetaValue::String(model_name));
    crate::text::tokenizer_metadata(hf_dir, &mut meta)?;
    write_gguf(&checkpoint, &cfg, meta, out, opts)
}

/// Writes a GGUF of `cfg`'s tensors, converted from `source`, with `extra` metadata (tokenizer, name)
/// after the model keys.
pub fn write_gguf(
    source: &dyn RowSource,
    cfg: &ModelConfig,
    extra: Metadata,
    out: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    let start = Instant::now();
    let jobs = plan_jobs(cfg, opts.target);
    let input_bytes = jobs.iter().flat_map(|j| &j.sources).map(|s| source.source_bytes(s)).sum();
    let mut meta = Metadata::new();
    meta.set("general.architecture", MetaValue::String("llama".into()));
    for (key, value) in extra.iter().filter(|(k, _)| k.starts_with("general.")) {
        meta.set(key, value.clone());
    }
    cfg.to_gguf(&mut meta);
    meta.set("general.file_type", MetaValue::U32(opts.target.file_type()));
    meta.set("general.quantization_version", MetaValue::U32(2));
    if let Some(imatrix) = &opts.imatrix {
        let used = check_imatrix(&imatrix.1, &jobs)?;
        imatrix_metadata(&imatrix.0, &imatrix.1, used, &mut meta);
    }
    for (key, value) in extra.iter().filter(|(k, _)| !k.starts_with("general.")) {
        meta.set(key, value.clone());
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

/// Every GGUF tensor in llama.cpp's order, its type and its sources.
fn plan_jobs(cfg: &ModelConfig, target: Target) -> Vec<TensorJob> {
    tensor_types(cfg, target)
        .into_iter()
        .map(|(name, dims, ty)| {
            let role = TensorRole::of(&name);
            let (sources, permute_head_dim) = match role {
                TensorRole::TokenEmbd => (vec![names::HF_TOKEN_EMBD.to_string()], None),
                TensorRole::Output => (vec![names::HF_OUTPUT.to_string()], None),
                TensorRole::Norm if name == names::OUTPUT_NORM => {
                    (vec![names::HF_OUTPUT_NORM.to_string()], None)
                }
                TensorRole::Norm | TensorRole::Layer(..) => {
                    let layer: usize = name.split('.').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    let t = LayerTensor::ALL
                        .into_iter()
                        .find(|t| t.gguf_name(layer) == name)
                        .expect("gguf_tensors names only known layer tensors");
                    let sources = if t.is_expert() {
                        (0..cfg.n_experts).map(|e| t.hf_name(layer, e)).collect()
                    } else {
                        vec![t.hf_name(layer, 0)]
                    };
                    let permute =
                        matches!(t, LayerTensor::AttnQ | LayerTensor::AttnK).then_some(cfg.head_dim);
                    (sources, permute)
                }
            };
            TensorJob { name, ty, dims, sources, permute_head_dim }
        })
        .collect()
}

/// Checks that every source tensor exists with the shape config.json implies, before any output is
/// created.
fn validate_sources(checkpoint: &Checkpoint, cfg: &ModelConfig, jobs: &[TensorJob]) -> Result<()> {
    for job in jobs {
        let expected = source_shape(job);
        for source in &job.sources {
            let t = checkpoint.tensor(source)?;
            if t.shape != expected {
                bail!(
                    "tensor {source} has shape {:?}, but config.json ({} layers, hidden {}, FFN {}, {} heads, {} KV heads) implies {:?}",
                    t.shape, cfg.n_layers, cfg.hidden_size, cfg.ffn_size, cfg.n_heads, cfg.n_kv_heads, expected
                );
            }
        }
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
                for source in &job.sources {
                    if opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                        bail!("interrupted");
                    }
                    let importance = match &opts.imatrix {
                        Some(m) => m.1.importance(
                            &job.name,
                            matrix_index(job, source),
                            job.sources.len(),
                            cols_of(job),
                        )?,
                        None => None,
                    };
                    let (bytes, sums) =
                        convert_matrix(source_rows, source, job, importance.as_deref(), opts.verbose)
                            .with_context(|| format!("converting tensor {source} to {}", job.ty))?;
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
