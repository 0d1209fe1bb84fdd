//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_model_dir() -> PathBuf {
    repo().join("models/tiny-mixtral")
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// The `mixtral-q` binary built for this test run.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mixtral-q"))
}

/// Runs `mixtral-q` with `args`, returning its output.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("cannot start mixtral-q")
}

/// Python with the `gguf` package (llama.cpp's reader) and the `openai` client: `MIXTRAL_Q_PYTHON`, else
/// `.venv/bin/python`.
/// Missing is a test failure, not a skip: `bash .ci/run` installs it.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("MIXTRAL_Q_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the gguf package: run `bash .ci/run` (it installs one in .venv) or set MIXTRAL_Q_PYTHON"
    );
    venv
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copies a directory (flat) so a test can corrupt its copy.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        std::fs::copy(entry.path(), &dest).unwrap();
        let mut perms = std::fs::metadata(&dest).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&dest, perms).unwrap();
    }
}
