//! Fault injection: make a share of calls fail or slow down on purpose (Polly's chaos strategies, Envoy's fault
//! filter). Quality scenarios use it to check that the other policies respond as promised.
//!
//! A [`FaultInjector`] is inactive until a [`Fault`] is set, and then costs one atomic load per call. A fault can
//! expire by itself (`until`), so a scenario that crashes never leaves faults behind.
//!
//! ```
//! use envelope_core::fault::{Fault, FaultInjector};
//! use envelope_core::Outcome;
//!
//! let faults = FaultInjector::new("payments");
//! faults.set(Fault::abort(Outcome::Upstream5xx, 10.0), None).unwrap(); // 10 % of calls fail
//! assert!(faults.set(Fault::abort(Outcome::Timeout, 150.0), None).is_err());
//! faults.clear();
//! ```

use std::fmt;
use std::time::Duration;

use crate::clock::{self, Instant};
use crate::event::{Event, Listeners};
use crate::outcome::{HasOutcome, Outcome};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, lock};

/// A fault: abort some calls with an outcome, delay some calls, or both.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// Abort with this outcome, for `abort_percent` of calls.
    pub abort: Option<Outcome>,
    /// Share of calls aborted, in percent.
    pub abort_percent: f64,
    /// Add this latency, for `delay_percent` of calls.
    pub delay: Option<Duration>,
    /// Share of calls delayed, in percent.
    pub delay_percent: f64,
}

impl Fault {
    /// Aborts `percent` of calls with `outcome`.
    pub fn abort(outcome: Outcome, percent: f64) -> Self {
        Fault { abort: Some(outcome), abort_percent: percent, delay: None, delay_percent: 0.0 }
    }

    /// Delays `percent` of calls by `delay`.
    pub fn delay(delay: Duration, percent: f64) -> Self {
        Fault { abort: None, abort_percent: 0.0, delay: Some(delay), delay_percent: percent }
    }

    /// This fault, also delaying `percent` of calls by `delay`.
    pub fn with_delay(mut self, delay: Duration, percent: f64) -> Self {
        self.delay = Some(delay);
        self.delay_percent = percent;
        self
    }

    /// Checks that both percentages are in [0, 100].
    pub fn validate(&self) -> Result<(), InvalidFault> {
        for (field, p) in [("abort_percent", self.abort_percent), ("delay_percent", self.delay_percent)] {
            if !(0.0..=100.0).contains(&p) {
                return Err(InvalidFault { field, value: p });
            }
        }
        Ok(())
    }
}

/// A fault with a percentage outside [0, 100].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InvalidFault {
    field: &'static str,
    value: f64,
}

impl fmt::Display for InvalidFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} must be in [0, 100]", self.field, self.value)
    }
}

impl std::error::Error for InvalidFault {}

/// What to do to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then fail with this outcome instead of making the call.
    pub abort: Option<Outcome>,
}

/// The call was aborted by fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    pub(crate) outcome: Outcome,
}

impl InjectedFault {
    /// A fault standing for `outcome`.
    pub fn new(outcome: Outcome) -> Self {
        InjectedFault { outcome }
    }
}

impl HasOutcome for InjectedFault {
    fn outcome(&self) -> Outcome {
        self.outcome
    }
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injected fault: {}", self.outcome)
    }
}

impl std::error::Error for InjectedFault {}

/// Injects faults, when one is set. Cloning shares the setting.
#[derive(Clone)]
pub struct FaultInjector {
    shared: Arc<Shared>,
}

struct Shared {
    name: std::sync::Arc<str>,
    active: AtomicBool,
    current: Mutex<Option<(Fault, Option<Instant>)>>,
    listeners: Listeners,
}

impl FaultInjector {
    /// An inactive injector.
    pub fn new(name: impl Into<std::sync::Arc<str>>) -> Self {
        Self::with_listeners(name, Listeners::new())
    }

    /// An inactive injector that reports to `listeners`.
    pub fn with_listeners(name: impl Into<std::sync::Arc<str>>, listeners: Listeners) -> Self {
        FaultInjector {
            shared: Arc::new(Shared {
                name: name.into(),
                active: AtomicBool::new(false),
                current: Mutex::new(None),
                listeners,
            }),
        }
    }

    /// Injects `fault` from now on, until `until` (or until cleared). An invalid fault is refused and the
    /// current one kept.
    pub fn set(&self, fault: Fault, until: Option<Instant>) -> Result<(), InvalidFault> {
        fault.validate()?;
        *lock(&self.shared.current) = Some((fault, until));
        self.shared.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops injecting.
    pub fn clear(&self) {
        *lock(&self.shared.current) = None;
        self.shared.active.store(false, Ordering::Release);
    }

    /// The fault in force, if any.
    pub fn current(&self) -> Option<Fault> {
        if !self.shared.active.load(Ordering::Acquire) {
            return None;
        }
        let now = clock::now();
        let mut current = lock(&self.shared.current);
        match *current {
            Some((fault, until)) if until.is_none_or(|u| now < u) => Some(fault),
            _ => {
                // Expired: back to the one-load fast path.
                *current = None;
                self.shared.active.store(false, Ordering::Release);
                None
            }
        }
    }

    /// When the fault in force ends by itself, if it does.
    pub fn until(&self) -> Option<Instant> {
        self.current()?;
        lock(&self.shared.current).and_then(|(_, until)| until)
    }

    /// Decides what to do to the next call.
    #[inline]
    pub fn decide(&self) -> Decision {
        if !self.shared.active.load(Ordering::Acquire) {
            return Decision::default();
        }
        self.decide_active()
    }

    #[cold]
    fn decide_active(&self) -> Decision {
        let Some(fault) = self.current() else {
            return Decision::default();
        };
        let hit = |percent: f64| percent > 0.0 && fastrand::f64() * 100.0 < percent;
        let decision = Decision {
            delay: fault.delay.filter(|_| hit(fault.delay_percent)),
            abort: fault.abort.filter(|_| hit(fault.abort_percent)),
        };
        if decision != Decision::default() {
            self.shared.listeners.emit(Event::FaultInjected {
                name: &self.shared.name,
                abort: decision.abort,
                delay: decision.delay,
            });
        }
        decision
    }
}

impl fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjector").field("name", &self.shared.name).field("fault", &self.current()).finish()
    }
}
