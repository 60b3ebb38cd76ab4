//! The composite envelope, driven step by step by the Python layer (`envelope.Envelope`), and its making from
//! the sidecar's config file.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envelope_core::Outcome;
use envelope_core::circuit_breaker::CircuitBreaker;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::breaker::Breaker;
use crate::errors::rejection;
use crate::meter::{Meter, Tally};
use crate::{outcome, poisoned, seconds};

/// A composite envelope: the engine's policies in their documented order, driven step by step by the Python layer
/// (`envelope.Envelope`), which runs each attempt and spends each wait itself.
#[pyclass(frozen, module = "envelope._envelope")]
pub(crate) struct Envelope {
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
                let state = spec.initial_state();
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
pub(crate) struct Overrides {
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

/// A call in progress (see `envelope_core::compose::Steps`).
#[pyclass(frozen, module = "envelope._envelope")]
pub(crate) struct Steps {
    inner: Mutex<Option<envelope_core::Steps>>,
    /// The envelope's name, for the messages of rejections.
    name: Arc<str>,
    meter: Arc<Meter>,
    tally: Arc<Tally>,
    start: Instant,
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
pub(crate) struct StepAttempt {
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

    /// Gives the attempt up unreported: its bulkhead permit (or its place in the queue) and any breaker probe it
    /// held are handed back at once, counting for nothing. For an attempt that was cancelled: waiting for the
    /// object to be collected could take long (an exception's traceback keeps it alive).
    fn release(&self) -> PyResult<()> {
        drop(self.inner.lock().map_err(poisoned)?.take());
        Ok(())
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
pub(crate) struct LoopWaker {
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
