//! Load shedding: refuse work early, at admission, when taking it would only make everyone slower.
//!
//! A [`LoadShedder`] caps the calls in flight with a limit that is either fixed ([`Limit::Fixed`], Envoy's
//! `max_requests`, tower's `ConcurrencyLimit` without the waiting) or adaptive ([`Limit::Adaptive`], a Gradient2
//! limiter, see [`adaptive`]). Rejection is immediate: it costs one atomic operation and never waits.
//!
//! Calls carry a [`Priority`] (from the SLO tier of their route): each priority may only use a share of the limit
//! (by default non-critical 75 %, default 90 %, critical 100 %), so as load rises non-critical work is shed first
//! and critical work last (Google SRE's criticality).
//!
//! ```
//! use envelope_core::shed::{Limit, LoadShedder, Priority};
//!
//! let shedder = LoadShedder::new("inbound", Limit::Fixed(100));
//! let permit = shedder.try_acquire(Priority::Critical).expect("room for one");
//! drop(permit); // or permit.record(outcome) to feed an adaptive limit
//! ```

pub mod adaptive;
mod error;

use std::fmt;
use std::time::Duration;

pub use error::Overloaded;

use self::adaptive::{Gradient, GradientConfig, InvalidGradient};
use crate::clock::{self, Instant};
use crate::event::{Event, Listeners};
use crate::outcome::Outcome;
use crate::sync::{Arc, AtomicU64, AtomicUsize, Ordering};

/// How important a call is; lower priorities are shed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Analytics, reports, prefetch: shed first.
    NonCritical,
    /// Ordinary API traffic.
    Default,
    /// Authentication, payments: shed last.
    Critical,
}

impl Priority {
    /// The stable name used in metrics and config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::NonCritical => "non_critical",
            Priority::Default => "default",
            Priority::Critical => "critical",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default share of the limit usable by each priority, in percent: non-critical, default, critical.
pub const DEFAULT_SHARES: [u8; 3] = [75, 90, 100];

/// Where the concurrency limit comes from.
#[derive(Debug, Clone)]
pub enum Limit {
    /// A fixed limit.
    Fixed(usize),
    /// A limit that follows the observed latency.
    Adaptive(GradientConfig),
}

/// A load shedder. Cloning is cheap and every clone shares the same limit and in-flight count.
#[derive(Clone)]
pub struct LoadShedder {
    shared: Arc<Shared>,
}

struct Shared {
    name: std::sync::Arc<str>,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    shares: [u8; 3],
    gradient: Option<Gradient>,
    shed: AtomicU64,
    epoch: Instant,
    listeners: Listeners,
}

/// What a shedder reports about itself.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// The limit in force.
    pub limit: usize,
    /// Calls in flight.
    pub in_flight: usize,
    /// Calls shed since creation.
    pub shed: u64,
}

/// Why a shedder configuration is invalid.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A fixed limit of zero.
    ZeroLimit,
    /// A priority share outside 1..=100 percent.
    Share(u8),
    /// An invalid adaptive limit.
    Adaptive(InvalidGradient),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroLimit => f.write_str("a fixed limit must be at least 1"),
            ConfigError::Share(s) => write!(f, "priority share {s} must be between 1 and 100 percent"),
            ConfigError::Adaptive(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConfigError {}

impl LoadShedder {
    /// A shedder named `name` with the default priority shares. Panics on an invalid limit; see
    /// [`LoadShedder::try_new`].
    pub fn new(name: impl Into<std::sync::Arc<str>>, limit: Limit) -> Self {
        Self::with_shares(name, limit, DEFAULT_SHARES)
    }

    /// A shedder with custom shares (percent of the limit per priority: non-critical, default, critical). Panics
    /// on an invalid configuration; see [`LoadShedder::try_new`].
    pub fn with_shares(name: impl Into<std::sync::Arc<str>>, limit: Limit, shares: [u8; 3]) -> Self {
        match Self::try_new(name, limit, shares, Listeners::new()) {
            Ok(s) => s,
            Err(e) => panic!("invalid load shedder config: {e}"),
        }
    }

    /// A shedder that reports to `listeners`, or why the configuration is invalid.
    pub fn try_new(
        name: impl Into<std::sync::Arc<str>>,
        limit: Limit,
        shares: [u8; 3],
        listeners: Listeners,
    ) -> Result<Self, ConfigError> {
        if let Some(bad) = shares.iter().find(|s| !(1..=100).contains(*s)) {
            return Err(ConfigError::Share(*bad));
        }
        let (initial, gradient) = match limit {
            Limit::Fixed(0) => return Err(ConfigError::ZeroLimit),
            Limit::Fixed(n) => (n, None),
            Limit::Adaptive(config) => {
                config.validate().map_err(ConfigError::Adaptive)?;
                let g = Gradient::new(config);
                (g.initial_limit(), Some(g))
            }
        };
        Ok(LoadShedder {
            shared: Arc::new(Shared {
                name: name.into(),
                in_flight: AtomicUsize::new(0),
                limit: AtomicUsize::new(initial),
                shares,
                gradient,
                shed: AtomicU64::new(0),
                epoch: clock::now(),
                listeners,
            }),
        })
    }

    /// Admits a call of `priority`, or sheds it at once.
    #[inline]
    pub fn try_acquire(&self, priority: Priority) -> Result<Permit, Overloaded> {
        let s = &self.shared;
        let limit = s.limit.load(Ordering::Relaxed);
        let allowed = (limit * usize::from(s.shares[priority as usize])).div_ceil(100).max(1);
        let mut current = s.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= allowed {
                return Err(s.reject(priority, limit));
            }
            match s.in_flight.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        let start = if s.gradient.is_some() { Some(clock::now()) } else { None };
        Ok(Permit { shared: s.clone(), start, in_flight: current + 1 })
    }

    /// The limit in force now.
    pub fn limit(&self) -> usize {
        self.shared.limit.load(Ordering::Relaxed)
    }

    /// Sets a fixed limit (ignored by an adaptive shedder, which sets its own).
    pub fn set_limit(&self, limit: usize) {
        if self.shared.gradient.is_none() {
            self.shared.limit.store(limit.max(1), Ordering::Relaxed);
        }
    }

    /// What the shedder knows now.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            limit: self.limit(),
            in_flight: self.shared.in_flight.load(Ordering::Relaxed),
            shed: self.shared.shed.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    #[cold]
    fn reject(&self, priority: Priority, limit: usize) -> Overloaded {
        self.shed.fetch_add(1, Ordering::Relaxed);
        self.listeners.emit(Event::Shed { name: &self.name, priority, limit });
        Overloaded { priority, limit }
    }

    fn sample(&self, rtt: Duration, in_flight: usize, dropped: bool, now: Instant) {
        let Some(g) = &self.gradient else { return };
        let now = clock::nanos_since(self.epoch, now);
        if let Some((from, to)) = g.sample(rtt, in_flight, dropped, now) {
            self.limit.store(to, Ordering::Relaxed);
            self.listeners.emit(Event::LimitChanged { name: &self.name, from, to });
        }
    }
}

impl fmt::Debug for LoadShedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShedder").field("name", &self.shared.name).field("metrics", &self.metrics()).finish()
    }
}

/// A slot in the shedder; freed when dropped. Record the outcome to feed an adaptive limit.
#[must_use = "the slot is freed as soon as the permit is dropped"]
pub struct Permit {
    shared: Arc<Shared>,
    start: Option<Instant>,
    in_flight: usize,
}

impl Permit {
    /// Frees the slot and, for an adaptive limit, reports the call's latency. Timeouts count as drops (a strong
    /// overload signal); local rejections and cancellations carry no latency information and are not sampled.
    pub fn record(mut self, outcome: Outcome) {
        if let Some(start) = self.start.take()
            && !outcome.is_local_rejection()
            && outcome != Outcome::ClientCancelled
        {
            let now = clock::now();
            let dropped = outcome == Outcome::Timeout;
            self.shared.sample(now.saturating_duration_since(start), self.in_flight, dropped, now);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("shed::Permit").field("in_flight", &self.in_flight).finish()
    }
}
