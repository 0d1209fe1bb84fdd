//! The cache folder, shared by the library (compiled CUDA kernels) and the command line (the demo
//! model, the chat history).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// `$MIXTRAL_Q_CACHE`, else `$XDG_CACHE_HOME/mixtral-q`, else `~/.cache/mixtral-q`. Empty variables
/// count as unset (as the XDG specification says).
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("MIXTRAL_Q_CACHE") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("mixtral-q"));
    }
    let home = var("HOME").context("neither MIXTRAL_Q_CACHE nor HOME is set")?;
    Ok(home.join(".cache/mixtral-q"))
}
