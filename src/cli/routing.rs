//! `mixtral-q routing [-m M] -f TEXT [--svg OUT.svg] [--html OUT.html] [--json] [--layer L,...]`: the
//! Mixtral paper's routing analysis (§5) of a text on a model. The work is in `mixtral_q::routing`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mixtral_q::format::output::write_atomic;
use mixtral_q::routing::{self, Report};

use super::load::{ModelArgs, DEMO_NOTICE};

#[derive(clap::Args, Debug)]
pub struct RoutingArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to route (tokenized as a prompt; longer than --ctx: consecutive windows). Runs on the CPU.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Write the figure: expert shares per layer as heatmaps, repetition rates per layer against chance.
    #[arg(long, value_name = "OUT.svg")]
    pub svg: Option<PathBuf>,
    /// Write a self-contained page: the figure, the repetition table and the text coloured by expert.
    #[arg(long, value_name = "OUT.html")]
    pub html: Option<PathBuf>,
    /// Print every number and the raw trace as one JSON document (a routing trace that replays read)
    /// instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Layers whose text is shown coloured by first-choice expert (default: first, middle and last).
    #[arg(long, value_delimiter = ',')]
    pub layer: Vec<usize>,
}

pub fn run(args: &RoutingArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    if text.trim().is_empty() {
        bail!("{} holds no text to route", args.file.display());
    }
    let loaded = args.model.load()?;
    if loaded.is_demo && !args.json {
        eprintln!("{DEMO_NOTICE}");
    }
    let trace = routing::trace_text(&loaded.model, &loaded.tokenizer, &text, loaded.ctx)?;
    let source =
        args.file.file_name().map_or_else(|| args.file.display().to_string(), |n| n.to_string_lossy().into());
    let report = Report::new(trace, &source)?;
    let layers = if args.layer.is_empty() { report.default_layers() } else { args.layer.clone() };
    if let Some(&bad) = layers.iter().find(|&&l| l >= report.trace.n_layers) {
        bail!("--layer {bad}: the model has layers 0 to {}", report.trace.n_layers - 1);
    }

    if let Some(path) = &args.svg {
        write_atomic(path, report.svg().as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.html {
        write_atomic(path, report.html(&layers).as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if args.json {
        println!("{}", report.to_json()?);
        return Ok(());
    }
    print!("{}", report.tables());
    let stdout = std::io::stdout();
    if stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        for &layer in &layers {
            print!("\n{}", report.ansi_text(layer));
        }
    } else {
        println!("\n(the text coloured by expert shows on a terminal, or in the page --html writes)");
    }
    Ok(())
}
