//! `envelope._envelope`: Envelope's policy engine for Python.
//!
//! Every decision — the breaker's state machine and window, the retry schedule, the budget, the bulkhead's queue,
//! GCRA, shedding, SLO windows — is `envelope_core`'s; this module only maps Python values onto it. The
//! pure-Python package `envelope` (decorators, context managers, the ASGI middleware, exception types) sits on top.
//!
//! Each policy is exposed as a *step* API, so that one engine serves functions and coroutines alike: the Python
//! layer asks for admission (a permit, or the package's own rejection exception), runs the call itself (awaiting
//! it, or calling it), and records its outcome on the permit. A permit dropped unrecorded (the call was cancelled,
//! or its exception is one the caller ignores) counts for nothing, as in Rust.
//!
//! | module | what |
//! |---|---|
//! | [`breaker`] | `Breaker` and its permits (`envelope_core::circuit_breaker`) |
//! | [`envelope`] | the composite `Envelope`, driven step by step (`Steps`, `StepAttempt`), and `from_config` |
//! | [`edge`] | what the ASGI middleware needs: request ids, problem documents, the shedder, SLOs, tiers |
//! | [`meter`] | counts of calls and of the engine's events, read by `envelope.metrics` |
//! | [`errors`] | the package's rejection exceptions, raised from here |

mod breaker;
mod edge;
mod envelope;
mod errors;
mod meter;

use std::time::Duration;

use envelope_core::Outcome;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

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

fn seconds_or_zero(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

#[pymodule]
fn _envelope(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use self::breaker::{Breaker, BreakerPermit, state_names};
    use self::edge::{ShedPermit, Shedder, Slo, priority_by_path, problem, request_id};
    use self::envelope::{Envelope, StepAttempt, Steps};
    use self::meter::PyMeter;
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

fn poisoned<T>(_: T) -> PyErr {
    PyRuntimeError::new_err("envelope step state poisoned")
}
