//! What every inference command shares: `-m`, `--threads`, `--ctx`, and the demo model used when no
//! `-m` is given (the bundled trained checkpoint models/rustdoc-mixtral, quantized on first use into
//! the cache folder).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
pub use mixtral_q::cache::cache_dir;
use mixtral_q::engine::hybrid::MissChoice;
use mixtral_q::engine::{self, parse_bytes, DeviceChoice, Engine, OpenOptions, RoutingReplay};
use mixtral_q::format::gguf::Metadata;
use mixtral_q::model::weights::Model;
use mixtral_q::model::ModelConfig;
use mixtral_q::placement;
use mixtral_q::quantize::{quantize_checkpoint, QuantizeOptions, Target};
use mixtral_q::routing::RoutingTrace;
use mixtral_q::text::{ChatTemplate, Tokenizer};

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file (ours or llama.cpp's). Without it, the bundled tiny demo model runs.
    #[arg(short = 'm', long = "model")]
    pub model: Option<PathBuf>,
    /// Worker threads (default: all cores). `bench` takes a comma list (`-t 1,2`).
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Where the forward pass runs: auto (a CUDA GPU when one is usable, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// GPU memory to use, e.g. 22G (default: free VRAM minus a reserve); experts that do not fit are
    /// streamed from host memory.
    #[arg(long, value_parser = parse_bytes)]
    pub vram_budget: Option<u64>,
    /// llama.cpp's -ngl: keep the weights of this many layers on the GPU (attention and KV cache are
    /// always there; the experts of later layers stream from host memory). 0 runs on the CPU.
    #[arg(long = "n-gpu-layers", visible_alias = "gpu-layers")]
    pub n_gpu_layers: Option<usize>,
    /// Where experts outside VRAM run: auto (as the cost model measured at start-up says: the CPU for
    /// a token or a few, copied to the GPU for prompts), copy, host.
    #[arg(long, value_enum, default_value = "auto")]
    pub misses: MissChoice,
    /// Replay the expert choices of a routing trace (`routing --json`, `generate --record-routing`)
    /// instead of the router's: for benchmarks on random weights, whose routing has no locality.
    #[arg(long, value_name = "FILE")]
    pub routing_trace: Option<PathBuf>,
    /// A routing trace of typical use: the experts it routes to most start in VRAM (default: every
    /// layer keeps a similar share, by expert index).
    #[arg(long, value_name = "FILE")]
    pub hot_experts: Option<PathBuf>,
}

/// `--chat-template NAME|JINJA` and `--chat-template-file FILE`, as in llama.cpp.
#[derive(clap::Args, Debug, Clone)]
pub struct TemplateArgs {
    /// Chat template to use instead of the model's: a built-in name (mistral, chatml) or Jinja source.
    #[arg(long, conflicts_with = "chat_template_file", allow_hyphen_values = true)]
    pub chat_template: Option<String>,
    /// Read the chat template (Jinja) from a file.
    #[arg(long)]
    pub chat_template_file: Option<PathBuf>,
}

impl TemplateArgs {
    /// The template for `meta`'s model: the one given on the command line, else the file's (an error
    /// when the file's does not parse), else Mixtral-Instruct's.
    pub fn template(&self, meta: &Metadata) -> Result<ChatTemplate> {
        let source = match (&self.chat_template, &self.chat_template_file) {
            (_, Some(path)) => Some(
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
            ),
            (Some(name), None) => match ChatTemplate::builtin(name) {
                Some(source) => Some(source.to_owned()),
                None if name.contains("{{") || name.contains("{%") => Some(name.clone()),
                None => bail!(
                    "--chat-template {name:?} is neither a built-in template ({}) nor Jinja source",
                    ChatTemplate::builtin_names().join(", ")
                ),
            },
            (None, None) => None,
        };
        ChatTemplate::for_model(meta, source.as_deref())
    }

    pub fn is_given(&self) -> bool {
        self.chat_template.is_some() || self.chat_template_file.is_some()
    }
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub ctx: usize,
    pub is_demo: bool,
    options: OpenOptions,
    /// `--routing-trace`: the recorded choices every engine replays.
    pub replay: Option<RoutingReplay>,
    /// Where the engine runs, once [`Loaded::engine`] made it.
    backend: OnceLock<String>,
}

impl Loaded {
    /// The engine on the chosen device (`engine::open`), printing what it says at load the first time
    /// (a server makes one engine per slot): a GPU's placement plan, or in one line why `auto` runs on
    /// the CPU.
    pub fn engine(&self) -> Result<Box<dyn Engine + Send + '_>> {
        let mut opened = engine::open(&self.model, self.ctx, &self.options)?;
        if let Some(replay) = &self.replay {
            opened.engine.set_routing_replay(Some(replay.clone()))?;
        }
        if self.backend.set(opened.backend).is_ok() {
            for notice in &opened.notices {
                eprintln!("{notice}");
            }
        }
        Ok(opened.engine)
    }

    /// The backend of the engines made, for reports: "CPU (avx512)" or the GPU's name.
    pub fn backend(&self) -> String {
        self.backend.get().cloned().unwrap_or_else(|| "?".into())
    }
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        match self.threads[..] {
            [] => {}
            [0] => bail!("--threads must be at least 1"),
            [n] => {
                // Errors only if a pool was already built: then that pool is used, which is fine.
                let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
            }
            _ => bail!("--threads takes one number here (a comma list is for `mixtral-q bench`)"),
        }
        let (path, is_demo) = match &self.model {
            Some(p) => (p.clone(), false),
            None => (demo_model()?, true),
        };
        check_gguf_path(&path)?;
        let model = Model::load(&path)?;
        let tokenizer = Tokenizer::from_gguf(&model.file.metadata, &path)
            .with_context(|| format!("no usable tokenizer in {}", path.display()))?;
        let ctx = match self.ctx {
            Some(0) => bail!("--ctx must be at least 1"),
            Some(c) => c,
            None if is_demo => DEMO_CONTEXT,
            None => model.config.context_length.min(4096),
        };
        let hot_experts = match &self.hot_experts {
            None => None,
            Some(path) => {
                let (cfg, t) = (&model.config, read_trace_for(path, &model.config)?);
                Some(placement::by_frequency(&t.experts, cfg.n_layers, cfg.n_experts))
            }
        };
        let options = OpenOptions {
            device: self.device,
            vram_budget: self.vram_budget,
            gpu_layers: self.n_gpu_layers,
            misses: self.misses,
            hot_experts,
        };
        let replay = match &self.routing_trace {
            None => None,
            Some(path) => {
                let trace = RoutingTrace::read(path)?;
                let replay = RoutingReplay::new(trace.experts, &model.config);
                Some(replay.with_context(|| format!("{} does not fit this model", path.display()))?)
            }
        };
        Ok(Loaded { model, tokenizer, ctx, is_demo, options, replay, backend: OnceLock::new() })
    }
}

/// A routing trace of a model shaped as `cfg` (its layers and experts), read from `path`.
pub fn read_trace_for(path: &Path, cfg: &ModelConfig) -> Result<RoutingTrace> {
    let t = RoutingTrace::read(path)?;
    ensure!(
        t.n_layers == cfg.n_layers && t.n_experts == cfg.n_experts,
        "{}: a trace of {} layers x {} experts, the model has {} x {}",
        path.display(),
        t.n_layers,
        t.n_experts,
        cfg.n_layers,
        cfg.n_experts
    );
    Ok(t)
}

/// Catches the usual mix-up before the GGUF reader does: a Hugging Face checkpoint (its directory or
/// one of its .safetensors files) given where a GGUF file is wanted.
pub fn check_gguf_path(path: &Path) -> Result<()> {
    let shown = path.display();
    if path.is_dir() {
        bail!(
            "{shown} is a directory, not a GGUF file; if it is a Hugging Face checkpoint, run \
             `mixtral-q quantize {shown} -o model.gguf` on it and use the GGUF"
        );
    }
    if path.extension().is_some_and(|e| e == "safetensors") || starts_like_safetensors(path) {
        bail!(
            "{shown} is a safetensors file, not a GGUF file; run `mixtral-q quantize` on the Hugging Face \
             checkpoint directory that holds it (`mixtral-q quantize DIR -o model.gguf`) and use the GGUF"
        );
    }
    Ok(())
}

/// A safetensors file starts with a little-endian u64 header length, then the JSON header's `{`.
fn starts_like_safetensors(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    read.is_ok() && &head[..4] != b"GGUF" && head[8] == b'{'
}

pub const DEMO_NOTICE: &str = "note: no -m given, running the bundled demo model: a tiny Mixtral (15 M \
parameters, 4 layers) trained for an hour on the Rust documentation. It writes English about Rust, but it knows \
little and makes things up. For real Mixtral, download mistralai/Mixtral-8x7B-Instruct-v0.1 (safetensors) and \
run `mixtral-q quantize <dir> -o mixtral.gguf`, or use any Mixtral GGUF with -m.";

/// The demo model's default context: the sequence length it was trained on. Past it, its text falls
/// apart (perplexity on valid.txt: 36.6 at `--ctx 256`, 64 at 512, 134 at 1024), so a chat keeps to it
/// by dropping old turns.
const DEMO_CONTEXT: usize = 256;

/// The folder name becomes the model's `general.name`; the cached file's name says what it holds.
const DEMO_NAME: &str = "rustdoc-mixtral";
const DEMO_GGUF: &str = "rustdoc-mixtral-q4_k.gguf";

/// The bundled checkpoint (bf16, 30 MB), embedded in the binary so that it runs from anywhere. It is
/// quantized on first use rather than shipped as a GGUF: the tests need the bf16 weights anyway (for
/// the f32 conversion that is checked against transformers), so the repository holds one copy of them.
const DEMO_FILES: [(&str, &[u8]); 6] = [
    ("config.json", include_bytes!("../../models/rustdoc-mixtral/config.json")),
    (
        "model.safetensors.index.json",
        include_bytes!("../../models/rustdoc-mixtral/model.safetensors.index.json"),
    ),
    (
        "model-00001-of-00002.safetensors",
        include_bytes!("../../models/rustdoc-mixtral/model-00001-of-00002.safetensors"),
    ),
    (
        "model-00002-of-00002.safetensors",
        include_bytes!("../../models/rustdoc-mixtral/model-00002-of-00002.safetensors"),
    ),
    ("tokenizer.json", include_bytes!("../../models/rustdoc-mixtral/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../models/rustdoc-mixtral/tokenizer_config.json")),
];

/// The demo model as a Q4_K GGUF in the cache folder, converted on first use.
pub fn demo_model() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let gguf = dir.join(DEMO_GGUF);
    if gguf.exists() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::tempdir_in(&dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    let src = tmp.path().join(DEMO_NAME);
    std::fs::create_dir(&src).with_context(|| format!("cannot create {}", src.display()))?;
    for (name, bytes) in DEMO_FILES {
        std::fs::write(src.join(name), bytes)
            .with_context(|| format!("cannot write {}", src.join(name).display()))?;
    }
    eprintln!("preparing the demo model in {} (first use)", gguf.display());
    quantize_checkpoint(&src, &gguf, &QuantizeOptions::new(Target::Q4K))?;
    Ok(gguf)
}
