//! The circuit breaker (`envelope_core::circuit_breaker`) and its permits.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use envelope_core::circuit_breaker::{CircuitBreaker, Config, Escalation, OwnedPermit, State};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::rejection;
use crate::meter::Tally;
use crate::{outcome, seconds};

/// A circuit breaker: the engine's state machine, window and probes.
#[pyclass(frozen, module = "envelope._envelope")]
pub(crate) struct Breaker {
    pub(crate) inner: CircuitBreaker,
    pub(crate) tally: Arc<Tally>,
}

#[pymethods]
impl Breaker {
    /// Validates the settings with the engine (unset ones are the engine's documented defaults).
    #[new]
    #[pyo3(signature = (
        name, *, window=None, window_seconds=None, min_calls=None, failure_rate=None, slow_call=None,
        open_for=None, max_open_for=None, half_open_calls=None, max_half_open_wait=None, on_state_change=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        window: Option<u32>,
        window_seconds: Option<u32>,
        min_calls: Option<u32>,
        failure_rate: Option<f32>,
        slow_call: Option<(f64, f32)>,
        open_for: Option<f64>,
        max_open_for: Option<f64>,
        half_open_calls: Option<u32>,
        max_half_open_wait: Option<f64>,
        on_state_change: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let tally = Arc::<Tally>::default();
        let mut listeners = tally.listeners();
        if let Some(callback) = on_state_change {
            // Called by the engine on the thread that decided, outside the breaker's locks: `callback(name, from,
            // to)`, with the interpreter held; an exception it raises is reported as unraisable, never to the call.
            listeners = listeners.with(move |e: &envelope_core::event::Event<'_>| {
                if let envelope_core::event::Event::StateTransition { name, from, to } = e {
                    Python::attach(|py| {
                        if let Err(err) = callback.call1(py, (*name, from.as_str(), to.as_str())) {
                            err.write_unraisable(py, Some(callback.bind(py)));
                        }
                    });
                }
            });
        }
        let mut b = Config::builder().listeners(listeners);
        match (window, window_seconds) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("give `window` or `window_seconds`, not both")),
            (Some(n), None) => b = b.count_window(n),
            (None, Some(s)) => b = b.time_window(s),
            (None, None) => {}
        }
        if let Some(n) = min_calls {
            b = b.minimum_calls(n);
        }
        if let Some(p) = failure_rate {
            b = b.failure_rate_threshold(p);
        }
        if let Some((d, p)) = slow_call {
            b = b.slow_calls(seconds("slow_call", d)?, p);
        }
        if let Some(d) = open_for {
            b = b.open_duration(seconds("open_for", d)?);
        }
        if let Some(d) = max_open_for {
            b = b.escalation(Escalation { multiplier: 2.0, max: seconds("max_open_for", d)?, jitter: 0.1 });
        }
        if let Some(n) = half_open_calls {
            b = b.half_open_calls(n);
        }
        if let Some(d) = max_half_open_wait {
            b = b.max_half_open_wait(Some(seconds("max_half_open_wait", d)?));
        }
        let config = b.build().map_err(|e| PyValueError::new_err(format!("breaker `{name}`: {e}")))?;
        Ok(Breaker { inner: CircuitBreaker::new(name, config), tally })
    }

    /// Admits a call (a permit to record its outcome on), or raises `envelope.CircuitOpen`.
    fn acquire(&self, py: Python<'_>) -> PyResult<BreakerPermit> {
        match self.inner.try_acquire_owned() {
            Ok(permit) => Ok(BreakerPermit { inner: Mutex::new(Some(permit)) }),
            Err(open) => Err(rejection(py, self.inner.name(), &envelope_core::Error::CircuitOpen(open))),
        }
    }

    /// The breaker's name.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// `closed`, `open`, `half_open`, `disabled`, `forced_open`, `forced_closed` or `metrics_only`.
    #[getter]
    fn state(&self) -> &'static str {
        self.inner.state().as_str()
    }

    /// The window now: state, calls, failures, slow calls, rates in percent (once the window holds the minimum
    /// number of calls), opens since the last close, and the time left open in seconds.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.metrics();
        let d = PyDict::new(py);
        d.set_item("state", m.state.as_str())?;
        d.set_item("calls", m.window.calls)?;
        d.set_item("failures", m.window.failures)?;
        d.set_item("slow", m.window.slow)?;
        d.set_item("failure_rate", m.failure_rate)?;
        d.set_item("slow_call_rate", m.slow_call_rate)?;
        d.set_item("consecutive_opens", m.consecutive_opens)?;
        d.set_item("remaining_open", m.remaining_open.map(|d| d.as_secs_f64()))?;
        d.set_item("rejections", self.tally.breaker_rejections.load(Ordering::Relaxed))?;
        let transitions = self.tally.transitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        d.set_item("transitions", transitions)?;
        Ok(d)
    }

    /// Opens the breaker until [`Breaker::force_closed`] or [`Breaker::reset`].
    fn force_open(&self) {
        self.inner.force_open();
    }

    /// Closes the breaker and keeps it closed whatever the calls do, until [`Breaker::reset`].
    fn force_closed(&self) {
        self.inner.force_closed();
    }

    /// Back to closed with an empty window.
    fn reset(&self) {
        self.inner.reset();
    }

    fn __repr__(&self) -> String {
        format!("CircuitBreaker(name={:?}, state={:?})", self.inner.name(), self.inner.state().as_str())
    }
}

/// One call admitted by a breaker. Record its outcome once; a permit never recorded counts for nothing (a probe
/// it held is handed back).
#[pyclass(frozen, module = "envelope._envelope")]
pub(crate) struct BreakerPermit {
    inner: Mutex<Option<OwnedPermit>>,
}

#[pymethods]
impl BreakerPermit {
    /// Records how the call ended, by outcome name (`"ok"`, `"failure"`, `"timeout"`, …). Only the first record
    /// (or release) counts.
    fn record(&self, outcome_name: &str) -> PyResult<()> {
        let outcome = outcome(outcome_name)?;
        if let Some(permit) = self.take()? {
            permit.record(outcome);
        }
        Ok(())
    }

    /// Lets the permit go without recording anything (the call is not the dependency's doing).
    fn release(&self) -> PyResult<()> {
        drop(self.take()?);
        Ok(())
    }
}

impl BreakerPermit {
    fn take(&self) -> PyResult<Option<OwnedPermit>> {
        Ok(self.inner.lock().map_err(|_| PyRuntimeError::new_err("permit lock poisoned"))?.take())
    }
}

/// The state names, for the stubs and the Python layer.
pub(crate) fn state_names() -> Vec<&'static str> {
    [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::Disabled,
        State::ForcedOpen,
        State::ForcedClosed,
        State::MetricsOnly,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect()
}
