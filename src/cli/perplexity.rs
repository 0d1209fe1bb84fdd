//! `mixtral-q perplexity -m M -f FILE [--ctx 512]`, scored as llama.cpp's `llama-perplexity` scores, so
//! that the numbers compare with the ones people publish: the text (BOS first) is cut into windows of
//! `--ctx` tokens, each window's first token is replaced by BOS, and only the second half of each
//! window is scored (every scored token has at least ctx/2 tokens of context). The final estimate
//! comes with its ± (the standard error of the mean log-likelihood, scaled to perplexity).
//! `--all-tokens` scores every token instead (windows of BOS + ctx-1 tokens), which is what
//! transformers' perplexity over a window computes.
//!
//! `--kl-divergence-base FILE` saves the log-probabilities of every scored position (from a base
//! model, typically the f16 or f32 file); `--kl-divergence --kl-divergence-base FILE` then scores
//! another model (a quantization of it) over the same windows and reports the KL divergence from the
//! base, as llama-perplexity's options of the same names do. The file format is our own (see
//! `BaseFile`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use mixtral_q::format::output::AtomicOutput;

use super::load::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Score every token of each window (BOS + ctx-1 tokens of text) instead of llama-perplexity's
    /// second half of each window of ctx tokens.
    #[arg(long)]
    pub all_tokens: bool,
    /// Score at most this many windows (llama-perplexity's --chunks).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Save the log-probabilities of every scored position to this file; with --kl-divergence, read
    /// them instead and compare.
    #[arg(long)]
    pub kl_divergence_base: Option<PathBuf>,
    /// Report the KL divergence from the base model's log-probabilities (--kl-divergence-base FILE).
    #[arg(long, requires = "kl_divergence_base")]
    pub kl_divergence: bool,
    #[arg(long)]
    pub json: bool,
}

/// One window: the tokens run through the model, and the first logit row scored (row j predicts
/// token j + 1; rows `first .. len - 1` are scored).
pub(super) struct Window {
    pub tokens: Vec<u32>,
    pub first: usize,
}

/// The windows of `tokens` (the text's, BOS first) for a context of `ctx`.
pub(super) fn windows(
    tokens: &[u32],
    bos: u32,
    ctx: usize,
    all_tokens: bool,
    chunks: Option<usize>,
) -> Result<Vec<Window>> {
    let mut out: Vec<Window> = if all_tokens {
        let text = tokens.strip_prefix(&[bos]).unwrap_or(tokens);
        ensure!(!text.is_empty(), "the file holds no text to score");
        text.chunks(ctx - 1).map(|chunk| Window { tokens: [&[bos], chunk].concat(), first: 0 }).collect()
    } else {
        ensure!(
            tokens.len() >= 2 * ctx,
            "scoring like llama-perplexity needs at least 2 × ctx = {} tokens, and the file has {}: lower --ctx \
             (or use --all-tokens)",
            2 * ctx,
            tokens.len()
        );
        tokens
            .chunks_exact(ctx)
            .map(|chunk| {
                let mut w = chunk.to_vec();
                w[0] = bos;
                Window { tokens: w, first: ctx / 2 }
            })
            .collect()
    };
    if let Some(n) = chunks {
        ensure!(n > 0, "--chunks must be at least 1");
        out.truncate(n);
    }
    Ok(out)
}

/// Running sums of a quantity over the scored tokens: its mean and the standard error of the mean.
#[derive(Default)]
struct Mean {
    n: usize,
    sum: f64,
    sum2: f64,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum2 += x * x;
    }

    fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }

    /// As llama-perplexity computes it: sqrt((E[x²] − E[x]²) / (n − 1)).
    fn error(&self) -> f64 {
        let m = self.mean();
        let var = self.sum2 / self.n.max(1) as f64 - m * m;
        if var > 0.0 && self.n > 1 {
            (var / (self.n - 1) as f64).sqrt()
        } else {
            0.0
        }
    }
}

pub fn run(args: &PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    if loaded.ctx < 2 {
        bail!("--ctx must be at least 2 for perplexity");
    }
    let tokens = tok.encode(&text, true)?;
    if tokens.len() < 2 {
        bail!("{} holds no text to score", args.file.display());
    }
    let windows = windows(&tokens, tok.bos_id(), loaded.ctx, args.all_tokens, args.chunks)
        .with_context(|| format!("in {}", args.file.display()))?;
    let mut engine = loaded.engine()?;
    let vocab = engine.config().vocab_size;

    // Saving base log-probabilities, or comparing against them.
    let mut save = match (&args.kl_divergence_base, args.kl_divergence) {
        (Some(path), false) => Some(BaseWriter::create(path, vocab, windows.len())?),
        _ => None,
    };
    let mut base = match (&args.kl_divergence_base, args.kl_divergence) {
        (Some(path), true) => Some(BaseReader::open(path, vocab, windows.len())?),
        _ => None,
    };
    let mut kld = KlStats::default();

    let start = Instant::now();
    let mut nll = Mean::default();
    let mut processed = 0;
    let mut log_probs = vec![0f32; vocab];
    for (i, window) in windows.iter().enumerate() {
        engine.truncate(0);
        let logits = engine.forward(&window.tokens, true)?;
        processed += window.tokens.len();
        if let Some(w) = &mut save {
            w.window(window)?;
        }
        if let Some(r) = &mut base {
            r.window(window).with_context(|| format!("window {}", i + 1))?;
        }
        for j in window.first..window.tokens.len() - 1 {
            log_softmax(&logits[j * vocab..(j + 1) * vocab], &mut log_probs);
            let target = window.tokens[j + 1] as usize;
            nll.add(-log_probs[target] as f64);
            if let Some(w) = &mut save {
                w.row(&log_probs)?;
            }
            if let Some(r) = &mut base {
                kld.add(&r.row()?, &log_probs, target);
            }
        }
        if !args.json {
            eprint!("{}[{}]{:.4}", if i == 0 { "" } else { "," }, i + 1, nll.mean().exp());
        }
    }
    if let Some(w) = save {
        w.finish()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ppl = nll.mean().exp();
    let ppl_error = nll.error() * ppl;
    let how = if args.all_tokens { "every token" } else { "second half of each window" };
    if args.json {
        let mut json = serde_json::json!({
            "perplexity": ppl, "perplexity_error": ppl_error, "tokens_scored": nll.n, "windows": windows.len(),
            "ctx": loaded.ctx, "scored": if args.all_tokens { "all" } else { "second_half" },
            "seconds": secs, "tokens_per_second": processed as f64 / secs.max(1e-9),
        });
        if base.is_some() {
            json["kl_divergence"] = kld.json();
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        eprintln!();
        println!(
            "Final estimate: PPL = {ppl:.4} +/- {ppl_error:.5} ({} tokens in {} windows of {}, {how}; {:.1} tokens/s)",
            nll.n,
            windows.len(),
            loaded.ctx,
            processed as f64 / secs.max(1e-9)
        );
        if base.is_some() {
            kld.print();
        }
        if let (Some(path), false) = (&args.kl_divergence_base, args.kl_divergence) {
            println!("saved the log-probabilities of {} positions to {}", nll.n, path.display());
        }
    }
    Ok(())
}

/// `out` = log softmax(`logits`), in f64 internally.
pub(super) fn log_softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_sum = logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    for (o, &v) in out.iter_mut().zip(logits) {
        *o = (v as f64 - log_sum) as f32;
    }
}

/// KL divergence and token-probability statistics against the base model, as llama-perplexity
/// reports them.
#[derive(Default)]
struct KlStats {
    kld: Mean,
    klds: Vec<f64>,
    base_nll: Mean,
    /// ln(p_ours / p_base) of the correct token.
    log_ratio: Mean,
    /// p_ours − p_base of the correct token.
    delta_p: Mean,
    same_top: Mean,
}

impl KlStats {
    fn add(&mut self, base: &[f32], ours: &[f32], target: usize) {
        let kld: f64 = base
            .iter()
            .zip(ours)
            .map(|(&b, &q)| (b as f64).exp() * (b as f64 - q as f64))
            .sum::<f64>()
            .max(0.0);
        self.kld.add(kld);
        self.klds.push(kld);
        self.base_nll.add(-base[target] as f64);
        self.log_ratio.add(ours[target] as f64 - base[target] as f64);
        self.delta_p.add((ours[target] as f64).exp() - (base[target] as f64).exp());
        self.same_top.add((argmax(base) == argmax(ours)) as u8 as f64);
    }

    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.klds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0)
    }

    fn base_ppl(&self) -> (f64, f64) {
        let ppl = self.base_nll.mean().exp();
        (ppl, self.base_nll.error() * ppl)
    }

    /// llama-perplexity's error of a proportion: sqrt(p (1 − p) / (n − 1)).
    fn same_top_error(&self) -> f64 {
        let p = self.same_top.mean();
        (p * (1.0 - p) / (self.same_top.n.max(2) - 1) as f64).sqrt()
    }

    fn json(&self) -> serde_json::Value {
        let (base_ppl, base_ppl_error) = self.base_ppl();
        serde_json::json!({
            "mean": self.kld.mean(), "error": self.kld.error(), "max": self.quantile(1.0),
            "p99_9": self.quantile(0.999), "p99": self.quantile(0.99), "median": self.quantile(0.5),
            "base_perplexity": base_ppl, "base_perplexity_error": base_ppl_error,
            "mean_ln_ppl_ratio": -self.log_ratio.mean(), "mean_ln_ppl_ratio_error": self.log_ratio.error(),
            "mean_delta_p": self.delta_p.mean(),
            "rms_delta_p": (self.delta_p.sum2 / self.delta_p.n.max(1) as f64).sqrt(),
            "same_top_p": self.same_top.mean(), "same_top_p_error": self.same_top_error(),
        })
    }

    fn print(&self) {
        let (base_ppl, base_ppl_error) = self.base_ppl();
        println!("Mean PPL(base)           : {base_ppl:.6} ± {base_ppl_error:.6}");
        println!("Mean ln(PPL(Q)/PPL(base)): {:.6} ± {:.6}", -self.log_ratio.mean(), self.log_ratio.error());
        println!("Mean    KLD: {:.6} ± {:.6}", self.kld.mean(), self.kld.error());
        println!("Maximum KLD: {:.6}", self.quantile(1.0));
        println!("99.9%   KLD: {:.6}", self.quantile(0.999));
        println!("99.0%   KLD: {:.6}", self.quantile(0.99));
        println!("Median  KLD: {:.6}", self.quantile(0.5));
        println!("Mean    Δp: {:.3} ± {:.3} %", 100.0 * self.delta_p.mean(), 100.0 * self.delta_p.error());
        println!("RMS Δp    : {:.3} %", 100.0 * (self.delta_p.sum2 / self.delta_p.n.max(1) as f64).sqrt());
        println!("Same top p: {:.3} ± {:.3} %", 100.0 * self.same_top.mean(), 100.0 * self.same_top_error());
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// The base log-probabilities file: the magic, the vocabulary size (u32) and the window count (u32),
/// then per window its token count (u32), first scored row (u32) and tokens (u32 each), followed by
/// the log-probabilities (f32 × vocabulary) of each of its scored rows. Little-endian.
const BASE_MAGIC: &[u8; 8] = b"MQKLDIV1";

struct BaseWriter {
    out: BufWriter<File>,
    file: AtomicOutput,
}

impl BaseWriter {
    fn create(path: &std::path::Path, vocab: usize, windows: usize) -> Result<BaseWriter> {
        let file = AtomicOutput::create(path)?;
        let mut out = BufWriter::new(file.file().try_clone().context("cannot write the base file")?);
        out.write_all(BASE_MAGIC)?;
        out.write_all(&(vocab as u32).to_le_bytes())?;
        out.write_all(&(windows as u32).to_le_bytes())?;
        Ok(BaseWriter { out, file })
    }

    fn window(&mut self, w: &Window) -> Result<()> {
        self.out.write_all(&(w.tokens.len() as u32).to_le_bytes())?;
        self.out.write_all(&(w.first as u32).to_le_bytes())?;
        self.out.write_all(bytemuck::cast_slice(&w.tokens))?;
        Ok(())
    }

    fn row(&mut self, log_probs: &[f32]) -> Result<()> {
        self.out.write_all(bytemuck::cast_slice(log_probs)).context("cannot write the base file")
    }

    fn finish(mut self) -> Result<()> {
        self.out.flush().context("cannot write the base file")?;
        drop(self.out);
        self.file.commit()
    }
}

struct BaseReader {
    input: BufReader<File>,
    path: PathBuf,
    vocab: usize,
}

impl BaseReader {
    fn open(path: &std::path::Path, vocab: usize, windows: usize) -> Result<BaseReader> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut r = BaseReader { input: BufReader::new(file), path: path.to_path_buf(), vocab };
        let mut magic = [0u8; 8];
        r.input.read_exact(&mut magic).ok();
        ensure!(
            &magic == BASE_MAGIC,
            "{} is not a file of base log-probabilities (written by perplexity --kl-divergence-base)",
            path.display()
        );
        let (base_vocab, base_windows) = (r.u32()? as usize, r.u32()? as usize);
        ensure!(
            base_vocab == vocab,
            "{}: the base model has {base_vocab} tokens, this one {vocab}",
            path.display()
        );
        ensure!(
            base_windows >= windows,
            "{} holds {base_windows} windows, fewer than the {windows} scored now (same file, --ctx and --chunks?)",
            path.display()
        );
        Ok(r)
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.input.read_exact(&mut b).with_context(|| format!("{} is truncated", self.path.display()))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads the next window's header and checks that it is `w`.
    fn window(&mut self, w: &Window) -> Result<()> {
        let (len, first) = (self.u32()? as usize, self.u32()? as usize);
        ensure!(len <= 1 << 24, "{} is corrupt", self.path.display());
        let tokens = (0..len).map(|_| self.u32()).collect::<Result<Vec<_>>>()?;
        ensure!(
            tokens == w.tokens && first == w.first,
            "{} was computed over other tokens (use the same text file, tokenizer, --ctx, --chunks and \
             --all-tokens as for the base)",
            self.path.display()
        );
        Ok(())
    }

    fn row(&mut self) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; self.vocab * 4];
        self.input.read_exact(&mut bytes).with_context(|| format!("{} is truncated", self.path.display()))?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}
