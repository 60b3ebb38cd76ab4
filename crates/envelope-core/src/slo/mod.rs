//! Service level objectives: good and total events in rolling windows, error budgets and multiwindow burn rates
//! (Google SRE workbook, chapter 5).
//!
//! An [`Slo`] counts, per call, whether it was an error (for availability) and whether it was slow (for latency).
//! Recording is O(1): two counters in the current minute bucket and two in the current hour bucket. Windows of up to
//! six hours are read from 360 one-minute buckets, longer ones (3 days, 30 days) from 720 one-hour buckets. Reading
//! a window sums its buckets; it is meant for scrapes and dashboards, not the request path.
//!
//! **Error budget.** With an availability target of 99.9 %, 0.1 % of the calls in the SLO window (30 days) may
//! fail. `budget_remaining = 1 − error_rate / (1 − target)`: 0.5 % errors against a 99 % target leave 50 %.
//!
//! **Burn rate.** How fast the budget is being spent: `error_rate(window) / (1 − target)`. A burn rate of 1 spends the
//! whole budget in exactly the SLO window. The standard multiwindow alerts: **page** when the 1 h and 5 m burn rates
//! both exceed 14.4, or the 6 h and 30 m rates both exceed 6; **ticket** when the 3 d and 6 h rates both exceed 1.
//! The short window makes an alert stop soon after the problem stops.
//!
//! Latency is an objective of its own: a call slower than the tier's threshold is a "slow" event, and at most
//! `1 − latency_percentile` of calls may be slow (5 % for a p95 objective); its budget and burn rates work the same
//! way.

use std::fmt;
use std::time::Duration;

use crate::clock::{self, Instant};
use std::sync::atomic::{AtomicU64, Ordering};

/// The windows the engine reports on.
pub const WINDOWS: [Duration; 6] = [
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(3600),
    Duration::from_secs(6 * 3600),
    Duration::from_secs(3 * 24 * 3600),
    Duration::from_secs(30 * 24 * 3600),
];

/// The SLO window: budgets are computed over it.
pub const SLO_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

const MINUTE_BUCKETS: u64 = 360;
const HOUR_BUCKETS: u64 = 720;

/// An SLO tier's targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    /// Share of calls that must succeed, e.g. 0.999.
    pub availability: f64,
    /// Latency threshold: a call slower than this is slow.
    pub latency_threshold: Duration,
    /// Share of calls that must be at or under the threshold, e.g. 0.95 for a p95 objective.
    pub latency_percentile: f64,
}

impl Objective {
    /// Critical tier: 99.99 % availability, p95 ≤ 100 ms (auth, payments).
    pub const CRITICAL: Objective =
        Objective { availability: 0.9999, latency_threshold: Duration::from_millis(100), latency_percentile: 0.95 };
    /// Default tier: 99.9 % availability, p95 ≤ 200 ms (API endpoints).
    pub const DEFAULT: Objective =
        Objective { availability: 0.999, latency_threshold: Duration::from_millis(200), latency_percentile: 0.95 };
    /// Non-critical tier: 99 % availability, p95 ≤ 500 ms (analytics, reports).
    pub const NON_CRITICAL: Objective =
        Objective { availability: 0.99, latency_threshold: Duration::from_millis(500), latency_percentile: 0.95 };

    /// Checks both shares are in (0, 1) and the threshold is above zero.
    pub fn validate(&self) -> Result<(), InvalidObjective> {
        let share = |v: f64| v > 0.0 && v < 1.0;
        if !share(self.availability) {
            return Err(InvalidObjective("availability must be in (0, 1)"));
        }
        if !share(self.latency_percentile) {
            return Err(InvalidObjective("latency_percentile must be in (0, 1)"));
        }
        if self.latency_threshold.is_zero() {
            return Err(InvalidObjective("latency_threshold must be greater than zero"));
        }
        Ok(())
    }
}

/// Why an objective is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidObjective(&'static str);

impl fmt::Display for InvalidObjective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidObjective {}

/// Counts of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Calls.
    pub total: u64,
    /// Calls that failed (against availability).
    pub errors: u64,
    /// Calls slower than the latency threshold.
    pub slow: u64,
}

impl Counts {
    /// Share of calls that succeeded (1 with no calls).
    pub fn availability(&self) -> f64 {
        if self.total == 0 { 1.0 } else { 1.0 - self.errors as f64 / self.total as f64 }
    }
}

/// Which alert, if any, the burn rates call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alert {
    /// Within budget.
    None,
    /// Slow burn: a ticket (3 d and 6 h above 1×).
    Ticket,
    /// Fast burn: page someone (1 h and 5 m above 14.4×, or 6 h and 30 m above 6×).
    Page,
}

/// The state of an SLO now.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Counts per window, in the order of [`WINDOWS`].
    pub windows: [Counts; 6],
    /// Availability over the SLO window.
    pub availability: f64,
    /// Share of the availability error budget left over the SLO window (negative when overspent).
    pub budget_remaining: f64,
    /// Availability burn rate per window, in the order of [`WINDOWS`].
    pub burn_rates: [f64; 6],
    /// The availability alert.
    pub alert: Alert,
    /// Share of the latency budget left over the SLO window.
    pub latency_budget_remaining: f64,
    /// Latency burn rate per window.
    pub latency_burn_rates: [f64; 6],
    /// The latency alert.
    pub latency_alert: Alert,
}

struct Bucket {
    tag: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
    slow: AtomicU64,
}

impl Bucket {
    fn new() -> Self {
        Bucket { tag: AtomicU64::new(0), total: AtomicU64::new(0), errors: AtomicU64::new(0), slow: AtomicU64::new(0) }
    }

    /// Adds to this bucket for period `tag` (period number + 1), restarting it if it held an older period.
    fn add(&self, tag: u64, error: bool, slow: bool) {
        let current = self.tag.load(Ordering::Acquire);
        if current != tag {
            if current > tag {
                return;
            }
            // The first writer of a new period restarts the bucket. A concurrent write to the old period at the
            // same instant may be lost; at one-minute granularity that is within the counts' precision.
            if self.tag.compare_exchange(current, tag, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                self.total.store(0, Ordering::Release);
                self.errors.store(0, Ordering::Release);
                self.slow.store(0, Ordering::Release);
            }
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if slow {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self, oldest: u64, newest: u64) -> Counts {
        let tag = self.tag.load(Ordering::Acquire);
        if tag < oldest || tag > newest {
            return Counts::default();
        }
        Counts {
            total: self.total.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            slow: self.slow.load(Ordering::Relaxed),
        }
    }
}

/// An SLO being tracked. Cheap to share behind an `Arc`; recording takes `&self`.
pub struct Slo {
    objective: Objective,
    epoch: Instant,
    minutes: Box<[Bucket]>,
    hours: Box<[Bucket]>,
}

impl fmt::Debug for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slo").field("objective", &self.objective).finish_non_exhaustive()
    }
}

impl Slo {
    /// Tracks `objective` from now.
    pub fn new(objective: Objective) -> Result<Slo, InvalidObjective> {
        objective.validate()?;
        Ok(Slo {
            objective,
            epoch: clock::now(),
            minutes: (0..MINUTE_BUCKETS).map(|_| Bucket::new()).collect(),
            hours: (0..HOUR_BUCKETS).map(|_| Bucket::new()).collect(),
        })
    }

    /// The objective.
    pub fn objective(&self) -> &Objective {
        &self.objective
    }

    /// Records one call that took `latency` and did or did not fail.
    pub fn record(&self, error: bool, latency: Duration) {
        self.record_at(error, latency, clock::now());
    }

    /// [`record`](Self::record) with the caller's reading of the clock.
    pub fn record_at(&self, error: bool, latency: Duration, now: Instant) {
        let slow = latency > self.objective.latency_threshold;
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        let (minute, hour) = (secs / 60, secs / 3600);
        self.minutes[(minute % MINUTE_BUCKETS) as usize].add(minute + 1, error, slow);
        self.hours[(hour % HOUR_BUCKETS) as usize].add(hour + 1, error, slow);
    }

    /// The counts of the last `window` (rounded to whole minutes up to six hours, whole hours beyond).
    pub fn counts(&self, window: Duration, now: Instant) -> Counts {
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        let (ring, unit, buckets) = if window <= Duration::from_secs(6 * 3600) {
            (&self.minutes, 60, MINUTE_BUCKETS)
        } else {
            (&self.hours, 3600, HOUR_BUCKETS)
        };
        let n = (window.as_secs() / unit).clamp(1, buckets);
        let newest = secs / unit + 1;
        let oldest = newest.saturating_sub(n - 1);
        ring.iter().map(|b| b.read(oldest, newest)).fold(Counts::default(), |a, c| Counts {
            total: a.total + c.total,
            errors: a.errors + c.errors,
            slow: a.slow + c.slow,
        })
    }

    /// Everything an operator wants to know, now.
    pub fn report(&self) -> Report {
        self.report_at(clock::now())
    }

    /// [`report`](Self::report) at `now`.
    pub fn report_at(&self, now: Instant) -> Report {
        let windows = WINDOWS.map(|w| self.counts(w, now));
        let allowed_errors = 1.0 - self.objective.availability;
        let allowed_slow = 1.0 - self.objective.latency_percentile;
        let rate = |bad: u64, total: u64| if total == 0 { 0.0 } else { bad as f64 / total as f64 };
        let burn_rates = windows.map(|c| rate(c.errors, c.total) / allowed_errors);
        let latency_burn_rates = windows.map(|c| rate(c.slow, c.total) / allowed_slow);
        let month = windows[5];
        Report {
            windows,
            availability: month.availability(),
            budget_remaining: 1.0 - rate(month.errors, month.total) / allowed_errors,
            burn_rates,
            alert: alert(&burn_rates),
            latency_budget_remaining: 1.0 - rate(month.slow, month.total) / allowed_slow,
            latency_burn_rates,
            latency_alert: alert(&latency_burn_rates),
        }
    }
}

/// The multiwindow, multi-burn-rate alert for burn rates in the order of [`WINDOWS`] (5m, 30m, 1h, 6h, 3d, 30d).
pub fn alert(burn: &[f64; 6]) -> Alert {
    let [m5, m30, h1, h6, d3, _] = *burn;
    if (h1 > 14.4 && m5 > 14.4) || (h6 > 6.0 && m30 > 6.0) {
        Alert::Page
    } else if d3 > 1.0 && h6 > 1.0 {
        Alert::Ticket
    } else {
        Alert::None
    }
}
