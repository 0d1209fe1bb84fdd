//! `mixtral-q serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`).
//!
//! - `api`: requests, errors and response bodies as OpenAI (and llama-server) shape them.
//! - `http`: axum routes, the API key, body limits, server-sent events.
//! - `scheduler`: the thread that owns the engines: slots, the queue, prefix reuse, interleaving.
//! - `stop`: stop sequences.
//!
//! The engines stay synchronous: this (the main) thread runs the scheduler, and a small tokio runtime
//! on other threads serves HTTP and hands requests over through a channel.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mixtral_q::text::ChatTemplate;

use super::load::{Loaded, ModelArgs, DEMO_NOTICE};

mod api;
mod http;
mod scheduler;

use scheduler::{Load, Scheduler};

/// A slot's context must hold at least a short prompt and reply.
const MIN_SLOT_CTX: usize = 16;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on. The default answers this machine only; 0.0.0.0 answers every network
    /// interface (then set an API key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the log says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Conversations served at once, each with its own KV cache of ctx / slots tokens; a slot keeps its
    /// conversation after a reply, so the next turn processes only its new tokens (least recently used
    /// slots are reused first).
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Requests that may wait for a free slot; beyond that, requests get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "MIXTRAL_Q_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// What the HTTP handlers and the scheduler share.
pub struct Shared {
    loaded: Loaded,
    template: ChatTemplate,
    model_name: String,
    slots: usize,
    slot_ctx: usize,
    max_queue: usize,
    api_key: Option<String>,
    load: Load,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    if args.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("the API key (--api-key or MIXTRAL_Q_API_KEY) is empty");
    }
    let mut loaded = args.model.load()?;
    if loaded.is_demo {
        eprintln!("{DEMO_NOTICE}");
    }
    let slot_ctx = loaded.ctx / args.slots;
    if slot_ctx < MIN_SLOT_CTX {
        bail!(
            "a context of {} tokens over {} slots leaves {slot_ctx} tokens each (at least {MIN_SLOT_CTX}): \
             raise --ctx or lower --slots",
            loaded.ctx,
            args.slots
        );
    }
    // Every slot's engine gets its share of the context.
    loaded.ctx = slot_ctx;
    let metadata = &loaded.model.file.metadata;
    let template = ChatTemplate::from_metadata(metadata).unwrap_or_else(|e| {
        eprintln!("warning: {e:#}; using the Mixtral-Instruct template");
        ChatTemplate::mixtral_instruct()
    });
    let model_name = metadata.get_str("general.name").unwrap_or("mixtral-q").to_owned();
    let shared = Arc::new(Shared {
        loaded,
        template,
        model_name,
        slots: args.slots,
        slot_ctx,
        max_queue: args.max_queue,
        api_key: args.api_key.clone(),
        load: Load::default(),
    });
    let mut engines = (0..args.slots).map(|_| shared.loaded.engine()).collect::<Result<Vec<_>>>()?;
    let backend = shared.loaded.backend();
    if args.slots > 1 && backend.starts_with("CUDA") {
        eprintln!(
            "warning: each of the {} slots is its own CUDA engine, which uploads its own weights (the \
             later ones get what VRAM the first left): on a GPU, use --slots 1",
            args.slots
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mixtral-q-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)))
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && shared.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without an API key: anyone who can reach it can use it",
            addr.ip()
        );
    }
    let (jobs, queue) = crossbeam::channel::unbounded();
    let router = http::router(Arc::new(http::Http::new(shared.clone(), jobs)));
    let on_signal = shared.clone();
    let server = runtime.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("mixtral-q serve: shutting down");
                on_signal.load.shutdown.store(true, Ordering::Relaxed);
            })
            .await
    });
    eprintln!(
        "mixtral-q serve: {}, {} slot(s) of {slot_ctx} tokens, {backend}; listening on http://{addr}",
        shared.model_name, args.slots
    );

    // Returns when the server has stopped and dropped its end of the queue.
    Scheduler::new(&mut engines, &shared.loaded.tokenizer, &shared.template, &shared.load, queue).run();
    runtime.block_on(server).context("the HTTP server failed")?.context("the HTTP server failed")?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
