//! What the ASGI middleware needs from the engine: request ids, problem documents, the shedder, SLOs and the
//! tier of a path.

use std::sync::Mutex;

use envelope_core::Outcome;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::rejection;
use crate::{outcome, poisoned, seconds_or_zero};

/// A service level objective in the engine's rolling windows (5 m … 30 d): the tier's availability and latency
/// targets (`critical`, `default`, `non_critical`, as the sidecar's tiers).
#[pyclass(frozen, module = "envelope._envelope")]
pub(crate) struct Slo {
    inner: envelope_core::slo::Slo,
}

pub(crate) fn alert_name(a: envelope_core::slo::Alert) -> &'static str {
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
pub(crate) fn priority_by_path(path: &str) -> &'static str {
    envelope_http::tier::priority_by_path(path).as_str()
}

/// A load shedder: a fixed limit of requests in flight, or the engine's adaptive limit, shared by priority
/// (non-critical work is shed first).
#[pyclass(frozen, module = "envelope._envelope")]
pub(crate) struct Shedder {
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
pub(crate) struct ShedPermit {
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
pub(crate) fn request_id(incoming: Option<&[u8]>) -> (String, bool) {
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
pub(crate) fn problem(
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
pub(crate) fn http_body_util_collect(body: http_body_util::Full<bytes::Bytes>) -> Vec<u8> {
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
