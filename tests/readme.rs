//! The README stays true: every flag its command table and its option paragraphs mention is one the
//! command takes (as `mixtral-q <command> --help` lists it), and every command has a row.

mod common;

use common::*;

/// llama.cpp spellings translated before clap sees them (src/cli/llama_flags.rs): the flag they
/// stand for is the one to find in the help.
const TRANSLATED: [(&str, &str); 3] =
    [("-ngl", "--n-gpu-layers"), ("-sys", "--system-prompt"), ("--ctx-size", "--ctx")];

/// The flags in `text`: `-x` and `--long-name` words.
fn flags(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices('-') {
        let before = text[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '-') {
            continue;
        }
        let word: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        let name = word.trim_start_matches('-');
        if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphabetic()) || word.starts_with("---")
        {
            continue;
        }
        out.push(word.trim_end_matches('-').to_string());
    }
    out
}

fn help(command: &str) -> String {
    let o = run(&[command, "--help"]);
    assert!(o.status.success(), "mixtral-q {command} --help: {}", stderr(&o));
    stdout(&o)
}

fn assert_in_help(command: &str, help: &str, flag: &str) {
    let wanted = TRANSLATED.iter().find(|(from, _)| *from == flag).map_or(flag, |(_, to)| to);
    let listed = help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).any(|w| w == wanted);
    assert!(
        listed,
        "the README mentions `{command} {flag}`, which `mixtral-q {command} --help` does not list"
    );
}

#[test]
fn every_flag_the_readme_mentions_exists() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let commands = [
        "quantize",
        "info",
        "synth",
        "generate",
        "perplexity",
        "tokenize",
        "bench",
        "chat",
        "routing",
        "serve",
    ];
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    for command in commands {
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("| `{command}")))
            .unwrap_or_else(|| panic!("the README's command table has no row for {command}"));
        let usage = row.split('`').nth(1).unwrap();
        let help = help(command);
        for flag in flags(usage) {
            assert_in_help(command, &help, &flag);
        }
    }
    // "Every inference command takes ...": each of those commands does.
    let every =
        readme.split("Every inference command takes").nth(1).unwrap().split("Errors are").next().unwrap();
    let every_flags: Vec<String> = every.split('`').skip(1).step_by(2).flat_map(flags).collect();
    assert!(every_flags.len() >= 6, "{every_flags:?}");
    for command in ["generate", "perplexity", "tokenize", "bench", "chat"] {
        let help = help(command);
        for flag in &every_flags {
            assert_in_help(command, &help, flag);
        }
    }
    // The llama.cpp spellings the README promises are taken by generate or chat.
    let llama =
        readme.split("**Coming from llama.cpp:**").nth(1).unwrap().split("A llama.cpp flag").next().unwrap();
    let (generate, chat) = (help("generate"), help("chat"));
    for flag in llama.split('`').skip(1).step_by(2).flat_map(flags) {
        let wanted = TRANSLATED.iter().find(|(from, _)| *from == flag).map_or(flag.as_str(), |(_, to)| to);
        let listed =
            |h: &str| h.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).any(|w| w == wanted);
        assert!(
            listed(&generate) || listed(&chat),
            "the README promises llama.cpp's {flag}, which neither generate nor chat takes"
        );
    }
}

#[test]
fn the_flag_extractor_finds_flags_and_nothing_else() {
    let found = flags("generate [-m M] -p TEXT\\|-p - [-n N\\|-1] [-s/--seed S] x-y --n-gpu-layers N `-ngl`");
    assert_eq!(found, ["-m", "-p", "-p", "-n", "-s", "--seed", "--n-gpu-layers", "-ngl"]);
}
