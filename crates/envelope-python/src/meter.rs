//! Counts of calls (by outcome and duration) and of the engine's events, read at each scrape by
//! `envelope.metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envelope_core::Outcome;
use envelope_core::event::{GiveUpReason, Listeners};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::{outcome, seconds_or_zero};

/// The request duration buckets, in seconds: the sidecar's (`envelope_http::observe::DURATION_BUCKETS`), so that
/// the rules and dashboards `envelope generate` writes apply to an application's own metrics unchanged.
pub(crate) const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What an envelope's calls did, counted where they end: calls by outcome, their durations, attempts made.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    calls: [AtomicU64; Outcome::ALL.len()],
    /// Per bucket (not cumulative), the last one for calls over the largest bound.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    pub(crate) attempts: AtomicU64,
}

impl Meter {
    pub(crate) fn record(&self, outcome: Outcome, elapsed: Duration) {
        self.calls[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = DURATION_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl Meter {
    /// The counts as Python sees them (see [`Envelope::metrics`]).
    pub(crate) fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let calls = PyDict::new(py);
        for o in Outcome::ALL {
            calls.set_item(o.as_str(), self.calls[o as usize].load(Ordering::Relaxed))?;
        }
        d.set_item("calls", calls)?;
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(DURATION_BUCKETS.len() + 1);
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            buckets.push((DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), cumulative));
        }
        d.set_item("buckets", buckets)?;
        d.set_item("count", cumulative)?;
        d.set_item("sum", self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9)?;
        d.set_item("attempts", self.attempts.load(Ordering::Relaxed))?;
        Ok(d)
    }
}

/// The engine's events for one envelope's or one breaker's policies, counted as the sidecar counts them for its
/// metric families (`envelope_retries_total`, `envelope_retries_given_up_total`, `envelope_timeouts_total`,
/// `envelope_bulkhead_rejections_total`, `envelope_rate_limited_total`, `envelope_breaker_transitions_total`,
/// `envelope_breaker_rejections_total`). A listener on the policies' own configs: the engine reports, nothing
/// here decides.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    retries: AtomicU64,
    /// By [`GiveUpReason::ALL`] index.
    gave_up: [AtomicU64; GiveUpReason::ALL.len()],
    /// `[queue full, waited and the wait ran out]`.
    bulkhead_rejected: [AtomicU64; 2],
    /// `[enforced, shadow]`.
    rate_limited: [AtomicU64; 2],
    pub(crate) timeouts: AtomicU64,
    pub(crate) breaker_rejections: AtomicU64,
    /// Breaker transitions seen, by `(from, to)`.
    pub(crate) transitions: Mutex<Vec<(&'static str, &'static str, u64)>>,
}

impl envelope_core::event::Listener for Tally {
    fn on_event(&self, e: &envelope_core::event::Event<'_>) {
        use envelope_core::event::Event;
        match *e {
            Event::RetryScheduled { .. } => {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            Event::RetryGaveUp { reason, .. } => {
                if let Some(i) = GiveUpReason::ALL.iter().position(|r| *r == reason) {
                    self.gave_up[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::BulkheadRejected { waited, .. } => {
                self.bulkhead_rejected[usize::from(waited)].fetch_add(1, Ordering::Relaxed);
            }
            Event::RateLimited { shadow, .. } => {
                self.rate_limited[usize::from(shadow)].fetch_add(1, Ordering::Relaxed);
            }
            Event::CallNotPermitted { .. } => {
                self.breaker_rejections.fetch_add(1, Ordering::Relaxed);
            }
            Event::StateTransition { from, to, .. } => {
                let mut seen = self.transitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match seen.iter_mut().find(|(f, t, _)| *f == from.as_str() && *t == to.as_str()) {
                    Some((_, _, n)) => *n += 1,
                    None => seen.push((from.as_str(), to.as_str(), 1)),
                }
            }
            _ => {}
        }
    }
}

impl Tally {
    pub(crate) fn listeners(self: &Arc<Self>) -> Listeners {
        Listeners::new().with_arc(self.clone())
    }

    /// The counts as Python sees them (keys of `Envelope.metrics()` and `Breaker.metrics()`).
    pub(crate) fn fill(&self, d: &Bound<'_, PyDict>) -> PyResult<()> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let py = d.py();
        d.set_item("retries", load(&self.retries))?;
        let gave_up = PyDict::new(py);
        for (reason, n) in GiveUpReason::ALL.iter().zip(&self.gave_up) {
            gave_up.set_item(reason.as_str(), load(n))?;
        }
        d.set_item("gave_up", gave_up)?;
        d.set_item("timeouts", load(&self.timeouts))?;
        d.set_item("bulkhead_rejected", (load(&self.bulkhead_rejected[0]), load(&self.bulkhead_rejected[1])))?;
        d.set_item("rate_limited", (load(&self.rate_limited[0]), load(&self.rate_limited[1])))?;
        d.set_item("breaker_rejections", load(&self.breaker_rejections))?;
        let seen = self.transitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        d.set_item("transitions", seen)?;
        Ok(())
    }
}

/// Counts of requests by outcome and duration, for what is not an `Envelope` call (the ASGI middleware's routes).
#[pyclass(frozen, name = "Meter", module = "envelope._envelope")]
pub(crate) struct PyMeter {
    inner: Meter,
}

#[pymethods]
impl PyMeter {
    #[new]
    fn new() -> Self {
        PyMeter { inner: Meter::default() }
    }

    /// Counts one request that ended in `outcome_name` after `seconds`.
    pub(crate) fn record(&self, outcome_name: &str, seconds: f64) -> PyResult<()> {
        self.inner.record(outcome(outcome_name)?, seconds_or_zero(seconds));
        Ok(())
    }

    /// The counts (as `Envelope.metrics`).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.inner.snapshot(py)
    }
}
