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

/// The time left from `now` until `deadline` (zero once it has passed); `None` without a deadline. `now` is only
/// read when there is one, so either may be missing.
#[inline]
pub(crate) fn left(deadline: Option<Instant>, now: Option<Instant>) -> Option<Duration> {
    deadline.zip(now).map(|(d, now)| d.saturating_duration_since(now))
}

/// The shorter of two optional limits (a missing one does not limit).
#[inline]
pub(crate) fn shorter(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
