//! Events: how metrics, logs and traces learn what the policies did, without the policies knowing about them.
//!
//! A policy holds a [`Listeners`] list (empty by default, which costs one branch) and emits an [`Event`] for each
//! decision worth seeing: a breaker changing state, a call not permitted, a retry scheduled or given up, a bulkhead
//! or rate limiter rejecting, a timeout firing, a fallback used, a hedge launched, a fault injected. Events borrow
//! their data, so emitting one never allocates. Successful calls on the happy path emit nothing.
//!
//! ```
//! use envelope_core::event::{Event, Listeners};
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//!
//! let transitions = Arc::new(AtomicUsize::new(0));
//! let seen = transitions.clone();
//! let listeners = Listeners::new().with(move |e: &Event<'_>| {
//!     if let Event::StateTransition { .. } = e {
//!         seen.fetch_add(1, Ordering::Relaxed);
//!     }
//! });
//! # let _ = listeners;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::circuit_breaker::state::State;
use crate::outcome::Outcome;

/// Something a policy did. Borrowed, so emitting never allocates.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// A circuit breaker changed state.
    StateTransition {
        /// The breaker's name.
        name: &'a str,
        /// The state it left.
        from: State,
        /// The state it entered.
        to: State,
    },
    /// A circuit breaker rejected a call.
    CallNotPermitted {
        /// The breaker's name.
        name: &'a str,
        /// The state that rejected it.
        state: State,
    },
    /// A circuit breaker's failure rate reached its threshold (also emitted in metrics-only mode).
    FailureRateExceeded {
        /// The breaker's name.
        name: &'a str,
        /// The failure rate in percent.
        failure_rate: f32,
    },
    /// A circuit breaker's slow-call rate reached its threshold (also emitted in metrics-only mode).
    SlowCallRateExceeded {
        /// The breaker's name.
        name: &'a str,
        /// The slow-call rate in percent.
        slow_call_rate: f32,
    },
    /// A retry policy will make another attempt after `delay`.
    RetryScheduled {
        /// The policy's name.
        name: &'a str,
        /// The attempt that just ended (1 for the first call).
        attempt: u32,
        /// How it ended.
        outcome: Outcome,
        /// How long until the next attempt.
        delay: Duration,
    },
    /// A retry policy gave up.
    RetryGaveUp {
        /// The policy's name.
        name: &'a str,
        /// Attempts made.
        attempts: u32,
        /// How the last attempt ended.
        outcome: Outcome,
        /// Why no further attempt was made.
        reason: GiveUpReason,
    },
    /// A bulkhead rejected a call.
    BulkheadRejected {
        /// The bulkhead's name.
        name: &'a str,
        /// True when the call waited in the queue and the wait ran out; false when the queue was full.
        waited: bool,
    },
    /// A rate limiter found a call over the limit (and rejected it unless in shadow mode).
    RateLimited {
        /// The limiter's name.
        name: &'a str,
        /// True in shadow mode: the call was counted but let through.
        shadow: bool,
    },
    /// A load shedder rejected a call.
    Shed {
        /// The shedder's name.
        name: &'a str,
        /// The priority of the rejected call.
        priority: crate::shed::priority::Priority,
        /// The concurrency limit in force.
        limit: usize,
    },
    /// An adaptive concurrency limit changed.
    LimitChanged {
        /// The limiter's name.
        name: &'a str,
        /// The old limit.
        from: usize,
        /// The new limit.
        to: usize,
    },
    /// A timeout fired and the call was cancelled.
    TimedOut {
        /// The policy's name.
        name: &'a str,
        /// The timeout that fired.
        after: Duration,
    },
    /// Distributed mode: a shared breaker moved with its fleet. `instance` names the instance that decided (this
    /// one, or another).
    FleetTransition {
        /// The breaker's name.
        name: &'a str,
        /// The state it left here.
        from: State,
        /// The state it entered.
        to: State,
        /// The instance whose decision it was (empty when none decided: the fleet's first state).
        instance: &'a str,
    },
    /// Distributed mode: the shared state cannot be reached; every shared breaker decides alone, from its own
    /// window, until it can.
    SharedStateDegraded {
        /// The store (its address, without credentials).
        store: &'a str,
        /// What failed.
        error: &'a str,
    },
    /// Distributed mode: the shared state is reachable again and the shared breakers follow their fleet.
    SharedStateRestored {
        /// The store.
        store: &'a str,
        /// How long it could not be reached.
        after: Duration,
    },
    /// A fallback answered instead of the call.
    FallbackUsed {
        /// The policy's name.
        name: &'a str,
        /// The outcome the fallback replaced.
        outcome: Outcome,
    },
    /// A hedged attempt was launched because the earlier ones were slow.
    HedgeLaunched {
        /// The policy's name.
        name: &'a str,
        /// The attempt number launched (2 for the first hedge).
        attempt: u32,
    },
    /// A fault was injected.
    FaultInjected {
        /// The policy's name.
        name: &'a str,
        /// The outcome forced, if the fault aborts the call.
        abort: Option<Outcome>,
        /// The latency added, if any.
        delay: Option<Duration>,
    },
}

/// Why a retry policy stopped.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The last outcome is not retryable.
    NotRetryable,
    /// The call itself may not be repeated (its classifier said so: e.g. a request that is not idempotent).
    NotReplayable,
    /// `max_attempts` were made.
    AttemptsExhausted,
    /// The retry budget had no tokens left.
    BudgetExhausted,
    /// The next attempt could not finish before the deadline.
    DeadlineTooClose,
    /// The server asked for a longer wait (Retry-After) than the policy's maximum delay.
    RetryAfterTooLong,
}

impl GiveUpReason {
    /// Every reason, in declaration order.
    pub const ALL: [GiveUpReason; 6] = [
        GiveUpReason::NotRetryable,
        GiveUpReason::NotReplayable,
        GiveUpReason::AttemptsExhausted,
        GiveUpReason::BudgetExhausted,
        GiveUpReason::DeadlineTooClose,
        GiveUpReason::RetryAfterTooLong,
    ];

    /// The reason's name in metrics (`reason` label of `envelope_retries_given_up_total`) and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUpReason::NotRetryable => "not_retryable",
            GiveUpReason::NotReplayable => "not_replayable",
            GiveUpReason::AttemptsExhausted => "attempts_exhausted",
            GiveUpReason::BudgetExhausted => "budget_exhausted",
            GiveUpReason::DeadlineTooClose => "deadline",
            GiveUpReason::RetryAfterTooLong => "retry_after_too_long",
        }
    }
}

/// Receives events. Implemented for every `Fn(&Event<'_>) + Send + Sync`.
pub trait Listener: Send + Sync + 'static {
    /// Called synchronously, on the thread that made the decision, outside any lock of the policy.
    fn on_event(&self, event: &Event<'_>);
}

impl<F> Listener for F
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event<'_>) {
        self(event)
    }
}

/// A cheap-to-clone list of listeners. Empty by default; emitting to an empty list is one branch.
#[derive(Clone, Default)]
pub struct Listeners(Option<Arc<[Arc<dyn Listener>]>>);

impl Listeners {
    /// No listeners.
    pub fn new() -> Self {
        Listeners(None)
    }

    /// This list plus `listener`.
    pub fn with(self, listener: impl Listener) -> Self {
        self.with_arc(Arc::new(listener))
    }

    /// This list plus a shared `listener`.
    pub fn with_arc(self, listener: Arc<dyn Listener>) -> Self {
        let mut all: Vec<Arc<dyn Listener>> = self.0.map(|l| l.to_vec()).unwrap_or_default();
        all.push(listener);
        Listeners(Some(all.into()))
    }

    /// Whether any listener is registered.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Sends `event` to every listener.
    #[inline]
    pub fn emit(&self, event: Event<'_>) {
        if let Some(all) = &self.0 {
            for l in all.iter() {
                l.on_event(&event);
            }
        }
    }
}

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners").field("count", &self.0.as_ref().map_or(0, |l| l.len())).finish()
    }
}
