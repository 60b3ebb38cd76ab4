use std::fmt;
use std::time::Duration;

use super::State;

/// The breaker rejected the call without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    pub(crate) state: State,
    /// Nanoseconds until probes are admitted; `u64::MAX` when unknown. Kept raw so that a rejection does not pay
    /// for a division it may never need.
    pub(crate) remaining_nanos: u64,
}

impl CircuitOpen {
    /// The state that rejected the call: open, forced open, or half-open with every probe taken.
    pub fn state(&self) -> State {
        self.state
    }

    /// How long until the breaker admits probes, when that is known (a good `Retry-After`).
    pub fn remaining(&self) -> Option<Duration> {
        (self.remaining_nanos != u64::MAX).then(|| Duration::from_nanos(self.remaining_nanos))
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit breaker is {}", self.state)
    }
}

impl std::error::Error for CircuitOpen {}
