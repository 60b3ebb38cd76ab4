//! Time, read only through tokio so that tests can pause and advance the clock.
//!
//! `tokio::time::Instant::now()` reads the paused test clock inside a runtime built with `start_paused`, and the
//! monotonic system clock everywhere else (including threads with no runtime, which `call_blocking` uses).

use std::time::Duration;

pub use tokio::time::Instant;

/// The current instant.
#[inline]
pub fn now() -> Instant {
    Instant::now()
}

/// Nanoseconds since `epoch`, saturating at zero and at `u64::MAX` (584 years).
#[inline]
pub(crate) fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// `d` in nanoseconds, saturating.
#[inline]
pub(crate) fn as_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
