//! The package's rejection exceptions (`envelope._errors`, defined in Python), raised from here.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The package's `envelope.CircuitOpen`, raised from here (defined in Python, with `retry_after` and `outcome`).
pub(crate) static CIRCUIT_OPEN: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// The package's exception for a rejection (`envelope.CircuitOpen`, `BulkheadFull`, `RateLimited`,
/// `DeadlineExceeded`, `Overloaded`), with its message, `retry_after` (seconds, if known) and outcome.
pub(crate) fn rejection(py: Python<'_>, name: &str, e: &envelope_core::Error<std::convert::Infallible>) -> PyErr {
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
