//! The hybrid expert scheduler (issue 15): which experts a device with a limited number of expert
//! slots keeps resident, and (to come) a backend that runs resident experts on the device and the
//! rest on the host concurrently.
//!
//! - `policy`: residency policies over (layer, expert) slots (LRU, LFU with decay, static-popular)
//!   and a simulator that replays router traces through them, so a policy can be chosen from
//!   measured hit rates before any device is involved.

pub mod policy;
