//! The `mixtral-q` command line. Library code lives in the `mixtral_q` crate; this binary parses
//! arguments, calls it, and turns every error into one line on stderr and a non-zero exit.

mod cli;

use std::process::ExitCode;

/// The system allocator, plus the memory and time budget that chat templates (code from the model
/// file) run under.
#[global_allocator]
static ALLOCATOR: mixtral_q::text::budget::BudgetedAllocator = mixtral_q::text::budget::BudgetedAllocator;

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`mixtral-q info x.gguf --tensors | head`) instead of failing on every later write.
    // SAFETY: called before any thread starts; SIG_DFL is always a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = match cli::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A usage error, as clap reports its own.
            return ExitCode::from(2);
        }
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain into one line: "cannot read x.gguf: No such file or directory".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
