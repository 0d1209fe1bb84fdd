//! llama.cpp's spellings that clap cannot express, applied to the arguments before clap sees them:
//! multi-letter single-dash flags (`-ngl 99`, `-sys "..."`) become the long flags they mean here, and a
//! llama.cpp flag that mixtral-q does not have gets a message saying so and what to use instead
//! (without this, `-ngl 99` reads as `-n gl` and clap answers "invalid value 'gl' for '--n-predict'").

use std::ffi::OsString;

use anyhow::{bail, Result};

/// llama.cpp flags and the flag that means the same here.
const RENAMED: &[(&str, &str)] =
    &[("-ngl", "--n-gpu-layers"), ("-sys", "--system-prompt"), ("--ctx-size", "--ctx")];

/// llama.cpp flags that mixtral-q does not have, and what to do instead.
const UNSUPPORTED: &[(&[&str], &str)] = &[
    (
        &["-ncmoe", "--n-cpu-moe", "-cmoe", "--cpu-moe", "-ot", "--override-tensor"],
        "mixtral-q places the experts itself: set --vram-budget, or -ngl N to keep only N layers' experts on the GPU",
    ),
    (&["-ts", "--tensor-split", "-sm", "--split-mode", "-mg", "--main-gpu"], "mixtral-q runs on one GPU: pick it with --device cuda:N"),
    (&["-dev"], "use --device auto|cpu|cuda|cuda:N"),
    (&["-fa", "--flash-attn"], "attention needs no switch here"),
    (&["-ctk", "--cache-type-k", "-ctv", "--cache-type-v"], "the KV cache is f32 on the CPU and f16 on the GPU"),
    (&["--mlock", "--no-mmap", "--mmap", "--numa"], "the model file is always memory-mapped"),
    (&["-b", "--batch-size", "-ub", "--ubatch-size"], "the engine chooses its batches"),
    (&["-tb", "--threads-batch"], "one thread count serves prompts and generation: use -t"),
    (
        &["-i", "--interactive", "-if", "--interactive-first", "-cnv", "--conversation", "-mli", "--multiline-input"],
        "for a conversation run `mixtral-q chat`",
    ),
    (&["-no-cnv", "--no-conversation"], "`mixtral-q generate` always continues the prompt as plain text: drop the flag"),
    (&["--jinja"], "the model's Jinja chat template is always used (--chat-template replaces it): drop the flag"),
    (
        &["-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url"],
        "mixtral-q does not download models: pass a GGUF file with -m (or `mixtral-q quantize` a checkpoint)",
    ),
    (&["--grammar", "--grammar-file", "-j", "--json-schema"], "constrained sampling is not supported"),
    (
        &[
            "--mirostat", "--mirostat-lr", "--mirostat-ent", "--typical", "--tfs", "--presence-penalty",
            "--frequency-penalty", "--dry-multiplier", "--xtc-probability", "--top-nsigma", "--dynatemp-range",
            "--samplers", "--sampling-seq",
        ],
        "the samplers here are --temp, --top-k, --top-p, --min-p and --repeat-penalty",
    ),
    (&["--lora", "--lora-scaled", "--control-vector"], "adapters are not supported"),
    (&["-e", "--escape", "--no-escape"], "prompts are used as given (put text with newlines in a file: -f FILE)"),
    (
        &["--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale", "--yarn-orig-ctx"],
        "RoPE settings come from the model file",
    ),
    (&["--prompt-cache", "--prompt-cache-all", "--prompt-cache-ro"], "the chat REPL keeps its KV cache between turns"),
    (&["-co", "--color"], "output is plain text"),
];

/// Flags whose value is free text (which may start with `-`): it is never rewritten.
const TAKES_TEXT: &[&str] = &[
    "-p",
    "--prompt",
    "--system",
    "--system-prompt",
    "-sys",
    "-r",
    "--reverse-prompt",
    "--stop",
    "--chat-template",
    "-f",
    "--file",
    "-m",
    "--model",
    "-o",
    "--output",
];

/// The arguments with llama.cpp's spellings translated; an error for a llama.cpp flag we do not have.
pub fn translate(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    let mut value_next = false;
    let mut rest = false;
    for arg in args {
        let Some(text) = arg.to_str().filter(|_| !value_next && !rest) else {
            value_next = false;
            out.push(arg);
            continue;
        };
        rest = text == "--";
        let (flag, value) = match text.split_once('=') {
            Some((flag, value)) if flag.starts_with('-') => (flag, Some(value)),
            _ => (text, None),
        };
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(flags, _)| flags.contains(&flag)) {
            bail!("{flag} is a llama.cpp option that mixtral-q does not have: {why}");
        }
        let flag = RENAMED.iter().find(|(from, _)| *from == flag).map_or(flag, |(_, to)| to);
        value_next = value.is_none() && TAKES_TEXT.contains(&flag);
        out.push(match value {
            Some(value) => format!("{flag}={value}").into(),
            None => flag.into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(args: &[&str]) -> Result<Vec<String>> {
        let out = translate(args.iter().map(OsString::from))?;
        Ok(out.into_iter().map(|a| a.into_string().unwrap()).collect())
    }

    #[test]
    fn renames_llama_cpp_flags_but_never_prompt_text() {
        let out = tr(&["mixtral-q", "chat", "-ngl", "99", "-sys", "-ngl", "--ctx-size=512"]).unwrap();
        assert_eq!(
            out,
            ["mixtral-q", "chat", "--n-gpu-layers", "99", "--system-prompt", "-ngl", "--ctx=512"]
        );
        let out = tr(&["mixtral-q", "generate", "-p", "-fa", "--", "-fa"]).unwrap();
        assert_eq!(out, ["mixtral-q", "generate", "-p", "-fa", "--", "-fa"]);
    }

    #[test]
    fn unsupported_flags_say_what_to_use() {
        let err = tr(&["mixtral-q", "generate", "-ncmoe", "4"]).unwrap_err().to_string();
        assert!(err.contains("-ncmoe is a llama.cpp option") && err.contains("--vram-budget"), "{err}");
        let err = tr(&["mixtral-q", "generate", "--mirostat=2"]).unwrap_err().to_string();
        assert!(err.starts_with("--mirostat is a llama.cpp option"), "{err}");
        assert!(tr(&["mixtral-q", "generate", "-cnv"]).unwrap_err().to_string().contains("mixtral-q chat"));
    }
}
