//! The hybrid expert scheduler (issue 15): which experts a device with a limited number of expert
//! slots keeps resident, and a backend that runs resident experts on the device and the rest on the
//! host concurrently (so far over a stand-in device; not yet lookahead, a cost model or a GPU).
//!
//! - `policy`: residency policies over (layer, expert) slots (LRU, LFU with decay, static-popular)
//!   and a simulator that replays router traces through them, so a policy can be chosen from
//!   measured hit rates before any device is involved.
//! - `standin`: a stand-in device for CI, an expert executor thread with a few expert slots.
//! - `backend`: [`HybridBackend`], the CPU backend with the experts split between the stand-in
//!   device and the host.

pub mod backend;
pub mod cost;
pub mod policy;
pub mod standin;

pub use self::backend::{hybrid_engine, HybridBackend, HybridEngine, Lookahead};
pub use self::cost::{ExpertCosts, MissChoice, Misses};
#[cfg(test)]
mod tests;
