//! Distributed mode: circuit breakers shared by every instance of a service through a store (Redis, in the
//! `envelope-redis` crate; in memory here, for tests and for one process), with the store never on the call path.
//!
//! # The model
//! - **Admission stays local.** A shared breaker is an ordinary [`CircuitBreaker`] made with
//!   [`CircuitBreaker::linked`]: every call is admitted or refused from its own state word, as any breaker. The
//!   store is never asked before a call.
//! - **Outcomes are shared.** Each instance counts what it records and a [`Fleet`] sends the counts to the store
//!   every sync interval, once per `(instance, sequence number)`, so a count sent again after a timeout is not
//!   counted twice. The store adds them to one window per breaker: one-second buckets over the breaker's time
//!   window, counted under the fleet's current *epoch* (counts from an earlier epoch are dropped, as a local
//!   breaker drops the results of calls admitted before its last transition). The counts are exact.
//! - **Decisions are the engine's, made once.** After each sync an instance judges the fleet's window with the
//!   breaker's own rule ([`decide`]) and, when it trips (or the open time has passed, or the probes are all in),
//!   proposes the transition to the store, which makes it only if the fleet is still at the epoch the instance saw:
//!   one instance decides, and the event names it. Every other instance sees the new state at its next sync and
//!   follows it, so a trip opens the whole fleet within two sync intervals (default 200 ms each).
//! - **Probes are counted fleet-wide.** In half-open the store holds the probes left; an instance claims them one
//!   at a time as it has calls to probe with, so the fleet sends exactly `half_open_calls` probes, and their
//!   results, summed in the store, decide between closed and open.
//! - **An operator's transition is the fleet's.** Forcing a linked breaker open (or closed, or resetting it) on
//!   one instance sends the transition to the store at the next sync; every instance follows.
//! - **The store down, slow or flapping.** Every store operation has its timeout and the store sits behind a
//!   breaker of its own. When an operation fails, every shared breaker decides alone again, from its own window
//!   and state ([`Event::SharedStateDegraded`] once); when the store answers again, they follow the fleet again
//!   ([`Event::SharedStateRestored`]), within a second or so. No call ever waits for the store.
//!
//! A shared breaker needs a time window (`Window::Time`): a fleet has no common order of calls for "the last `n`
//! calls".
//!
//! [`Event::SharedStateDegraded`]: crate::event::Event::SharedStateDegraded
//! [`Event::SharedStateRestored`]: crate::event::Event::SharedStateRestored

mod fleet;
mod limit;
mod memory;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use self::fleet::{DEFAULT_OP_TIMEOUT, DEFAULT_SYNC_INTERVAL, Fleet, FleetConfig, FleetStatus};
pub use self::limit::{GlobalKeyedLimiter, GlobalLimiter, LimitStore};
pub use self::memory::MemoryStore;
use crate::circuit_breaker::state::{Verdict, judge};
use crate::circuit_breaker::{self, CircuitBreaker, Config, Delta, Snapshot, State};

/// A boxed future, as the store's methods return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A breaker's state as the fleet's store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetView {
    /// The fleet's state: closed, open, half-open, forced open or forced closed.
    pub state: State,
    /// Bumped by every transition; 1 for a breaker the store has just created.
    pub epoch: u64,
    /// Open: time left before probes may start. Half-open: time left before the fleet gives up on its probes.
    pub remaining: Duration,
    /// The calls of this epoch in the breaker's time window, every instance's.
    pub window: Snapshot,
    /// Half-open: the probes recorded so far, every instance's.
    pub probes: Snapshot,
    /// Half-open: probes not yet claimed by an instance.
    pub probes_left: u32,
    /// Opens since the fleet's breaker last closed (drives the escalation of the open time).
    pub opens: u32,
    /// The instance that made the last transition (empty for a new breaker).
    pub decided_by: String,
}

/// One sync: what an instance recorded since its last one.
#[derive(Debug, Clone, Copy)]
pub struct SyncRequest<'a> {
    /// The breaker's name (the store's key).
    pub breaker: &'a str,
    /// The instance sending.
    pub instance: &'a str,
    /// The instance's sequence number for this breaker: a request with a number the store has seen is not
    /// counted again.
    pub seq: u64,
    /// The fleet epoch the outcomes were recorded under; counts of another epoch are dropped.
    pub epoch: u64,
    /// The outcomes.
    pub delta: Delta,
    /// The breaker's time window, in seconds.
    pub window_secs: u32,
}

/// A transition proposed to the store.
#[derive(Debug, Clone, Copy)]
pub struct TransitionRequest<'a> {
    /// The breaker's name.
    pub breaker: &'a str,
    /// The instance proposing.
    pub instance: &'a str,
    /// Made only if the fleet is still at this epoch; `None` for an operator's transition, made whatever the
    /// state.
    pub from_epoch: Option<u64>,
    /// The new state.
    pub to: State,
    /// Open: how long. Half-open: how long the fleet waits for its probes (`Duration::MAX`: forever).
    pub duration: Duration,
    /// Half-open: how many probes the fleet sends.
    pub probes: u32,
    /// Opens since the fleet's breaker last closed, after this transition.
    pub opens: u32,
}

/// The store could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// Where a fleet's shared breakers live. Each method is one atomic step in the store (for Redis, one script).
pub trait BreakerStore: Send + Sync + 'static {
    /// What to call the store in logs and on the admin API (an address without credentials).
    fn describe(&self) -> String;

    /// Adds the request's outcomes to the breaker's window (once per `(instance, seq)`, and only if recorded
    /// under the current epoch) and returns the fleet's view, creating the breaker closed if the store has none.
    fn sync<'a>(&'a self, req: SyncRequest<'a>) -> BoxFuture<'a, Result<FleetView, StoreError>>;

    /// Makes the transition if the fleet is still at `from_epoch` (or unconditionally); returns whether it was
    /// made, and the view after.
    fn transition<'a>(&'a self, req: TransitionRequest<'a>) -> BoxFuture<'a, Result<(bool, FleetView), StoreError>>;

    /// Claims up to `want` of the probes of half-open epoch `epoch`; returns how many were granted.
    fn claim_probes<'a>(&'a self, breaker: &'a str, epoch: u64, want: u32) -> BoxFuture<'a, Result<u32, StoreError>>;
}

/// What the fleet should do next, by the breaker's own rule, from its view: the transition to propose, if any.
///
/// Closed: trip when the fleet's window reaches a threshold (with at least `minimum_calls`). Open: move to
/// half-open once the open time has passed. Half-open: once every probe is in, close if they were healthy, else
/// open again (longer, with escalation); open again too if the probes took longer than `max_half_open_wait`.
pub fn decide<'a>(
    view: &FleetView,
    config: &Config,
    breaker: &'a str,
    instance: &'a str,
) -> Option<TransitionRequest<'a>> {
    let reopen = |opens: u32| TransitionRequest {
        breaker,
        instance,
        from_epoch: Some(view.epoch),
        to: State::Open,
        duration: config.open_duration_for(opens),
        probes: 0,
        opens,
    };
    match view.state {
        State::Closed => {
            let verdict = judge(view.window, config.minimum_calls, config.failure_ppm, config.slow_ppm);
            matches!(verdict, Verdict::FailureRateExceeded | Verdict::SlowCallRateExceeded)
                .then(|| reopen(view.opens.saturating_add(1)))
        }
        State::Open => view.remaining.is_zero().then(|| TransitionRequest {
            breaker,
            instance,
            from_epoch: Some(view.epoch),
            to: State::HalfOpen,
            duration: config.max_half_open_wait.unwrap_or(Duration::MAX),
            probes: config.half_open_calls,
            opens: view.opens,
        }),
        State::HalfOpen if view.probes.calls >= config.half_open_calls => {
            let verdict = judge(view.probes, config.half_open_calls, config.failure_ppm, config.slow_ppm);
            if verdict == Verdict::Healthy {
                Some(TransitionRequest { to: State::Closed, duration: Duration::ZERO, opens: 0, ..reopen(0) })
            } else {
                Some(reopen(view.opens.saturating_add(1)))
            }
        }
        State::HalfOpen => view.remaining.is_zero().then(|| reopen(view.opens.saturating_add(1))),
        _ => None,
    }
}

/// The time window of a breaker that can be shared, or why it cannot.
pub fn shared_window(config: &Config) -> Result<u32, &'static str> {
    match config.window() {
        circuit_breaker::Window::Time(secs) => Ok(secs),
        circuit_breaker::Window::Count(_) => Err(
            "a shared breaker needs a time window (`window = { seconds = N }`): a fleet has no common order of calls",
        ),
    }
}

/// Whether `breaker` may join a fleet: linked, with a time window.
pub(crate) fn check(breaker: &CircuitBreaker) -> Result<u32, &'static str> {
    if !breaker.is_linked() {
        return Err("the breaker is not linked (make it with `CircuitBreaker::linked`)");
    }
    shared_window(breaker.config())
}
