//! An adaptive concurrency limit in the style of Netflix's Gradient2, with one change that matters under spikes.
//!
//! **Why a gradient and not AIMD.** AIMD needs a hand-set latency threshold or a loss signal; the gradient needs
//! neither. It compares the recent latency (mean of the last sample window) with a baseline: while the recent
//! latency stays within `tolerance ×` the baseline the limit grows by about `√limit` per window; when queueing
//! makes calls slower the ratio drops below 1 and the limit shrinks in proportion. Timeouts shrink it by at least
//! 10 %.
//!
//! **The baseline is a slowly rising minimum**, not Gradient2's long average: it drops at once to any lower
//! window mean and otherwise rises by a factor of 2 over `baseline_windows` windows. An average learns sustained
//! overload as the new normal and stops shedding; a minimum keeps remembering the latency without queueing, which
//! the limiter sees again whenever it is near the right size. The slow rise still follows a dependency whose real
//! latency has changed.
//!
//! **What we change.** Gradient2 and Envoy's adaptive concurrency let the limit drift upwards while traffic is
//! healthy, up to their maximum, so the first second of a spike is admitted into a deep queue at the dependency.
//! Here the limit never grows past twice the largest concurrency actually seen in the window: an idle service keeps
//! a limit near its real working set, and a spike meets a limit that is already close to right.
//!
//! The per-call cost is three relaxed atomic adds; once per window one caller takes a mutex to update the limit.

use std::fmt;
use std::time::Duration;

use crate::clock;
use crate::sync::{AtomicU64, AtomicUsize, Mutex, Ordering, lock};

/// Default limit before any sample.
pub const DEFAULT_INITIAL_LIMIT: usize = 20;
/// Default floor of the limit.
pub const DEFAULT_MIN_LIMIT: usize = 4;
/// Default ceiling of the limit.
pub const DEFAULT_MAX_LIMIT: usize = 1000;
/// Default length of a sample window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);
/// Default samples needed before a window counts.
pub const DEFAULT_MIN_SAMPLES: u64 = 10;
/// Default latency tolerated relative to the baseline.
pub const DEFAULT_TOLERANCE: f64 = 1.5;
/// Default weight of a new limit against the old one.
pub const DEFAULT_SMOOTHING: f64 = 0.2;
/// Default number of windows over which the baseline may double.
pub const DEFAULT_BASELINE_WINDOWS: u32 = 600;

/// Why a gradient configuration is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidGradient(&'static str);

impl fmt::Display for InvalidGradient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid adaptive limit: {}", self.0)
    }
}

impl std::error::Error for InvalidGradient {}

/// Gradient limiter settings; every field defaults to the named constant of the same name.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct GradientConfig {
    /// Limit before any sample.
    pub initial_limit: usize,
    /// Floor (≥ 1).
    pub min_limit: usize,
    /// Ceiling.
    pub max_limit: usize,
    /// Length of a sample window.
    pub window: Duration,
    /// Samples needed in a window before it counts.
    pub min_samples: u64,
    /// Recent latency tolerated relative to the baseline before shrinking (≥ 1).
    pub tolerance: f64,
    /// Weight of a new limit against the old one, in (0, 1].
    pub smoothing: f64,
    /// Windows over which the baseline may double when latency stays above it (600 windows of 100 ms: a minute).
    pub baseline_windows: u32,
    /// How many calls the limit may grow by per window beyond what the latency allows: `None` for `√limit`
    /// (Gradient2's default), or a fixed number. At equilibrium this is about the queue the limit keeps in front of
    /// the dependency's capacity, so a smaller headroom (with a tolerance near 1) holds admitted latency closer to
    /// unloaded.
    pub headroom: Option<f64>,
}

impl Default for GradientConfig {
    fn default() -> Self {
        GradientConfig {
            initial_limit: DEFAULT_INITIAL_LIMIT,
            min_limit: DEFAULT_MIN_LIMIT,
            max_limit: DEFAULT_MAX_LIMIT,
            window: DEFAULT_WINDOW,
            min_samples: DEFAULT_MIN_SAMPLES,
            tolerance: DEFAULT_TOLERANCE,
            smoothing: DEFAULT_SMOOTHING,
            baseline_windows: DEFAULT_BASELINE_WINDOWS,
            headroom: None,
        }
    }
}

impl GradientConfig {
    /// Checks every field; the shedder refuses an invalid configuration with this error.
    pub fn validate(&self) -> Result<(), InvalidGradient> {
        if self.min_limit == 0 {
            return Err(InvalidGradient("min_limit must be at least 1"));
        }
        if self.max_limit < self.min_limit {
            return Err(InvalidGradient("max_limit must be at least min_limit"));
        }
        if !(self.min_limit..=self.max_limit).contains(&self.initial_limit) {
            return Err(InvalidGradient("initial_limit must be between min_limit and max_limit"));
        }
        if self.window.is_zero() {
            return Err(InvalidGradient("window must be greater than zero"));
        }
        if !(self.tolerance >= 1.0 && self.tolerance.is_finite()) {
            return Err(InvalidGradient("tolerance must be a finite number >= 1"));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(InvalidGradient("smoothing must be in (0, 1]"));
        }
        if self.baseline_windows == 0 {
            return Err(InvalidGradient("baseline_windows must be at least 1"));
        }
        if self.headroom.is_some_and(|h| !(h > 0.0 && h.is_finite())) {
            return Err(InvalidGradient("headroom must be a finite number above 0"));
        }
        Ok(())
    }
}

pub(crate) struct Gradient {
    config: GradientConfig,
    window_nanos: u64,
    window_end: AtomicU64,
    sum_nanos: AtomicU64,
    samples: AtomicU64,
    drops: AtomicU64,
    max_in_flight: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    baseline: Option<f64>,
    /// The mean latency of the last window that closed, in nanoseconds.
    recent: Option<f64>,
}

impl Gradient {
    /// A limiter for a configuration already checked by [`GradientConfig::validate`].
    pub(crate) fn new(config: GradientConfig) -> Self {
        let window_nanos = clock::as_nanos(config.window).max(1);
        Gradient {
            window_nanos,
            window_end: AtomicU64::new(window_nanos),
            sum_nanos: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            drops: AtomicU64::new(0),
            max_in_flight: AtomicUsize::new(0),
            state: Mutex::new(State { limit: config.initial_limit as f64, baseline: None, recent: None }),
            config,
        }
    }

    pub(crate) fn initial_limit(&self) -> usize {
        self.config.initial_limit
    }

    /// The limit's inputs now: the baseline latency (the lowest recent one, slowly forgotten) and the mean latency
    /// of the last window, once a window has closed.
    pub(crate) fn inputs(&self) -> (Option<Duration>, Option<Duration>) {
        let s = lock(&self.state);
        let nanos = |v: Option<f64>| v.map(|n| Duration::from_nanos(n.max(0.0) as u64));
        (nanos(s.baseline), nanos(s.recent))
    }

    /// Adds a sample; at the end of a window, computes the new limit. Returns `(old, new)` when it changed.
    pub(crate) fn sample(&self, rtt: Duration, in_flight: usize, dropped: bool, now: u64) -> Option<(usize, usize)> {
        self.sum_nanos.fetch_add(clock::as_nanos(rtt), Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        if dropped {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
        let end = self.window_end.load(Ordering::Acquire);
        if now < end {
            return None;
        }
        if self.samples.load(Ordering::Relaxed) < self.config.min_samples && !dropped {
            return None;
        }
        // One caller closes the window.
        if self.window_end.compare_exchange(end, now + self.window_nanos, Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return None;
        }
        let samples = self.samples.swap(0, Ordering::Relaxed);
        let sum = self.sum_nanos.swap(0, Ordering::Relaxed);
        let drops = self.drops.swap(0, Ordering::Relaxed);
        let max_in_flight = self.max_in_flight.swap(0, Ordering::Relaxed);
        if samples == 0 {
            return None;
        }
        let mut state = lock(&self.state);
        let old = state.limit.round() as usize;
        let new = next_limit(&self.config, &mut state, sum as f64 / samples as f64, max_in_flight, drops > 0);
        state.limit = new;
        let new = new.round() as usize;
        (new != old).then_some((old, new))
    }
}

/// One step of the limit, given the mean latency of the window that just closed.
fn next_limit(c: &GradientConfig, s: &mut State, recent: f64, max_in_flight: usize, dropped: bool) -> f64 {
    let recent = recent.max(1.0);
    s.recent = Some(recent);
    let baseline = match s.baseline {
        None => recent,
        Some(b) => recent.min(b * 2f64.powf(1.0 / f64::from(c.baseline_windows.max(1)))),
    };
    s.baseline = Some(baseline);
    let gradient = (c.tolerance * baseline / recent).clamp(0.5, 1.0);
    let limit = s.limit;
    let mut target = limit * gradient + c.headroom.unwrap_or_else(|| limit.sqrt());
    // Never grow far past what the traffic actually used: no drift while healthy.
    target = target.min((2 * max_in_flight.max(1)) as f64).max(limit.min(target));
    if dropped {
        target = target.min(limit * 0.9);
    }
    let smoothed = limit * (1.0 - c.smoothing) + target * c.smoothing;
    smoothed.clamp(c.min_limit as f64, c.max_limit as f64)
}

impl fmt::Debug for Gradient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gradient").field("config", &self.config).field("state", &*lock(&self.state)).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(c: &GradientConfig, s: &mut State, windows: usize, rtt: f64, in_flight: usize) {
        for _ in 0..windows {
            s.limit = next_limit(c, s, rtt, in_flight, false);
        }
    }

    #[test]
    fn grows_while_latency_is_flat_and_traffic_uses_the_limit() {
        let c = GradientConfig::default();
        let mut s = State { limit: 20.0, baseline: None, recent: None };
        run(&c, &mut s, 50, 10e6, 1000);
        assert!(s.limit > 60.0, "limit {}", s.limit);
    }

    #[test]
    fn does_not_drift_above_twice_the_concurrency_in_use() {
        let c = GradientConfig::default();
        let mut s = State { limit: 20.0, baseline: None, recent: None };
        run(&c, &mut s, 500, 10e6, 8);
        assert!(s.limit <= 20.0 + 1e-9, "limit {}", s.limit);
        let mut s = State { limit: 200.0, baseline: None, recent: None };
        run(&c, &mut s, 500, 10e6, 8);
        assert!(s.limit <= 200.0, "a healthy, idle service never grows: {}", s.limit);
    }

    #[test]
    fn shrinks_when_latency_rises_and_on_drops() {
        let c = GradientConfig::default();
        let mut s = State { limit: 100.0, baseline: None, recent: None };
        run(&c, &mut s, 20, 10e6, 100);
        let before = s.limit;
        run(&c, &mut s, 20, 40e6, 100);
        assert!(s.limit < before * 0.7, "{before} -> {}", s.limit);
        let before = s.limit;
        s.limit = next_limit(&c, &mut s, 10e6, 100, true);
        assert!(s.limit < before);
        assert!(s.limit >= c.min_limit as f64);
    }

    /// A dependency of capacity 8 whose latency grows with the queue in front of it, under a spike of 10 s (100
    /// windows): the limit settles where its growth balances the gradient, and the admitted latency there is what
    /// the operating point sets.
    fn settle(c: &GradientConfig) -> (f64, f64) {
        let base = 10e6;
        // Healthy before the spike: the baseline is the unloaded latency.
        let mut s = State { limit: 20.0, baseline: Some(base), recent: None };
        for _ in 0..100 {
            let in_flight = s.limit;
            let rtt = base * (in_flight / 8.0).max(1.0);
            s.limit = next_limit(c, &mut s, rtt, in_flight.ceil() as usize, false);
        }
        (s.limit, (s.limit / 8.0).max(1.0))
    }

    #[test]
    fn a_tighter_operating_point_keeps_admitted_latency_closer_to_unloaded() {
        // The defaults hold about twice the capacity in flight: about 2x the unloaded latency (the overload
        // benchmark measures 2.3x at the p99).
        let (limit, ratio) = settle(&GradientConfig::default());
        assert!((14.0..=20.0).contains(&limit) && ratio > 1.8, "{limit} {ratio}");
        for (headroom, most) in [(2.0, 1.5), (1.0, 1.3)] {
            let tight = GradientConfig { tolerance: 1.0, headroom: Some(headroom), ..GradientConfig::default() };
            let (limit, ratio) = settle(&tight);
            assert!(limit >= 8.0, "still at least the capacity in flight (no goodput lost): {limit}");
            assert!(ratio <= most, "headroom {headroom}: latency {ratio}x unloaded at a limit of {limit}");
        }
    }
}
