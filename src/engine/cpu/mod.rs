//! The CPU backend (in progress).
