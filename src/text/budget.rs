//! Containing third-party code that runs on bytes from a user's file: a memory and time budget for a
//! chat template (enforced by the global allocator), and panics turned into errors.
//!
//! minijinja's fuel bounds the number of instructions a template runs, but not what one instruction
//! costs: `{% set ns.s = ns.s ~ ns.s %}` in a loop doubles a string each time (30 steps are a GiB),
//! and `'x' * 100000000` allocates 100 MB in one instruction. No minijinja hook sees those, but the
//! allocator sees every one of them. While [`within_budget`] runs on a thread, [`BudgetedAllocator`]
//! counts what that thread allocates and checks the clock; past either limit it prints the caller's
//! message as an error line and ends the process with status 1, as any other error would, before the
//! machine runs out of memory or the program hangs. (Nothing can unwind out of an allocator, and a
//! refused allocation would only abort the process with a less helpful message.)
//!
//! The binary installs the allocator (`#[global_allocator]` in main.rs); without it, `within_budget`
//! only runs its closure. Other threads are never affected.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::Once;
use std::time::{Duration, Instant};

thread_local! {
    /// Bytes this thread may still hold (net of frees) while a budget is active.
    static LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Printed when the budget is exceeded.
    static MESSAGE: Cell<&'static str> = const { Cell::new("") };
}

/// Runs `f` on this thread with at most `bytes` of new allocations (net) and `time` to finish; see the
/// module documentation for what happens past either limit. Not reentrant (an inner call's limits
/// replace the outer ones until it returns).
pub fn within_budget<R>(bytes: usize, time: Duration, message: &'static str, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            LEFT.set(None);
            DEADLINE.set(None);
        }
    }
    let deadline = Instant::now() + time;
    MESSAGE.set(message);
    DEADLINE.set(Some(deadline));
    LEFT.set(Some(bytes));
    let _reset = Reset;
    f()
}

/// The system allocator plus the per-thread budget of [`within_budget`].
pub struct BudgetedAllocator;

impl BudgetedAllocator {
    /// Charges `size` bytes to this thread's budget; past the budget or the deadline, ends the process.
    fn charge(size: usize) {
        // `try_with`: thread-locals may be gone while a thread exits; then there is no budget.
        let Ok(Some(left)) = LEFT.try_with(Cell::get) else { return };
        // Reading the clock allocates nothing (vDSO), and only guarded threads pay for it.
        let late = DEADLINE.try_with(Cell::get).ok().flatten().is_some_and(|d| Instant::now() > d);
        if late || size > left {
            let message = MESSAGE.try_with(Cell::get).unwrap_or("");
            let why: &[u8] =
                if late { b" (it ran out of time)\n" } else { b" (it needed too much memory)\n" };
            for part in [b"error: ".as_slice(), message.as_bytes(), why] {
                // SAFETY: writes a valid buffer to the standard error descriptor; nothing here may
                // allocate, so raw libc calls only.
                unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
            }
            // SAFETY: _exit ends the process at once; it allocates nothing and runs no destructors,
            // which is what is wanted from inside an allocator.
            unsafe { libc::_exit(1) };
        }
        let _ = LEFT.try_with(|l| l.set(Some(left - size)));
    }

    fn refund(size: usize) {
        let _ = LEFT.try_with(|l| {
            if let Some(left) = l.get() {
                l.set(Some(left.saturating_add(size)));
            }
        });
    }
}

// SAFETY: every call is forwarded to `System` with the caller's layout; the budget only counts (or
// ends the process).
unsafe impl GlobalAlloc for BudgetedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::charge(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::charge(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::refund(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::charge(new_size - layout.size());
        }
        let new = System.realloc(ptr, layout, new_size);
        if new_size < layout.size() {
            Self::refund(layout.size() - new_size);
        }
        new
    }
}

/// Runs `f`, turning a panic into `None`, for libraries that panic on some input from a user's file
/// (minijinja 2.24 on a reversed slice of an empty list, `[][::-1]`; tokenizers 0.22 on some malformed
/// tokenizer.json): the input is refused like any other bad input. The default panic report
/// ("thread panicked at ...") is not printed for these.
pub(crate) fn catching_panics<R>(f: impl FnOnce() -> R) -> Option<R> {
    thread_local!(static QUIET: Cell<bool> = const { Cell::new(false) });
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info)
            }
        }));
    });
    QUIET.set(true);
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.set(false);
    result.ok()
}
