//! Synchronisation primitives, swapped for loom's model-checked ones under `--cfg envelope_loom`.
//!
//! Only the hand-written synchronisation (circuit breaker state, bulkhead semaphore) goes through here, so the loom
//! models in `tests/loom.rs` check exactly the code that runs in production.

#[cfg(envelope_loom)]
pub(crate) use loom::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering},
};
#[cfg(not(envelope_loom))]
pub(crate) use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering},
};

/// Locks `mutex`, recovering the data if a previous holder panicked: every critical section in this crate leaves
/// its data consistent before it can panic, so poisoning carries no information here.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
