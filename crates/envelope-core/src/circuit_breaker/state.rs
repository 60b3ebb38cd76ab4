//! The breaker's state machine, as pure values: the states, the packed state word, and the verdict on a window.
//!
//! Nothing here does I/O or reads a clock, so every rule is unit-tested transition by transition.

use std::fmt;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Calls pass and are recorded; the breaker trips when a rate reaches its threshold.
    Closed = 0,
    /// Calls are rejected until the open duration has passed.
    Open = 1,
    /// A fixed number of probe calls pass; their failure rate decides between closed and open.
    HalfOpen = 2,
    /// Operator or config: every call passes, nothing is recorded.
    Disabled = 3,
    /// Operator: every call is rejected; no automatic transition.
    ForcedOpen = 4,
    /// Operator: every call passes and is recorded (so the window is fresh when released); no automatic
    /// transition.
    ForcedClosed = 5,
    /// Every call passes and is recorded; exceeding a threshold emits events but never opens the breaker.
    MetricsOnly = 6,
}

impl State {
    /// Every state, in declaration order.
    pub const ALL: [State; 7] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::Disabled,
        State::ForcedOpen,
        State::ForcedClosed,
        State::MetricsOnly,
    ];

    /// The stable snake_case name used in metrics, logs and the admin API.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Disabled => "disabled",
            State::ForcedOpen => "forced_open",
            State::ForcedClosed => "forced_closed",
            State::MetricsOnly => "metrics_only",
        }
    }

    /// The state named `name` ([`State::as_str`]'s names).
    pub fn from_name(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == name)
    }

    const fn from_bits(bits: u8) -> State {
        match bits {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::Disabled,
            4 => State::ForcedOpen,
            5 => State::ForcedClosed,
            _ => State::MetricsOnly,
        }
    }

    /// Whether calls in this state are recorded in the sliding window.
    pub(crate) const fn records(self) -> bool {
        matches!(self, State::Closed | State::ForcedClosed | State::MetricsOnly)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The breaker's state word: which state, how many half-open probes were handed out, and a generation that
/// changes on every transition, so results of calls admitted in an earlier state are not counted in a later one.
///
/// Packed into one `u64` so that admitting a probe is a single compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Word {
    pub(crate) state: State,
    pub(crate) issued: u16,
    pub(crate) generation: u32,
}

impl Word {
    pub(crate) const fn initial(state: State) -> Word {
        Word { state, issued: 0, generation: 0 }
    }

    pub(crate) const fn pack(self) -> u64 {
        (self.generation as u64) << 32 | (self.issued as u64) << 8 | self.state as u64
    }

    pub(crate) const fn unpack(bits: u64) -> Word {
        Word { state: State::from_bits(bits as u8), issued: (bits >> 8) as u16, generation: (bits >> 32) as u32 }
    }

    /// The word after a transition to `state`.
    pub(crate) const fn enter(self, state: State) -> Word {
        Word { state, issued: 0, generation: self.generation.wrapping_add(1) }
    }
}

/// Calls counted by a window (or by the half-open probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Calls recorded.
    pub calls: u32,
    /// Of which failed.
    pub failures: u32,
    /// Of which were slow (failed or not).
    pub slow: u32,
}

impl Snapshot {
    /// The failure rate in percent, if there are any calls.
    pub fn failure_rate(&self) -> Option<f32> {
        (self.calls > 0).then(|| self.failures as f32 * 100.0 / self.calls as f32)
    }

    /// The slow-call rate in percent, if there are any calls.
    pub fn slow_call_rate(&self) -> Option<f32> {
        (self.calls > 0).then(|| self.slow as f32 * 100.0 / self.calls as f32)
    }
}

/// What a window says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Fewer calls than the minimum: no verdict yet.
    TooFewCalls,
    /// Both rates below their thresholds.
    Healthy,
    /// The failure rate is at or above its threshold.
    FailureRateExceeded,
    /// The slow-call rate is at or above its threshold (and the failure rate is not).
    SlowCallRateExceeded,
}

/// Judges `s` against thresholds given in parts per million; exact integer arithmetic, trips at `>=`.
pub(crate) const fn judge(s: Snapshot, minimum_calls: u32, failure_ppm: u64, slow_ppm: u64) -> Verdict {
    if s.calls == 0 || s.calls < minimum_calls {
        return Verdict::TooFewCalls;
    }
    let calls = s.calls as u64;
    if s.failures as u64 * 1_000_000 >= failure_ppm * calls {
        Verdict::FailureRateExceeded
    } else if s.slow as u64 * 1_000_000 >= slow_ppm * calls {
        Verdict::SlowCallRateExceeded
    } else {
        Verdict::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_round_trips() {
        for state in State::ALL {
            for (issued, generation) in [(0, 0), (1, 7), (u16::MAX, u32::MAX)] {
                let w = Word { state, issued, generation };
                assert_eq!(Word::unpack(w.pack()), w);
            }
        }
    }

    #[test]
    fn entering_a_state_bumps_generation_and_clears_probes() {
        let w = Word { state: State::HalfOpen, issued: 3, generation: u32::MAX };
        assert_eq!(w.enter(State::Open), Word { state: State::Open, issued: 0, generation: 0 });
    }

    fn snap(calls: u32, failures: u32, slow: u32) -> Snapshot {
        Snapshot { calls, failures, slow }
    }

    #[test]
    fn threshold_is_inclusive_and_exact() {
        let half = 500_000;
        assert_eq!(judge(snap(10, 4, 0), 10, half, 1_000_000), Verdict::Healthy);
        assert_eq!(judge(snap(10, 5, 0), 10, half, 1_000_000), Verdict::FailureRateExceeded);
        // 1 of 3 is 33.33 %: below a 33.34 % threshold, at-or-above 33.33 %.
        assert_eq!(judge(snap(3, 1, 0), 3, 333_400, 1_000_000), Verdict::Healthy);
        assert_eq!(judge(snap(3, 1, 0), 3, 333_300, 1_000_000), Verdict::FailureRateExceeded);
    }

    #[test]
    fn minimum_calls_gate_every_verdict() {
        assert_eq!(judge(snap(9, 9, 9), 10, 1, 1), Verdict::TooFewCalls);
        assert_eq!(judge(snap(0, 0, 0), 0, 1, 1), Verdict::TooFewCalls);
    }

    #[test]
    fn slow_calls_trip_without_failures() {
        assert_eq!(judge(snap(10, 0, 10), 10, 500_000, 1_000_000), Verdict::SlowCallRateExceeded);
        assert_eq!(judge(snap(10, 0, 9), 10, 500_000, 1_000_000), Verdict::Healthy);
    }
}
