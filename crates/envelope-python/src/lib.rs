//! `envelope._envelope`: Envelope's policy engine for Python.
//!
//! Every decision — the breaker's state machine and window, and, as the bindings grow, the retry schedule, the
//! budget, the bulkhead's queue, GCRA, shedding, SLO windows — is `envelope_core`'s; this module only maps Python
//! values onto it. The pure-Python package `envelope` (decorators, context managers, exception types) sits on top.
//!
//! Each policy is exposed as a *step* API, so that one engine serves functions and coroutines alike: the Python
//! layer asks for admission (a permit, or the package's own rejection exception), runs the call itself (awaiting
//! it, or calling it), and records its outcome on the permit. A permit dropped unrecorded (the call was cancelled,
//! or its exception is one the caller ignores) counts for nothing, as in Rust.
//!
//! | class | what |
//! |---|---|
//! | [`Breaker`] | a circuit breaker (`envelope_core::circuit_breaker`) |
//! | [`BreakerPermit`] | one admitted call, to record |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envelope_core::Outcome;
use envelope_core::circuit_breaker::{CircuitBreaker, Config, Escalation, OwnedPermit, State};
use envelope_core::event::{GiveUpReason, Listeners};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

/// The package's `envelope.CircuitOpen`, raised from here (defined in Python, with `retry_after` and `outcome`).
static CIRCUIT_OPEN: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A duration in seconds from Python (a float or an int), refused if negative or not finite.
fn seconds(field: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{field}: {value} is not a duration in seconds")))
}

/// An outcome by its name (`"ok"`, `"timeout"`, `"upstream_5xx"`, …).
fn outcome(name: &str) -> PyResult<Outcome> {
    Outcome::from_name(name).ok_or_else(|| {
        let names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        PyValueError::new_err(format!("unknown outcome `{name}`; one of {}", names.join(", ")))
    })
}

/// The request duration buckets, in seconds: the sidecar's (`envelope_http::observe::DURATION_BUCKETS`), so that
/// the rules and dashboards `envelope generate` writes apply to an application's own metrics unchanged.
const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What an envelope's calls did, counted where they end: calls by outcome, their durations, attempts made.
#[derive(Debug, Default)]
struct Meter {
    calls: [AtomicU64; Outcome::ALL.len()],
    /// Per bucket (not cumulative), the last one for calls over the largest bound.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    attempts: AtomicU64,
}

impl Meter {
    fn record(&self, outcome: Outcome, elapsed: Duration) {
        self.calls[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = DURATION_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl Meter {
    /// The counts as Python sees them (see [`Envelope::metrics`]).
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
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
struct Tally {
    retries: AtomicU64,
    /// By [`GiveUpReason::ALL`] index.
    gave_up: [AtomicU64; GiveUpReason::ALL.len()],
    /// `[queue full, waited and the wait ran out]`.
    bulkhead_rejected: [AtomicU64; 2],
    /// `[enforced, shadow]`.
    rate_limited: [AtomicU64; 2],
    timeouts: AtomicU64,
    breaker_rejections: AtomicU64,
    /// Breaker transitions seen, by `(from, to)`.
    transitions: Mutex<Vec<(&'static str, &'static str, u64)>>,
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
    fn listeners(self: &Arc<Self>) -> Listeners {
        Listeners::new().with_arc(self.clone())
    }

    /// The counts as Python sees them (keys of `Envelope.metrics()` and `Breaker.metrics()`).
    fn fill(&self, d: &Bound<'_, PyDict>) -> PyResult<()> {
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
struct PyMeter {
    inner: Meter,
}

#[pymethods]
impl PyMeter {
    #[new]
    fn new() -> Self {
        PyMeter { inner: Meter::default() }
    }

    /// Counts one request that ended in `outcome_name` after `seconds`.
    fn record(&self, outcome_name: &str, seconds: f64) -> PyResult<()> {
        self.inner.record(outcome(outcome_name)?, seconds_or_zero(seconds));
        Ok(())
    }

    /// The counts (as `Envelope.metrics`).
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.inner.snapshot(py)
    }
}

fn seconds_or_zero(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

/// A service level objective in the engine's rolling windows (5 m … 30 d): the tier's availability and latency
/// targets (`critical`, `default`, `non_critical`, as the sidecar's tiers).
#[pyclass(frozen, module = "envelope._envelope")]
struct Slo {
    inner: envelope_core::slo::Slo,
}

fn alert_name(a: envelope_core::slo::Alert) -> &'static str {
    match a {
        envelope_core::slo::Alert::None => "none",
        envelope_core::slo::Alert::Ticket => "ticket",
        envelope_core::slo::Alert::Page => "page",
    }
}

#[pymethods]
impl Slo {
    #[new]
    fn new(tier: &str) -> PyResult<Self> {
        use envelope_core::slo::Objective;
        let objective = match tier {
            "critical" => Objective::CRITICAL,
            "default" => Objective::DEFAULT,
            "non_critical" => Objective::NON_CRITICAL,
            other => return Err(PyValueError::new_err(format!("unknown tier `{other}`"))),
        };
        let inner = envelope_core::slo::Slo::new(objective).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Slo { inner })
    }

    /// Counts a call that ended in `outcome_name` after `seconds` (against availability as the sidecar counts:
    /// failures and timeouts, not the caller's 4xx or its cancellations).
    fn record(&self, outcome_name: &str, seconds: f64) -> PyResult<()> {
        let outcome = outcome(outcome_name)?;
        if outcome != Outcome::ClientCancelled {
            self.inner.record(outcome.counts_against_availability(), seconds_or_zero(seconds));
        }
        Ok(())
    }

    /// The state now: `availability` and `budget_remaining` over 30 days, `burn_rates` per window
    /// (`5m`, `30m`, `1h`, `6h`, `3d`, `30d`), `alert` (`none`, `ticket`, `page`), and the same for latency.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.inner.report();
        let d = PyDict::new(py);
        d.set_item("availability", r.availability)?;
        d.set_item("budget_remaining", r.budget_remaining)?;
        d.set_item("burn_rates", r.burn_rates.to_vec())?;
        d.set_item("alert", alert_name(r.alert))?;
        d.set_item("latency_budget_remaining", r.latency_budget_remaining)?;
        d.set_item("latency_burn_rates", r.latency_burn_rates.to_vec())?;
        d.set_item("latency_alert", alert_name(r.latency_alert))?;
        d.set_item("total", r.windows[5].total)?;
        d.set_item("errors", r.windows[5].errors)?;
        Ok(d)
    }
}

/// The priority of a request by its path (`critical`, `default`, `non_critical`): the sidecar's rule
/// (`envelope_http::tier`).
#[pyfunction]
fn priority_by_path(path: &str) -> &'static str {
    envelope_http::tier::priority_by_path(path).as_str()
}

/// A load shedder: a fixed limit of requests in flight, or the engine's adaptive limit, shared by priority
/// (non-critical work is shed first).
#[pyclass(frozen, module = "envelope._envelope")]
struct Shedder {
    inner: envelope_core::shed::LoadShedder,
    name: String,
}

#[pymethods]
impl Shedder {
    /// `limit`: that many in flight; `None`: the engine's adaptive limit with its defaults.
    #[new]
    #[pyo3(signature = (name, limit=None))]
    fn new(name: &str, limit: Option<usize>) -> PyResult<Self> {
        let b = envelope_core::shed::Config::builder();
        let b = match limit {
            Some(n) => b.fixed(n),
            None => b,
        };
        let config = b.build().map_err(|e| PyValueError::new_err(format!("shedder `{name}`: {e}")))?;
        Ok(Shedder { inner: envelope_core::shed::LoadShedder::new(name, config), name: name.to_owned() })
    }

    /// Admits a call of `priority` (`critical`, `default`, `non_critical`), or raises `envelope.Overloaded`.
    fn acquire(&self, py: Python<'_>, priority: &str) -> PyResult<ShedPermit> {
        use envelope_core::shed::Priority;
        let priority = match priority {
            "critical" => Priority::Critical,
            "default" => Priority::Default,
            "non_critical" => Priority::NonCritical,
            other => return Err(PyValueError::new_err(format!("unknown priority `{other}`"))),
        };
        match self.inner.try_acquire(priority) {
            Ok(permit) => Ok(ShedPermit { inner: Mutex::new(Some(permit)) }),
            Err(e) => Err(rejection(py, &self.name, &envelope_core::Error::Shed(e))),
        }
    }

    /// The limit in force now.
    #[getter]
    fn limit(&self) -> usize {
        self.inner.limit()
    }
}

/// A slot in a shedder: record the call's outcome (an adaptive limit learns its latency); freed when recorded or
/// dropped.
#[pyclass(frozen, module = "envelope._envelope")]
struct ShedPermit {
    inner: Mutex<Option<envelope_core::shed::Permit>>,
}

#[pymethods]
impl ShedPermit {
    /// Frees the slot; an adaptive limit learns the call's latency unless the outcome carries none.
    fn record(&self, outcome_name: &str) -> PyResult<()> {
        let outcome = outcome(outcome_name)?;
        if let Some(permit) = self.inner.lock().map_err(poisoned)?.take() {
            permit.record(outcome);
        }
        Ok(())
    }
}

/// The request id of a request: its own `X-Request-ID` if valid (kept: `True`), else a new one — the sidecar's
/// rules (`envelope_http::request_id`): 1 to 128 characters from letters, digits and `-_.:/+=`.
#[pyfunction]
#[pyo3(signature = (incoming=None))]
fn request_id(incoming: Option<&[u8]>) -> (String, bool) {
    use envelope_http::request_id::RequestId;
    let parsed = incoming.and_then(|v| http::HeaderValue::from_bytes(v).ok()).and_then(|v| RequestId::parse(&v));
    match parsed {
        Some(id) => (id.as_str().to_owned(), true),
        None => (RequestId::generate().as_str().to_owned(), false),
    }
}

/// A status, header lines and a body, as an ASGI application sends them.
type ProblemAnswer = (u16, Vec<(Vec<u8>, Vec<u8>)>, Vec<u8>);

/// A problem document (RFC 9457), the sidecar's: `(status, headers, body)` for `outcome_name` with `detail`,
/// the request id, and `Retry-After` (seconds, spread as the sidecar spreads it). `status` overrides the outcome's.
#[pyfunction]
#[pyo3(signature = (outcome_name, detail, request_id=None, retry_after=None, status=None))]
fn problem(
    outcome_name: &str,
    detail: &str,
    request_id: Option<&str>,
    retry_after: Option<f64>,
    status: Option<u16>,
) -> PyResult<ProblemAnswer> {
    use envelope_http::request_id::RequestId;
    let outcome = outcome(outcome_name)?;
    let id = request_id.and_then(|v| http::HeaderValue::from_str(v).ok()).and_then(|v| RequestId::parse(&v));
    let retry_after = retry_after.map(seconds_or_zero);
    let status = match status {
        Some(s) => http::StatusCode::from_u16(s).map_err(|e| PyValueError::new_err(e.to_string()))?,
        None => envelope_http::problem::status_for(outcome),
    };
    let response = envelope_http::problem::problem_with_status(status, outcome, detail, id.as_ref(), retry_after);
    let headers =
        response.headers().iter().map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
    let body = http_body_util_collect(response.into_body());
    Ok((status.as_u16(), headers, body))
}

/// The bytes of a `Full` body (always ready).
fn http_body_util_collect(body: http_body_util::Full<bytes::Bytes>) -> Vec<u8> {
    use http_body::Body as _;
    let mut body = std::pin::pin!(body);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut out = Vec::new();
    while let std::task::Poll::Ready(Some(Ok(frame))) = body.as_mut().poll_frame(&mut cx) {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    out
}

/// A circuit breaker: the engine's state machine, window and probes.
#[pyclass(frozen, module = "envelope._envelope")]
struct Breaker {
    inner: CircuitBreaker,
    tally: Arc<Tally>,
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
struct BreakerPermit {
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
fn state_names() -> Vec<&'static str> {
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

#[pymodule]
fn _envelope(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Breaker>()?;
    m.add_class::<BreakerPermit>()?;
    m.add_class::<Envelope>()?;
    m.add_class::<Steps>()?;
    m.add_class::<StepAttempt>()?;
    m.add_class::<PyMeter>()?;
    m.add_class::<Shedder>()?;
    m.add_class::<Slo>()?;
    m.add_class::<ShedPermit>()?;
    m.add_function(wrap_pyfunction!(priority_by_path, m)?)?;
    m.add_function(wrap_pyfunction!(request_id, m)?)?;
    m.add_function(wrap_pyfunction!(problem, m)?)?;
    m.add("OUTCOMES", Outcome::ALL.iter().map(|o| o.as_str()).collect::<Vec<_>>())?;
    m.add("BREAKER_STATES", state_names())?;
    Ok(())
}

/// A composite envelope: the engine's policies in their documented order, driven step by step by the Python layer
/// (`envelope.Envelope`), which runs each attempt and spends each wait itself.
#[pyclass(frozen, module = "envelope._envelope")]
struct Envelope {
    inner: envelope_core::Envelope,
    name: Arc<str>,
    meter: Arc<Meter>,
    /// The engine's events for this envelope's retry, bulkhead and rate limit (its breaker counts its own).
    tally: Arc<Tally>,
    /// The name the bulkhead and rate limit report under (the `upstream` label): the envelope's, or the config
    /// file's upstream.
    upstream: Arc<str>,
    bulkhead: Option<envelope_core::bulkhead::Bulkhead>,
}

#[pymethods]
impl Envelope {
    #[new]
    #[pyo3(signature = (
        name, *, deadline=None, attempt_timeout=None, breaker=None, max_attempts=None, backoff=None,
        retry_on=None, budget=None, bulkhead=None, rate_limit=None, fallback_on=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        deadline: Option<f64>,
        attempt_timeout: Option<f64>,
        breaker: Option<&Breaker>,
        max_attempts: Option<u32>,
        backoff: Option<(&str, f64, f64, &str)>,
        retry_on: Option<Vec<String>>,
        budget: Option<(f64, u32, f32)>,
        bulkhead: Option<(usize, usize, f64)>,
        rate_limit: Option<(u32, f64, u32)>,
        fallback_on: Option<Vec<String>>,
    ) -> PyResult<Self> {
        use envelope_core::retry::{Backoff, Growth, Jitter, Retry, RetryBudget};
        let bad =
            |what: &str, e: &dyn std::fmt::Display| PyValueError::new_err(format!("envelope `{name}`: {what}: {e}"));
        let overrides = Overrides::from_env(name)?;
        let deadline = overrides.deadline.map(|d| d.as_secs_f64()).or(deadline);
        let attempt_timeout = overrides.attempt_timeout.map(|d| d.as_secs_f64()).or(attempt_timeout);
        let max_attempts = overrides.max_attempts.or(max_attempts);
        let tally = Arc::<Tally>::default();
        let mut b = envelope_core::Envelope::builder().name(name);
        if let Some(d) = deadline {
            b = b.deadline(seconds("deadline", d)?);
        }
        if let Some(d) = attempt_timeout {
            b = b.attempt_timeout(seconds("attempt_timeout", d)?);
        }
        if let Some(breaker) = breaker {
            b = b.circuit_breaker(breaker.inner.clone());
        }
        if max_attempts.is_some() || backoff.is_some() || retry_on.is_some() || budget.is_some() {
            let mut r = envelope_core::retry::Config::builder();
            if let Some(n) = max_attempts {
                r = r.max_attempts(n);
            }
            if let Some((growth, base, max_delay, jitter)) = backoff {
                let growth = match growth {
                    "constant" => Growth::Constant,
                    "linear" => Growth::Linear,
                    "exponential" => Growth::Exponential { multiplier: envelope_core::retry::DEFAULT_MULTIPLIER },
                    other => return Err(bad("backoff", &format!("unknown growth `{other}`"))),
                };
                let jitter = match jitter {
                    "none" => Jitter::None,
                    "full" => Jitter::Full,
                    "equal" => Jitter::Equal,
                    "decorrelated" => Jitter::Decorrelated,
                    other => return Err(bad("backoff", &format!("unknown jitter `{other}`"))),
                };
                let backoff = Backoff::new(growth, seconds("base", base)?, seconds("max_delay", max_delay)?, jitter)
                    .map_err(|e| bad("backoff", &e))?;
                r = r.backoff(backoff);
            }
            if let Some(names) = retry_on {
                let mut set = envelope_core::OutcomeSet::EMPTY;
                for n in &names {
                    set = set.with(outcome(n)?);
                }
                r = r.retry_on(set);
            }
            if let Some((ttl, min_per_second, ratio)) = budget {
                let budget = RetryBudget::new(seconds("budget ttl", ttl)?, min_per_second, ratio)
                    .map_err(|e| bad("budget", &e))?;
                r = r.budget(budget);
            }
            let config = r.build().map_err(|e| bad("retry", &e))?.with_listeners(tally.listeners());
            b = b.retry(Retry::new(name, config));
        }
        let mut shared_bulkhead = None;
        if let Some((max_concurrent, queue, wait)) = bulkhead {
            let config = envelope_core::bulkhead::Config::builder()
                .max_concurrent(max_concurrent)
                .queue(queue, seconds("bulkhead wait", wait)?)
                .listeners(tally.listeners())
                .build()
                .map_err(|e| bad("bulkhead", &e))?;
            let bulkhead = envelope_core::bulkhead::Bulkhead::new(name, config);
            shared_bulkhead = Some(bulkhead.clone());
            b = b.bulkhead(bulkhead);
        }
        if let Some((rate, per, burst)) = rate_limit {
            let config = envelope_core::rate_limit::Config::per(rate, seconds("rate_limit per", per)?)
                .burst(burst)
                .build()
                .map_err(|e| bad("rate_limit", &e))?
                .with_listeners(tally.listeners());
            b = b.rate_limiter(envelope_core::rate_limit::RateLimiter::new(name, config));
        }
        if let Some(names) = fallback_on {
            let mut set = envelope_core::OutcomeSet::EMPTY;
            for n in &names {
                set = set.with(outcome(n)?);
            }
            b = b.fallback(envelope_core::fallback::Fallback::new(name).on(set));
        }
        Ok(Envelope {
            inner: b.build(),
            name: name.into(),
            meter: Arc::default(),
            tally,
            upstream: name.into(),
            bulkhead: shared_bulkhead,
        })
    }

    /// The envelope of route `name` in the config file at `path`, read and validated exactly as the sidecar reads
    /// it (an error names the file, line, column and field): the route's timeout as the deadline, its attempt
    /// timeout and retry, and its upstream's breaker, bulkhead and rate limit. `name` may also name an upstream
    /// (its policies only). `breakers`: the breakers the caller has, by name; the upstream's is used if there (routes to one
    /// upstream share it, as in the sidecar). Returns the envelope, the breaker it uses, if any, and the
    /// upstream's name. The `ENVELOPE_<NAME>_*` overrides apply as to any envelope.
    #[staticmethod]
    #[pyo3(signature = (path, name, breakers=None))]
    fn from_config(
        path: &str,
        name: &str,
        breakers: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(Envelope, Option<Breaker>, String)> {
        use envelope_config::BreakerMode;
        let config = envelope_config::Config::load(std::path::Path::new(path))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let (route, upstream) = match config.routes.iter().find(|r| r.name == name) {
            Some(r) => (Some(r), &config.upstreams[r.upstream]),
            None => match config.upstreams.iter().find(|u| u.name == name) {
                Some(u) => (None, u),
                None => {
                    let routes: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
                    let upstreams: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
                    return Err(PyValueError::new_err(format!(
                        "{path}: no route or upstream named `{name}` (routes: {}; upstreams: {})",
                        routes.join(", "),
                        upstreams.join(", ")
                    )));
                }
            },
        };
        let overrides = Overrides::from_env(name)?;
        let known = match breakers.map(|d| d.get_item(&upstream.name)).transpose()?.flatten() {
            Some(found) => {
                let found = found.extract::<PyRef<'_, Breaker>>()?;
                Some(Breaker { inner: found.inner.clone(), tally: found.tally.clone() })
            }
            None => None,
        };
        let tally = Arc::<Tally>::default();
        let breaker = match (known, &upstream.breaker) {
            (Some(known), _) => Some(known),
            (None, Some(spec)) => {
                let state = match spec.mode {
                    BreakerMode::Normal => State::Closed,
                    BreakerMode::Disabled => State::Disabled,
                    BreakerMode::MetricsOnly => State::MetricsOnly,
                };
                let breaker_tally = Arc::<Tally>::default();
                let config = spec.config.clone().with_listeners(breaker_tally.listeners());
                let inner = CircuitBreaker::with_state(upstream.name.clone(), config, state);
                Some(Breaker { inner, tally: breaker_tally })
            }
            (None, None) => None,
        };
        let mut b = envelope_core::Envelope::builder().name(name);
        if let Some(b2) = &breaker {
            b = b.circuit_breaker(b2.inner.clone());
        }
        let mut shared_bulkhead = None;
        if let Some(c) = &upstream.bulkhead {
            let config = c.clone().with_listeners(tally.listeners());
            let bulkhead = envelope_core::bulkhead::Bulkhead::new(upstream.name.clone(), config);
            shared_bulkhead = Some(bulkhead.clone());
            b = b.bulkhead(bulkhead);
        }
        if let Some(c) = &upstream.rate_limit {
            let config = c.clone().with_listeners(tally.listeners());
            b = b.rate_limiter(envelope_core::rate_limit::RateLimiter::new(upstream.name.clone(), config));
        }
        let deadline = overrides.deadline.or(route.map(|r| r.timeout));
        if let Some(d) = deadline {
            b = b.deadline(d);
        }
        if let Some(d) = overrides.attempt_timeout.or(route.and_then(|r| r.attempt_timeout)) {
            b = b.attempt_timeout(d);
        }
        let retry = route.and_then(|r| r.retry.clone());
        let retry = match (retry, overrides.max_attempts) {
            (retry, None) => retry,
            (retry, Some(n)) => Some(
                retry
                    .map_or_else(envelope_core::retry::Config::builder, |c| c.to_builder())
                    .max_attempts(n)
                    .build()
                    .map_err(|e| PyValueError::new_err(format!("envelope `{name}`: retry: {e}")))?,
            ),
        };
        if let Some(c) = retry {
            b = b.retry(envelope_core::retry::Retry::new(name, c.with_listeners(tally.listeners())));
        }
        let envelope = Envelope {
            inner: b.build(),
            name: name.into(),
            meter: Arc::default(),
            tally,
            upstream: upstream.name.as_str().into(),
            bulkhead: shared_bulkhead,
        };
        Ok((envelope, breaker, upstream.name.clone()))
    }

    /// Starts a call, or raises `envelope.Overloaded` (shed).
    fn steps(&self, py: Python<'_>) -> PyResult<Steps> {
        let start = Instant::now();
        match self.inner.steps() {
            Ok(steps) => {
                let (name, meter, tally) = (self.name.clone(), self.meter.clone(), self.tally.clone());
                Ok(Steps { inner: Mutex::new(Some(steps)), name, meter, tally, start })
            }
            Err(e) => {
                self.meter.record(Outcome::Shed, start.elapsed());
                Err(rejection(py, &self.name, &e))
            }
        }
    }

    /// What the envelope's calls did so far: `calls` by outcome name, `buckets` as `(upper bound in seconds,
    /// cumulative count)` ending with `+Inf`, `sum` of durations in seconds, `count`, and `attempts`; with a
    /// bulkhead, `bulkhead`: its `max_concurrent`, `active`, `queued` and `rejected` now.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = self.meter.snapshot(py)?;
        self.tally.fill(&d)?;
        d.set_item("upstream", &*self.upstream)?;
        if let Some(b) = &self.bulkhead {
            let m = b.metrics();
            let bd = PyDict::new(py);
            bd.set_item("max_concurrent", m.max_concurrent)?;
            bd.set_item("active", m.active)?;
            bd.set_item("queued", m.queued)?;
            bd.set_item("rejected", m.rejected)?;
            d.set_item("bulkhead", bd)?;
        }
        Ok(d)
    }
}

/// Settings an operator overrides for one envelope through the environment, over what the code or the config file
/// says: `ENVELOPE_<NAME>_DEADLINE`, `ENVELOPE_<NAME>_ATTEMPT_TIMEOUT` (durations as in the config file, `"250ms"`,
/// `"5s"`) and `ENVELOPE_<NAME>_MAX_ATTEMPTS`, `<NAME>` being the envelope's name in upper case with every
/// character other than a letter or digit as `_`.
#[derive(Default)]
struct Overrides {
    deadline: Option<Duration>,
    attempt_timeout: Option<Duration>,
    max_attempts: Option<u32>,
}

impl Overrides {
    fn from_env(name: &str) -> PyResult<Overrides> {
        let prefix: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        let read = |setting: &str| {
            let var = format!("ENVELOPE_{prefix}_{setting}");
            std::env::var(&var).ok().map(|v| (var, v))
        };
        let duration = |setting: &str| -> PyResult<Option<Duration>> {
            match read(setting) {
                None => Ok(None),
                Some((var, v)) => envelope_config::Dur::parse(&v)
                    .map(|d| Some(d.0))
                    .map_err(|e| PyValueError::new_err(format!("environment variable {var}: {e}"))),
            }
        };
        let max_attempts = match read("MAX_ATTEMPTS") {
            None => None,
            Some((var, v)) => Some(v.trim().parse().map_err(|_| {
                PyValueError::new_err(format!("environment variable {var}: invalid number of attempts `{v}`"))
            })?),
        };
        Ok(Overrides { deadline: duration("DEADLINE")?, attempt_timeout: duration("ATTEMPT_TIMEOUT")?, max_attempts })
    }
}

/// The package's exception for a rejection (`envelope.CircuitOpen`, `BulkheadFull`, `RateLimited`,
/// `DeadlineExceeded`, `Overloaded`), with its message, `retry_after` (seconds, if known) and outcome.
fn rejection(py: Python<'_>, name: &str, e: &envelope_core::Error<std::convert::Infallible>) -> PyErr {
    use envelope_core::Error;
    static BULKHEAD_FULL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static RATE_LIMITED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static DEADLINE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static OVERLOADED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let (cell, class, retry_after, state) = match e {
        Error::CircuitOpen(c) => (&CIRCUIT_OPEN, "CircuitOpen", c.remaining(), Some(c.state().as_str())),
        Error::BulkheadFull(_) => (&BULKHEAD_FULL, "BulkheadFull", None, None),
        Error::RateLimited(r) => (&RATE_LIMITED, "RateLimited", Some(r.retry_after()), None),
        Error::Timeout(_) => (&DEADLINE, "DeadlineExceeded", None, None),
        _ => (&OVERLOADED, "Overloaded", None, None),
    };
    let retry_after = retry_after.map(|d| d.as_secs_f64());
    match cell.import(py, "envelope._errors", class) {
        Ok(ty) => PyErr::from_type(ty.clone(), (format!("`{name}`: {e}"), retry_after, state)),
        Err(import) => import,
    }
}

/// A call in progress (see `envelope_core::compose::Steps`).
#[pyclass(frozen, module = "envelope._envelope")]
struct Steps {
    inner: Mutex<Option<envelope_core::Steps>>,
    /// The envelope's name, for the messages of rejections.
    name: Arc<str>,
    meter: Arc<Meter>,
    tally: Arc<Tally>,
    start: Instant,
}

fn poisoned<T>(_: T) -> PyErr {
    PyRuntimeError::new_err("envelope step state poisoned")
}

impl Steps {
    /// The rejection of an attempt, as the package's exception; a deadline that ended the call is counted as a
    /// timeout that fired.
    fn refused(&self, py: Python<'_>, e: &envelope_core::Error<std::convert::Infallible>, outcome: Outcome) -> PyErr {
        if outcome == Outcome::Timeout {
            self.tally.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        rejection(py, &self.name, e)
    }
}

#[pymethods]
impl Steps {
    /// Admits the next attempt, or raises the package's rejection. `blocking`: wait in a bulkhead's queue (the
    /// interpreter is released while waiting); `queue`: join the bulkhead's queue and return an attempt whose
    /// `queue_wait` says how long it may wait there (on the caller's event loop, see `StepAttempt.ready`);
    /// otherwise a full bulkhead rejects at once.
    #[pyo3(signature = (blocking=false, queue=false))]
    fn admit(&self, py: Python<'_>, blocking: bool, queue: bool) -> PyResult<StepAttempt> {
        let mut guard = self.inner.lock().map_err(poisoned)?;
        let steps = guard.as_mut().ok_or_else(|| PyRuntimeError::new_err("the call has finished"))?;
        let admitted = if blocking {
            py.detach(|| steps.admit_blocking())
        } else if queue {
            steps.admit_or_queue()
        } else {
            steps.admit()
        };
        if admitted.is_ok() {
            self.meter.attempts.fetch_add(1, Ordering::Relaxed);
        }
        match admitted {
            Ok(attempt) => Ok(StepAttempt { inner: Mutex::new(Some(attempt)) }),
            Err((e, outcome)) => Err(self.refused(py, &e, outcome)),
        }
    }

    /// The attempt's wait in the bulkhead's queue ran out: returns if its permit came meanwhile, else raises the
    /// rejection (`BulkheadFull`, or `DeadlineExceeded` when the deadline ended the wait); report that with
    /// `rejected`.
    fn queue_timed_out(&self, py: Python<'_>, attempt: &StepAttempt) -> PyResult<()> {
        let mut slot = attempt.inner.lock().map_err(poisoned)?;
        let Some(taken) = slot.take() else { return Err(PyRuntimeError::new_err("the attempt was reported already")) };
        let mut guard = self.inner.lock().map_err(poisoned)?;
        let steps = guard.as_mut().ok_or_else(|| PyRuntimeError::new_err("the call has finished"))?;
        match steps.queue_timed_out(taken) {
            Ok(admitted) => {
                *slot = Some(admitted);
                Ok(())
            }
            Err((e, outcome)) => Err(self.refused(py, &e, outcome)),
        }
    }

    /// An attempt was rejected before it ran: seconds to wait before admitting another, or `None` to stop.
    fn rejected(&self, outcome_name: &str, retry_after: Option<f64>) -> PyResult<Option<f64>> {
        let outcome = outcome(outcome_name)?;
        let retry_after = retry_after.map(|s| seconds("retry_after", s)).transpose()?;
        let mut guard = self.inner.lock().map_err(poisoned)?;
        let steps = guard.as_mut().ok_or_else(|| PyRuntimeError::new_err("the call has finished"))?;
        Ok(steps.rejected(outcome, retry_after).map(|d| d.as_secs_f64()))
    }

    /// The attempt ended in `outcome_name`: seconds to wait before admitting another, or `None` to stop.
    #[pyo3(signature = (attempt, outcome_name, retry_after=None, may_retry=true))]
    fn after(
        &self,
        attempt: &StepAttempt,
        outcome_name: &str,
        retry_after: Option<f64>,
        may_retry: bool,
    ) -> PyResult<Option<f64>> {
        let outcome = outcome(outcome_name)?;
        let retry_after = retry_after.map(|s| seconds("retry_after", s)).transpose()?;
        let attempt = attempt.inner.lock().map_err(poisoned)?.take();
        let Some(attempt) = attempt else { return Err(PyRuntimeError::new_err("the attempt was reported already")) };
        let mut guard = self.inner.lock().map_err(poisoned)?;
        let steps = guard.as_mut().ok_or_else(|| PyRuntimeError::new_err("the call has finished"))?;
        if outcome == Outcome::Timeout {
            self.tally.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(steps.after(attempt, outcome, retry_after, may_retry).map(|d| d.as_secs_f64()))
    }

    /// The attempt answered: records it and ends the call (`after(attempt, "ok")` and `finish("ok")` in one step).
    fn succeeded(&self, attempt: &StepAttempt) -> PyResult<()> {
        let attempt = attempt.inner.lock().map_err(poisoned)?.take();
        let Some(attempt) = attempt else { return Err(PyRuntimeError::new_err("the attempt was reported already")) };
        if let Some(mut steps) = self.inner.lock().map_err(poisoned)?.take() {
            let _ = steps.after(attempt, Outcome::Ok, None, true);
            steps.finish(Outcome::Ok);
            self.meter.record(Outcome::Ok, self.start.elapsed());
        }
        Ok(())
    }

    /// Whether the envelope's fallback answers a call that ended in `outcome_name`.
    fn fallback_applies(&self, outcome_name: &str) -> PyResult<bool> {
        let outcome = outcome(outcome_name)?;
        let guard = self.inner.lock().map_err(poisoned)?;
        Ok(guard.as_ref().is_some_and(|s| s.fallback_applies(outcome)))
    }

    /// Seconds left before the envelope's deadline, if it has one.
    fn time_left(&self) -> PyResult<Option<f64>> {
        let guard = self.inner.lock().map_err(poisoned)?;
        Ok(guard.as_ref().and_then(|s| s.time_left()).map(|d| d.as_secs_f64()))
    }

    /// The call ended in `outcome_name`.
    fn finish(&self, outcome_name: &str) -> PyResult<()> {
        let outcome = outcome(outcome_name)?;
        if let Some(steps) = self.inner.lock().map_err(poisoned)?.take() {
            steps.finish(outcome);
            self.meter.record(outcome, self.start.elapsed());
        }
        Ok(())
    }
}

/// One admitted attempt.
#[pyclass(frozen, module = "envelope._envelope")]
struct StepAttempt {
    inner: Mutex<Option<envelope_core::StepAttempt>>,
}

#[pymethods]
impl StepAttempt {
    /// Seconds the attempt may take from now, if limited.
    #[getter]
    fn limit(&self) -> PyResult<Option<f64>> {
        let guard = self.inner.lock().map_err(poisoned)?;
        Ok(guard.as_ref().and_then(|a| a.limit()).map(|d| d.as_secs_f64()))
    }

    /// If the attempt waits in the bulkhead's queue: the most seconds it may wait from now.
    #[getter]
    fn queue_wait(&self) -> PyResult<Option<f64>> {
        let guard = self.inner.lock().map_err(poisoned)?;
        Ok(guard.as_ref().and_then(|a| a.queue_wait()).map(|d| d.as_secs_f64()))
    }

    /// Whether the attempt holds its bulkhead permit (true at once if it never queued). If not, and `event_loop`
    /// and `callback` are given, `callback` is scheduled on `event_loop` (`call_soon_threadsafe`) when the permit
    /// comes; call `ready()` again then.
    #[pyo3(signature = (event_loop=None, callback=None))]
    fn ready(&self, event_loop: Option<Py<PyAny>>, callback: Option<Py<PyAny>>) -> PyResult<bool> {
        let mut guard = self.inner.lock().map_err(poisoned)?;
        let Some(attempt) = guard.as_mut() else { return Ok(false) };
        let waker = match (event_loop, callback) {
            (Some(event_loop), Some(callback)) => Arc::new(LoopWaker { event_loop, callback }).into(),
            _ => std::task::Waker::noop().clone(),
        };
        Ok(attempt.poll_queue(&mut std::task::Context::from_waker(&waker)).is_ready())
    }
}

/// Wakes a Python event loop: the engine's bulkhead calls `wake` when it grants a queued permit, from whichever
/// thread returned the permit, possibly while it holds the queue's lock. Taking the interpreter there could
/// deadlock against a Python thread waiting for that lock, so the wake is handed to one notifier thread, which
/// holds nothing else when it attaches to the interpreter and schedules the callback on the loop.
struct LoopWaker {
    event_loop: Py<PyAny>,
    callback: Py<PyAny>,
}

impl std::task::Wake for LoopWaker {
    fn wake(self: Arc<Self>) {
        static NOTIFIER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Arc<LoopWaker>>>> =
            std::sync::OnceLock::new();
        let sender = NOTIFIER.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Arc<LoopWaker>>();
            std::thread::Builder::new()
                .name("envelope-notifier".into())
                .spawn(move || {
                    for waker in rx {
                        // A closed loop, or an interpreter shutting down, has no one left to wake.
                        let _ = Python::try_attach(|py| {
                            waker.event_loop.call_method1(py, "call_soon_threadsafe", (waker.callback.clone_ref(py),))
                        });
                    }
                })
                .expect("spawn the notifier thread");
            Mutex::new(tx)
        });
        if let Ok(sender) = sender.lock() {
            let _ = sender.send(self);
        }
    }
}
