//! Circuit breaker configuration: named defaults, a builder, and validation into a config that cannot be invalid.

use std::fmt;
use std::time::Duration;

use crate::event::{Listener, Listeners};
use crate::outcome::{BreakerVerdict, Outcome};

/// Default sliding window: the last 100 calls (resilience4j's default).
pub const DEFAULT_WINDOW: Window = Window::Count(100);
/// Default minimum number of calls in the window before any verdict.
///
/// resilience4j waits for 100. At the few requests per second many dependencies see, that is half a minute or more
/// of a dependency failing outright before the breaker may trip; 20 calls still keep a verdict from resting on a
/// handful. One set of defaults serves the library, the sidecar and the Python package.
pub const DEFAULT_MINIMUM_CALLS: u32 = 20;
/// Default failure-rate threshold in percent; the breaker trips at or above it.
pub const DEFAULT_FAILURE_RATE_THRESHOLD: f32 = 50.0;
/// Default duration above which a call counts as slow: none, slow-call detection is off.
///
/// resilience4j times every call (60 s at 100 % by default, which only ever catches a fully hung dependency, the
/// timeout's job). Timing a call costs two clock reads — here about 45 ns, more than the rest of the breaker — so
/// Envelope times calls only when slow-call detection is asked for with [`Builder::slow_calls`].
pub const DEFAULT_SLOW_CALL_DURATION: Option<Duration> = None;
/// Default slow-call-rate threshold in percent; the breaker trips at or above it.
pub const DEFAULT_SLOW_CALL_RATE_THRESHOLD: f32 = 100.0;
/// Default time the breaker stays open before it lets probes through (resilience4j: 60 s; Envoy's outlier
/// detection ejects for 30 s). Escalation ([`Builder::escalation`]) lengthens it for a dependency that stays down.
pub const DEFAULT_OPEN_DURATION: Duration = Duration::from_secs(30);
/// Default number of probe calls admitted in half-open (resilience4j: 10). Each probe to a dependency that is
/// still down is a failed request; three are enough to tell a recovered dependency from a lucky call.
pub const DEFAULT_HALF_OPEN_CALLS: u32 = 3;
/// Default longest stay in half-open before the breaker re-opens, so a hung probe cannot wedge it.
/// resilience4j waits forever by default; we do not.
pub const DEFAULT_MAX_HALF_OPEN_WAIT: Duration = Duration::from_secs(60);
/// Largest count window (the bit-set window is sized for it).
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;
/// Largest time window in seconds (one bucket per second).
pub const MAX_TIME_WINDOW_SECS: u32 = 3600;
/// Largest number of half-open probes.
pub const MAX_HALF_OPEN_CALLS: u32 = 1 << 15;

/// How the breaker looks back at recent calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last `n` seconds, in one-second buckets.
    Time(u32),
}

/// How the open duration grows when the breaker re-opens without closing in between (Polly's escalating break).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Escalation {
    /// Each re-open multiplies the previous open duration by this (≥ 1).
    pub multiplier: f64,
    /// The open duration never exceeds this.
    pub max: Duration,
    /// Fraction in [0, 1] of the duration that is randomised away: 0.2 means the duration is uniformly drawn
    /// from [0.8 d, d].
    pub jitter: f64,
}

impl Escalation {
    /// Doubling, capped at `max`, no jitter.
    pub fn doubling(max: Duration) -> Self {
        Escalation { multiplier: 2.0, max, jitter: 0.0 }
    }
}

/// Why a breaker configuration is invalid.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    /// A window of zero or more than the maximum.
    WindowSize(Window),
    /// Minimum calls of zero, or larger than a count window.
    MinimumCalls {
        /// The minimum given.
        minimum: u32,
        /// The window it must fit in.
        window: Window,
    },
    /// A rate threshold outside (0, 100].
    Threshold {
        /// Which threshold.
        field: &'static str,
        /// Its value.
        value: f32,
    },
    /// Zero or too many half-open calls.
    HalfOpenCalls(u32),
    /// A zero open duration or half-open wait.
    ZeroDuration(&'static str),
    /// An escalation with a multiplier below 1, a jitter outside [0, 1], or a cap below the open duration.
    Escalation(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::WindowSize(w) => write!(
                f,
                "window {w:?} must be between 1 and {MAX_COUNT_WINDOW} calls or 1 and {MAX_TIME_WINDOW_SECS} seconds"
            ),
            ConfigError::MinimumCalls { minimum, window } => {
                write!(f, "minimum calls {minimum} must be at least 1 and fit in window {window:?}")
            }
            ConfigError::Threshold { field, value } => write!(f, "{field} {value} must be in (0, 100]"),
            ConfigError::HalfOpenCalls(n) => {
                write!(f, "half-open calls {n} must be between 1 and {MAX_HALF_OPEN_CALLS}")
            }
            ConfigError::ZeroDuration(field) => write!(f, "{field} must be greater than zero"),
            ConfigError::Escalation(why) => write!(f, "escalation: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A validated circuit breaker configuration. Build one with [`Config::builder`].
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) window: Window,
    pub(crate) minimum_calls: u32,
    /// Thresholds in parts per million of calls, so that "5 of 10 at 50 %" is exact integer arithmetic.
    pub(crate) failure_ppm: u64,
    pub(crate) slow_ppm: u64,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) open_duration: Duration,
    pub(crate) escalation: Option<Escalation>,
    pub(crate) half_open_calls: u32,
    pub(crate) max_half_open_wait: Option<Duration>,
    pub(crate) verdicts: [BreakerVerdict; Outcome::ALL.len()],
    pub(crate) listeners: Listeners,
    failure_rate_threshold: f32,
    slow_call_rate_threshold: f32,
}

impl Default for Config {
    fn default() -> Self {
        Builder::default().build().expect("defaults are valid")
    }
}

/// Two configs are equal when their settings are: where their events go is not a setting.
impl PartialEq for Config {
    fn eq(&self, other: &Config) -> bool {
        self.window == other.window
            && self.minimum_calls == other.minimum_calls
            && self.failure_ppm == other.failure_ppm
            && self.slow_ppm == other.slow_ppm
            && self.slow_call_duration == other.slow_call_duration
            && self.open_duration == other.open_duration
            && self.escalation == other.escalation
            && self.half_open_calls == other.half_open_calls
            && self.max_half_open_wait == other.max_half_open_wait
            && self.verdicts == other.verdicts
            && self.failure_rate_threshold == other.failure_rate_threshold
            && self.slow_call_rate_threshold == other.slow_call_rate_threshold
    }
}

impl Config {
    /// A builder starting from the documented defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The same settings, reporting to `listeners` instead (listeners are not validated: this cannot fail).
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// The sliding window.
    pub fn window(&self) -> Window {
        self.window
    }
    /// Calls needed in the window before any verdict.
    pub fn minimum_calls(&self) -> u32 {
        self.minimum_calls
    }
    /// Failure-rate threshold in percent.
    pub fn failure_rate_threshold(&self) -> f32 {
        self.failure_rate_threshold
    }
    /// Slow-call-rate threshold in percent.
    pub fn slow_call_rate_threshold(&self) -> f32 {
        self.slow_call_rate_threshold
    }
    /// Duration above which a call is slow, if slow-call detection is on.
    pub fn slow_call_duration(&self) -> Option<Duration> {
        self.slow_call_duration
    }
    /// Base open duration.
    pub fn open_duration(&self) -> Duration {
        self.open_duration
    }
    /// Escalation of the open duration, if any.
    pub fn escalation(&self) -> Option<Escalation> {
        self.escalation
    }
    /// Probes admitted in half-open.
    pub fn half_open_calls(&self) -> u32 {
        self.half_open_calls
    }
    /// Longest stay in half-open.
    pub fn max_half_open_wait(&self) -> Option<Duration> {
        self.max_half_open_wait
    }
    /// What `outcome` means to this breaker.
    pub fn verdict(&self, outcome: Outcome) -> BreakerVerdict {
        self.verdicts[outcome as usize]
    }

    /// The open duration after `opens` consecutive opens (1 for the first), before jitter.
    pub(crate) fn open_duration_for(&self, opens: u32) -> Duration {
        match self.escalation {
            None => self.open_duration,
            Some(e) => {
                let factor = e.multiplier.powi(opens.saturating_sub(1).min(1024) as i32);
                let secs = (self.open_duration.as_secs_f64() * factor).min(e.max.as_secs_f64());
                let base = Duration::from_secs_f64(secs);
                if e.jitter > 0.0 { base.mul_f64(1.0 - e.jitter * fastrand::f64()) } else { base }
            }
        }
    }
}

/// Builds a [`Config`]; every setter starts from the documented default.
#[derive(Clone)]
pub struct Builder {
    window: Window,
    minimum_calls: u32,
    failure_rate_threshold: f32,
    slow_call_rate_threshold: f32,
    slow_call_duration: Option<Duration>,
    open_duration: Duration,
    escalation: Option<Escalation>,
    half_open_calls: u32,
    max_half_open_wait: Option<Duration>,
    verdicts: [BreakerVerdict; Outcome::ALL.len()],
    listeners: Listeners,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            window: DEFAULT_WINDOW,
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            failure_rate_threshold: DEFAULT_FAILURE_RATE_THRESHOLD,
            slow_call_rate_threshold: DEFAULT_SLOW_CALL_RATE_THRESHOLD,
            slow_call_duration: DEFAULT_SLOW_CALL_DURATION,
            open_duration: DEFAULT_OPEN_DURATION,
            escalation: None,
            half_open_calls: DEFAULT_HALF_OPEN_CALLS,
            max_half_open_wait: Some(DEFAULT_MAX_HALF_OPEN_WAIT),
            verdicts: Outcome::ALL.map(Outcome::breaker_verdict),
            listeners: Listeners::new(),
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder").field("window", &self.window).finish_non_exhaustive()
    }
}

impl Builder {
    /// Look back at the last `n` calls.
    pub fn count_window(mut self, n: u32) -> Self {
        self.window = Window::Count(n);
        self
    }
    /// Look back at the calls of the last `secs` seconds.
    pub fn time_window(mut self, secs: u32) -> Self {
        self.window = Window::Time(secs);
        self
    }
    /// Calls needed in the window before any verdict.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.minimum_calls = n;
        self
    }
    /// Trip when the failure rate is at or above `percent`.
    pub fn failure_rate_threshold(mut self, percent: f32) -> Self {
        self.failure_rate_threshold = percent;
        self
    }
    /// Trip when the share of calls slower than `duration` is at or above `percent` (turns slow-call detection
    /// on; see [`DEFAULT_SLOW_CALL_DURATION`]).
    pub fn slow_calls(mut self, duration: Duration, percent: f32) -> Self {
        self.slow_call_duration = Some(duration);
        self.slow_call_rate_threshold = percent;
        self
    }
    /// Stay open this long before admitting probes.
    pub fn open_duration(mut self, d: Duration) -> Self {
        self.open_duration = d;
        self
    }
    /// Grow the open duration on consecutive re-opens; it resets when the breaker closes.
    pub fn escalation(mut self, e: Escalation) -> Self {
        self.escalation = Some(e);
        self
    }
    /// Admit exactly `n` probes in half-open; their failure rate decides between closed and open.
    pub fn half_open_calls(mut self, n: u32) -> Self {
        self.half_open_calls = n;
        self
    }
    /// Re-open if half-open lasts longer than `d` (`None`: wait forever, as resilience4j does by default).
    pub fn max_half_open_wait(mut self, d: Option<Duration>) -> Self {
        self.max_half_open_wait = d;
        self
    }
    /// Record `outcome` as `verdict` instead of its default ([`Outcome::breaker_verdict`]).
    pub fn record(mut self, outcome: Outcome, verdict: BreakerVerdict) -> Self {
        self.verdicts[outcome as usize] = verdict;
        self
    }
    /// Send events to `listener` too.
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.listeners = self.listeners.with(listener);
        self
    }
    /// Use exactly these listeners.
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// Validates the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        match self.window {
            Window::Count(n) if n == 0 || n > MAX_COUNT_WINDOW => return Err(ConfigError::WindowSize(self.window)),
            Window::Time(s) if s == 0 || s > MAX_TIME_WINDOW_SECS => {
                return Err(ConfigError::WindowSize(self.window));
            }
            _ => {}
        }
        let fits = match self.window {
            Window::Count(n) => self.minimum_calls <= n,
            Window::Time(_) => true,
        };
        if self.minimum_calls == 0 || !fits {
            return Err(ConfigError::MinimumCalls { minimum: self.minimum_calls, window: self.window });
        }
        let failure_ppm = threshold_ppm("failure_rate_threshold", self.failure_rate_threshold)?;
        let slow_ppm = threshold_ppm("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        if self.half_open_calls == 0 || self.half_open_calls > MAX_HALF_OPEN_CALLS {
            return Err(ConfigError::HalfOpenCalls(self.half_open_calls));
        }
        if self.open_duration.is_zero() {
            return Err(ConfigError::ZeroDuration("open_duration"));
        }
        if self.slow_call_duration.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("slow_call_duration"));
        }
        if self.max_half_open_wait.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("max_half_open_wait"));
        }
        if let Some(e) = self.escalation {
            if !(e.multiplier >= 1.0 && e.multiplier.is_finite()) {
                return Err(ConfigError::Escalation("multiplier must be a finite number >= 1"));
            }
            if !(0.0..=1.0).contains(&e.jitter) {
                return Err(ConfigError::Escalation("jitter must be in [0, 1]"));
            }
            if e.max < self.open_duration {
                return Err(ConfigError::Escalation("max must be at least the open duration"));
            }
        }
        Ok(Config {
            window: self.window,
            minimum_calls: self.minimum_calls,
            failure_ppm,
            slow_ppm,
            slow_call_duration: self.slow_call_duration,
            open_duration: self.open_duration,
            escalation: self.escalation,
            half_open_calls: self.half_open_calls,
            max_half_open_wait: self.max_half_open_wait,
            verdicts: self.verdicts,
            listeners: self.listeners,
            failure_rate_threshold: self.failure_rate_threshold,
            slow_call_rate_threshold: self.slow_call_rate_threshold,
        })
    }
}

fn threshold_ppm(field: &'static str, percent: f32) -> Result<u64, ConfigError> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(ConfigError::Threshold { field, value: percent });
    }
    Ok((f64::from(percent) * 10_000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_published() {
        let c = Config::default();
        assert_eq!(c.window(), DEFAULT_WINDOW);
        assert_eq!(c.minimum_calls(), DEFAULT_MINIMUM_CALLS);
        assert_eq!(c.half_open_calls(), DEFAULT_HALF_OPEN_CALLS);
        assert_eq!(c.failure_ppm, 500_000);
    }

    #[test]
    fn invalid_values_are_rejected_with_a_typed_error() {
        let b = Config::builder;
        assert_eq!(b().count_window(0).build().unwrap_err(), ConfigError::WindowSize(Window::Count(0)));
        assert!(matches!(b().count_window(10).minimum_calls(11).build(), Err(ConfigError::MinimumCalls { .. })));
        assert!(matches!(b().minimum_calls(0).build(), Err(ConfigError::MinimumCalls { .. })));
        assert!(matches!(b().failure_rate_threshold(0.0).build(), Err(ConfigError::Threshold { .. })));
        assert!(matches!(b().failure_rate_threshold(100.1).build(), Err(ConfigError::Threshold { .. })));
        assert!(matches!(b().failure_rate_threshold(f32::NAN).build(), Err(ConfigError::Threshold { .. })));
        assert!(matches!(b().slow_calls(Duration::from_secs(1), -1.0).build(), Err(ConfigError::Threshold { .. })));
        assert_eq!(b().half_open_calls(0).build().unwrap_err(), ConfigError::HalfOpenCalls(0));
        assert_eq!(b().open_duration(Duration::ZERO).build().unwrap_err(), ConfigError::ZeroDuration("open_duration"));
        let bad_jitter = Escalation { multiplier: 2.0, max: Duration::from_secs(600), jitter: 1.5 };
        assert!(matches!(b().escalation(bad_jitter).build(), Err(ConfigError::Escalation(_))));
        // Minimum calls may exceed nothing in a time window, and 100 % is a valid threshold.
        assert!(b().time_window(10).minimum_calls(1000).failure_rate_threshold(100.0).build().is_ok());
    }

    #[test]
    fn escalation_grows_and_caps() {
        let c = Config::builder()
            .open_duration(Duration::from_secs(10))
            .escalation(Escalation::doubling(Duration::from_secs(60)))
            .build()
            .unwrap();
        let secs: Vec<u64> = (1..=5).map(|n| c.open_duration_for(n).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 60, 60]);
    }
}
