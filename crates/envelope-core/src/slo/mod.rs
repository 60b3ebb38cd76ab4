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
//! way. An SLO may have several latency objectives (p95 under 300 ms and p99 under 1 s), each counted and judged on
//! its own.

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

/// A latency objective: at least `percentile` of calls at or under `threshold` (p95 under 300 ms is
/// `{ threshold: 300 ms, percentile: 0.95 }`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyObjective {
    /// A call slower than this is slow.
    pub threshold: Duration,
    /// Share of calls that must be at or under the threshold, in (0, 1).
    pub percentile: f64,
}

/// The most latency objectives one SLO tracks.
pub const MAX_LATENCY_OBJECTIVES: usize = 4;

/// A latency objective's state now.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyReport {
    /// The objective.
    pub objective: LatencyObjective,
    /// Slow calls per window, in the order of [`WINDOWS`].
    pub slow: [u64; 6],
    /// Share of its budget left over the SLO window.
    pub budget_remaining: f64,
    /// Burn rate per window.
    pub burn_rates: [f64; 6],
    /// Its alert.
    pub alert: Alert,
}

/// The state of an SLO now.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Counts per window, in the order of [`WINDOWS`] (`slow` by the first latency objective).
    pub windows: [Counts; 6],
    /// Availability over the SLO window.
    pub availability: f64,
    /// Share of the availability error budget left over the SLO window (negative when overspent).
    pub budget_remaining: f64,
    /// Availability burn rate per window, in the order of [`WINDOWS`].
    pub burn_rates: [f64; 6],
    /// The availability alert.
    pub alert: Alert,
    /// Share of the first latency objective's budget left over the SLO window.
    pub latency_budget_remaining: f64,
    /// The first latency objective's burn rate per window.
    pub latency_burn_rates: [f64; 6],
    /// The first latency objective's alert.
    pub latency_alert: Alert,
    /// Every latency objective, in order.
    pub latencies: Vec<LatencyReport>,
}

/// One bucket's words in the rings: its period tag, total, errors, then one slow count per latency objective.
const FIXED_WORDS: usize = 3;

/// An SLO being tracked. Cheap to share behind an `Arc`; recording takes `&self`. The rings are made with the first
/// call recorded: an SLO nobody has called yet (a route without traffic) costs a few words.
pub struct Slo {
    availability: f64,
    latencies: Box<[LatencyObjective]>,
    epoch: Instant,
    /// The minute ring, then the hour ring: `FIXED_WORDS + latencies` words per bucket.
    rings: std::sync::OnceLock<Box<[AtomicU64]>>,
}

impl fmt::Debug for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slo")
            .field("availability", &self.availability)
            .field("latencies", &self.latencies)
            .finish_non_exhaustive()
    }
}

impl Slo {
    /// Tracks `objective` from now.
    pub fn new(objective: Objective) -> Result<Slo, InvalidObjective> {
        objective.validate()?;
        let latency =
            LatencyObjective { threshold: objective.latency_threshold, percentile: objective.latency_percentile };
        Slo::with_objectives(objective.availability, &[latency])
    }

    /// Tracks an availability objective and 1 to [`MAX_LATENCY_OBJECTIVES`] latency objectives from now.
    pub fn with_objectives(availability: f64, latencies: &[LatencyObjective]) -> Result<Slo, InvalidObjective> {
        if latencies.is_empty() || latencies.len() > MAX_LATENCY_OBJECTIVES {
            return Err(InvalidObjective("an SLO has 1 to 4 latency objectives"));
        }
        for l in latencies {
            Objective { availability, latency_threshold: l.threshold, latency_percentile: l.percentile }.validate()?;
        }
        Ok(Slo { availability, latencies: latencies.into(), epoch: clock::now(), rings: std::sync::OnceLock::new() })
    }

    /// The availability objective and the first latency objective.
    pub fn objective(&self) -> Objective {
        let first = self.latencies[0];
        Objective {
            availability: self.availability,
            latency_threshold: first.threshold,
            latency_percentile: first.percentile,
        }
    }

    /// Every latency objective, in order.
    pub fn latencies(&self) -> &[LatencyObjective] {
        &self.latencies
    }

    fn stride(&self) -> usize {
        FIXED_WORDS + self.latencies.len()
    }

    fn rings(&self) -> &[AtomicU64] {
        self.rings.get_or_init(|| {
            let words = (MINUTE_BUCKETS + HOUR_BUCKETS) as usize * self.stride();
            (0..words).map(|_| AtomicU64::new(0)).collect()
        })
    }

    /// Bucket `i` of the minute ring (`hours`: of the hour ring).
    fn bucket<'a>(&self, rings: &'a [AtomicU64], hours: bool, i: u64) -> &'a [AtomicU64] {
        let index = if hours { MINUTE_BUCKETS + i } else { i } as usize;
        &rings[index * self.stride()..(index + 1) * self.stride()]
    }

    /// Records one call that took `latency` and did or did not fail.
    pub fn record(&self, error: bool, latency: Duration) {
        self.record_at(error, latency, clock::now());
    }

    /// [`record`](Self::record) with the caller's reading of the clock.
    pub fn record_at(&self, error: bool, latency: Duration, now: Instant) {
        let rings = self.rings();
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        let (minute, hour) = (secs / 60, secs / 3600);
        for (hours, period, buckets) in [(false, minute, MINUTE_BUCKETS), (true, hour, HOUR_BUCKETS)] {
            let bucket = self.bucket(rings, hours, period % buckets);
            add(bucket, period + 1, error, |k| latency > self.latencies[k].threshold);
        }
    }

    /// The counts of the last `window` (rounded to whole minutes up to six hours, whole hours beyond); `slow` by
    /// the first latency objective.
    pub fn counts(&self, window: Duration, now: Instant) -> Counts {
        let (total, errors, slow) = self.sums(window, now);
        Counts { total, errors, slow: slow[0] }
    }

    /// Calls, errors and slow calls per latency objective in the last `window`.
    fn sums(&self, window: Duration, now: Instant) -> (u64, u64, [u64; MAX_LATENCY_OBJECTIVES]) {
        let mut sums = (0, 0, [0; MAX_LATENCY_OBJECTIVES]);
        let Some(rings) = self.rings.get() else { return sums };
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        let (hours, unit, buckets) = if window <= Duration::from_secs(6 * 3600) {
            (false, 60, MINUTE_BUCKETS)
        } else {
            (true, 3600, HOUR_BUCKETS)
        };
        let n = (window.as_secs() / unit).clamp(1, buckets);
        let newest = secs / unit + 1;
        let oldest = newest.saturating_sub(n - 1);
        for i in 0..buckets {
            let b = self.bucket(rings, hours, i);
            let tag = b[0].load(Ordering::Acquire);
            if tag < oldest || tag > newest {
                continue;
            }
            sums.0 += b[1].load(Ordering::Relaxed);
            sums.1 += b[2].load(Ordering::Relaxed);
            for k in 0..self.latencies.len() {
                sums.2[k] += b[FIXED_WORDS + k].load(Ordering::Relaxed);
            }
        }
        sums
    }

    /// Everything an operator wants to know, now.
    pub fn report(&self) -> Report {
        self.report_at(clock::now())
    }

    /// [`report`](Self::report) at `now`.
    pub fn report_at(&self, now: Instant) -> Report {
        let sums = WINDOWS.map(|w| self.sums(w, now));
        let windows = sums.map(|(total, errors, slow)| Counts { total, errors, slow: slow[0] });
        let allowed_errors = 1.0 - self.availability;
        let rate = |bad: u64, total: u64| if total == 0 { 0.0 } else { bad as f64 / total as f64 };
        let burn_rates = windows.map(|c| rate(c.errors, c.total) / allowed_errors);
        let month = windows[5];
        let latencies: Vec<LatencyReport> = self
            .latencies
            .iter()
            .enumerate()
            .map(|(k, objective)| {
                let allowed_slow = 1.0 - objective.percentile;
                let slow = sums.map(|(_, _, slow)| slow[k]);
                let burn_rates = std::array::from_fn(|w| rate(slow[w], windows[w].total) / allowed_slow);
                LatencyReport {
                    objective: *objective,
                    slow,
                    budget_remaining: 1.0 - rate(slow[5], month.total) / allowed_slow,
                    burn_rates,
                    alert: alert(&burn_rates),
                }
            })
            .collect();
        Report {
            windows,
            availability: month.availability(),
            budget_remaining: 1.0 - rate(month.errors, month.total) / allowed_errors,
            burn_rates,
            alert: alert(&burn_rates),
            latency_budget_remaining: latencies[0].budget_remaining,
            latency_burn_rates: latencies[0].burn_rates,
            latency_alert: latencies[0].alert,
            latencies,
        }
    }
}

/// Adds one call to `bucket` for period `tag` (period number + 1), restarting the bucket if it held an older
/// period; `slow(k)`: whether the call was slow by latency objective `k`.
fn add(bucket: &[AtomicU64], tag: u64, error: bool, slow: impl Fn(usize) -> bool) {
    let current = bucket[0].load(Ordering::Acquire);
    if current != tag {
        if current > tag {
            return;
        }
        // The first writer of a new period restarts the bucket. A concurrent write to the old period at the same
        // instant may be lost; at one-minute granularity that is within the counts' precision.
        if bucket[0].compare_exchange(current, tag, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            for word in &bucket[1..] {
                word.store(0, Ordering::Release);
            }
        }
    }
    bucket[1].fetch_add(1, Ordering::Relaxed);
    if error {
        bucket[2].fetch_add(1, Ordering::Relaxed);
    }
    for (k, word) in bucket[FIXED_WORDS..].iter().enumerate() {
        if slow(k) {
            word.fetch_add(1, Ordering::Relaxed);
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
