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
//! use envelope_core::shed::{Config, LoadShedder, Priority};
//!
//! let shedder = LoadShedder::new("inbound", Config::builder().fixed(100).build()?);
//! let permit = shedder.try_acquire(Priority::Critical).expect("room for one");
//! drop(permit); // or permit.record(outcome) to feed an adaptive limit
//! # Ok::<(), envelope_core::shed::ConfigError>(())
//! ```

pub mod adaptive;
pub(crate) mod error;
pub(crate) mod priority;

use std::fmt;
use std::time::Duration;

pub use error::Overloaded;
pub use priority::Priority;

use self::adaptive::{Gradient, GradientConfig, InvalidGradient};
use crate::clock::{self, Instant};
use crate::event::{Event, Listeners};
use crate::outcome::Outcome;
use crate::sync::{Arc, AtomicU64, AtomicUsize, Ordering};

/// Default share of the limit usable by each priority, in percent: non-critical, default, critical.
pub const DEFAULT_SHARES: [u8; 3] = [75, 90, 100];

/// Where the concurrency limit comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Limit {
    /// A fixed limit.
    Fixed(usize),
    /// A limit that follows the observed latency.
    Adaptive(GradientConfig),
}

/// `fixed 100`, or `adaptive 1..=1000` (the adaptive limit's range).
impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Fixed(n) => write!(f, "fixed {n}"),
            Limit::Adaptive(g) => write!(f, "adaptive {}..={}", g.min_limit, g.max_limit),
        }
    }
}

/// A validated load-shedder configuration. Build one with [`Config::builder`]; the default is an adaptive limit
/// with the gradient limiter's defaults ([`adaptive::GradientConfig`]) and [`DEFAULT_SHARES`].
#[derive(Debug, Clone)]
pub struct Config {
    limit: Limit,
    shares: [u8; 3],
    listeners: Listeners,
}

impl Default for Config {
    fn default() -> Self {
        Builder::default().build().expect("defaults are valid")
    }
}

/// Two configs are equal when their settings are: where their events go is not a setting.
impl PartialEq for Config {
    fn eq(&self, other: &Config) -> bool {
        self.limit == other.limit && self.shares == other.shares
    }
}

impl Config {
    /// A builder starting from the documented defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The limit.
    pub fn limit(&self) -> &Limit {
        &self.limit
    }

    /// The share of the limit each priority may use, in percent: non-critical, default, critical.
    pub fn shares(&self) -> [u8; 3] {
        self.shares
    }

    /// The same settings, reporting to `listeners` instead (listeners are not validated: this cannot fail).
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }
}

/// Builds a shedder [`Config`]; every setter starts from the documented default.
#[derive(Debug, Clone)]
pub struct Builder {
    config: Config,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            config: Config {
                limit: Limit::Adaptive(GradientConfig::default()),
                shares: DEFAULT_SHARES,
                listeners: Listeners::new(),
            },
        }
    }
}

impl Builder {
    /// A fixed limit of `n` calls in flight.
    pub fn fixed(self, n: usize) -> Self {
        self.limit(Limit::Fixed(n))
    }
    /// An adaptive limit with these settings.
    pub fn adaptive(self, config: GradientConfig) -> Self {
        self.limit(Limit::Adaptive(config))
    }
    /// The limit.
    pub fn limit(mut self, limit: Limit) -> Self {
        self.config.limit = limit;
        self
    }
    /// The share of the limit each priority may use, in percent (1..=100): non-critical, default, critical.
    pub fn shares(mut self, shares: [u8; 3]) -> Self {
        self.config.shares = shares;
        self
    }
    /// Sends events to `listener` too.
    pub fn listener(mut self, listener: impl crate::event::Listener) -> Self {
        self.config.listeners = self.config.listeners.with(listener);
        self
    }
    /// Use exactly these listeners.
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.config.listeners = listeners;
        self
    }
    /// Validates the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.config;
        if let Some(bad) = c.shares.iter().find(|s| !(1..=100).contains(*s)) {
            return Err(ConfigError::Share(*bad));
        }
        match &c.limit {
            Limit::Fixed(0) => return Err(ConfigError::ZeroLimit),
            Limit::Fixed(_) => {}
            Limit::Adaptive(g) => g.validate().map_err(ConfigError::Adaptive)?,
        }
        Ok(c)
    }
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
    /// An adaptive limit's baseline latency (the lowest recent window's mean), once it has one.
    pub baseline_latency: Option<Duration>,
    /// An adaptive limit's latency in its last window (mean), once one has closed.
    pub sampled_latency: Option<Duration>,
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
    /// A shedder named `name` (a validated configuration cannot fail).
    pub fn new(name: impl Into<std::sync::Arc<str>>, config: Config) -> Self {
        let Config { limit, shares, listeners } = config;
        let (initial, gradient) = match limit {
            Limit::Fixed(n) => (n, None),
            Limit::Adaptive(config) => {
                let g = Gradient::new(config);
                (g.initial_limit(), Some(g))
            }
        };
        LoadShedder {
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
        }
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
        let (baseline_latency, sampled_latency) = self.shared.gradient.as_ref().map_or((None, None), Gradient::inputs);
        Metrics {
            limit: self.limit(),
            in_flight: self.shared.in_flight.load(Ordering::Relaxed),
            shed: self.shared.shed.load(Ordering::Relaxed),
            baseline_latency,
            sampled_latency,
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
