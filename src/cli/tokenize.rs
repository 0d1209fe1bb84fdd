//! `mixtral-q tokenize -m M [TEXT | --chat MESSAGES.json]`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mixtral_q::text::{ChatTemplate, Message};

use super::load::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to tokenize (BOS is added unless --no-bos).
    #[arg(required_unless_present = "chat")]
    pub text: Option<String>,
    /// A JSON file with a list of {"role", "content"} messages: rendered with the model's chat template.
    #[arg(long, conflicts_with = "text")]
    pub chat: Option<PathBuf>,
    #[arg(long)]
    pub no_bos: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let (text, ids) = match &args.chat {
        Some(path) => {
            let json =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let messages: Vec<Message> = serde_json::from_str(&json).with_context(|| {
                format!("{} is not a JSON list of {{\"role\", \"content\"}} messages", path.display())
            })?;
            if messages.is_empty() {
                bail!("{} holds no messages", path.display());
            }
            let template = ChatTemplate::from_metadata(&loaded.model.file.metadata)?;
            let rendered = template.render(&messages, true)?;
            // The template writes BOS itself.
            let ids = tok.encode(&rendered, false)?;
            (rendered, ids)
        }
        None => {
            let text = args.text.clone().unwrap_or_default();
            let ids = tok.encode(&text, !args.no_bos)?;
            (text, ids)
        }
    };
    let pieces: Vec<String> = ids.iter().map(|&id| tok.piece(id)).collect();
    if args.json {
        let json = serde_json::json!({"text": text, "ids": ids, "pieces": pieces});
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for (id, piece) in ids.iter().zip(&pieces) {
            println!("{id:6} -> {piece:?}");
        }
    }
    Ok(())
}
