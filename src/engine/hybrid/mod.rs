//! The hybrid expert scheduler: which experts a device with a limited number of expert slots keeps
//! resident, where a missing one runs (the cost model), and a backend that runs resident experts on
//! a stand-in device and the rest on the host concurrently, with lookahead. The CUDA backend applies
//! the same cost model to its own missing experts (`engine::cuda::backend`).
//!
//! - `cost`: the cost model (host time per expert for 1 and 8 tokens, copy and device read speeds),
//!   measured at start-up and cached per machine, and the rule it gives (`--misses`).
//! - `policy`: residency policies over (layer, expert) slots (LRU, LFU with decay, static-popular)
//!   and a simulator that replays router traces through them, so a policy can be chosen from
//!   measured hit rates before any device is involved.
//! - `standin`: a stand-in device for CI, an expert executor thread with a few expert slots.
//! - `backend`: [`HybridBackend`], the CPU backend with the experts split between the stand-in
//!   device and the host, predicting each next layer's experts to start their copies early.

pub mod backend;
pub mod cost;
pub mod policy;
pub mod standin;

pub use self::backend::{hybrid_engine, HybridBackend, HybridEngine, Lookahead};
pub use self::cost::{ExpertCosts, MissChoice, Misses};
#[cfg(test)]
mod tests;
