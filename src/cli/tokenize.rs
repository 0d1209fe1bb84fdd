//! `mixtral-q tokenize -m M [TEXT | --chat MESSAGES.json]`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mixtral_q::text::Message;

use super::load::{ModelArgs, TemplateArgs};

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to tokenize (BOS is added unless --no-bos).
    #[arg(required_unless_present = "chat", allow_hyphen_values = true)]
    pub text: Option<String>,
    /// A conversation rendered with the chat template as the chat REPL renders it: a JSON list of
    /// {"role", "content"} messages, {"messages": [...]} (with an optional "system"), or a /save file.
    #[arg(long, conflicts_with = "text")]
    pub chat: Option<PathBuf>,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[arg(long)]
    pub no_bos: bool,
    #[arg(long)]
    pub json: bool,
}

/// What `--chat` accepts.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Conversation {
    Messages(Vec<Message>),
    /// `{"messages": [...]}` as chat APIs send it, and the REPL's `/save` file (`system`, `messages`,
    /// `settings`; other fields are ignored).
    Object {
        #[serde(default)]
        system: Option<String>,
        messages: Vec<Message>,
    },
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let (text, ids) = match &args.chat {
        Some(path) => {
            let json =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let (system, messages) = match serde_json::from_str(&json) {
                Ok(Conversation::Messages(messages)) => (None, messages),
                Ok(Conversation::Object { system, messages }) => (system, messages),
                Err(_) => bail!(
                    "{} is neither a JSON list of {{\"role\", \"content\"}} messages nor an object with \
                     \"messages\" (such as a chat /save file)",
                    path.display()
                ),
            };
            if messages.is_empty() && system.is_none() {
                bail!("{} holds no messages", path.display());
            }
            let template = args.template.template(&loaded.model.file.metadata)?;
            // The system prompt goes where the REPL puts it (folded into the first user message when
            // the template has no system role).
            let rendered = template.render(&template.conversation(system.as_deref(), &messages), true)?;
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
