//! The step face of [`Envelope`]: a call driven by its caller, one step at a time, for callers that run each
//! attempt and spend each wait themselves — another language's event loop (the Python package drives coroutines
//! on asyncio this way), or a callback API.
//!
//! The same policies decide, in the same order, as in [`Envelope::call`]: shed at the start, then per attempt the
//! breaker, rate limit and bulkhead, each attempt's time limit (attempt timeout, retry policy, deadline), the
//! retry decision and its wait, the fallback's verdict. What differs, because the caller runs the attempt:
//! - the caller enforces the attempt's time limit ([`StepAttempt::limit`]) and the waits ([`Steps::after`]);
//! - a bulkhead admits without waiting ([`Steps::admit`]), after a wait in its queue on a thread
//!   ([`Steps::admit_blocking`]), or with a place in its queue the caller waits on ([`Steps::admit_or_queue`]);
//! - hedging and fault injection are not applied.

use std::future::Future;
use std::time::Duration;

use super::Envelope;
use crate::bulkhead;
use crate::circuit_breaker;
use crate::clock::{self, Instant};
use crate::error::Error;
use crate::outcome::Outcome;
use crate::retry::{Driver, Hint};
use crate::shed;

/// A call in progress, driven step by step (see the module docs). Dropping it unfinished counts as a cancelled
/// call.
#[derive(Debug)]
pub struct Steps {
    envelope: Envelope,
    shed: Option<shed::Permit>,
    driver: Driver,
    /// The envelope's deadline, if it has one.
    deadline: Option<Instant>,
}

/// One admitted attempt: run it within [`StepAttempt::limit`], then report it with [`Steps::after`]. Dropped
/// unreported, it counts for nothing (a breaker probe it held is handed back).
#[derive(Debug)]
pub struct StepAttempt {
    breaker: Option<circuit_breaker::OwnedPermit>,
    bulkhead: Option<bulkhead::OwnedPermit>,
    /// Admitted by [`Steps::admit_or_queue`] into the bulkhead's queue: waiting for its permit.
    queued: Option<bulkhead::Queued>,
    limit: Option<Duration>,
    deadline: Option<Instant>,
}

impl StepAttempt {
    /// How long the attempt may take from now: the shortest of the attempt timeout, the retry policy's
    /// per-attempt timeout and the time left before the deadline.
    pub fn limit(&self) -> Option<Duration> {
        clock::shorter(self.limit, self.deadline.map(|d| d.saturating_duration_since(clock::now())))
    }

    /// If the attempt waits in the bulkhead's queue: the longest it may wait from now (the queue's wait, or the
    /// time left before the deadline if shorter). Wait by polling [`StepAttempt::poll_queue`]; when the wait runs
    /// out, [`Steps::queue_timed_out`].
    pub fn queue_wait(&self) -> Option<Duration> {
        let queued = self.queued.as_ref()?;
        clock::shorter(Some(queued.max_wait()), self.deadline.map(|d| d.saturating_duration_since(clock::now())))
    }

    /// Polls the bulkhead's queue: ready once the attempt holds its permit (at once if it never queued).
    pub fn poll_queue(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Some(queued) = &mut self.queued else { return std::task::Poll::Ready(()) };
        match std::pin::Pin::new(queued).poll(cx) {
            std::task::Poll::Ready(permit) => {
                self.queued = None;
                self.bulkhead = Some(permit);
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Envelope {
    /// Starts a call driven step by step by the caller, or rejects it at once (shed). See [`Steps`].
    pub fn steps(&self) -> Result<Steps, Error<std::convert::Infallible>> {
        let p = &*self.inner;
        let shed = match &p.shed {
            Some((shedder, priority)) => Some(shedder.try_acquire(*priority).map_err(Error::Shed)?),
            None => None,
        };
        let start = p.deadline.map(|_| clock::now());
        let deadline = start.zip(p.deadline).map(|(s, d)| s + d);
        let driver = Driver::new(p.retry.as_ref(), deadline, start);
        Ok(Steps { envelope: self.clone(), shed, driver, deadline })
    }
}

impl Steps {
    /// Admits the next attempt — breaker, then rate limit, then bulkhead without waiting — or says why not (the
    /// rejection's error and outcome; report it with [`Steps::rejected`] to learn whether to try again).
    pub fn admit(&mut self) -> Result<StepAttempt, (Error<std::convert::Infallible>, Outcome)> {
        self.admit_with(|b| b.try_acquire_owned().map(bulkhead::Admission::Acquired))
    }

    /// Like [`Steps::admit`], waiting in the bulkhead's queue (blocking the thread) as its configuration allows.
    pub fn admit_blocking(&mut self) -> Result<StepAttempt, (Error<std::convert::Infallible>, Outcome)> {
        self.admit_with(|b| b.acquire_blocking_owned().map(bulkhead::Admission::Acquired))
    }

    /// Like [`Steps::admit`], joining the bulkhead's queue as its configuration allows: the attempt may then have
    /// to wait for its permit ([`StepAttempt::queue_wait`]) on the caller's event loop before it runs.
    pub fn admit_or_queue(&mut self) -> Result<StepAttempt, (Error<std::convert::Infallible>, Outcome)> {
        self.admit_with(bulkhead::Bulkhead::acquire_or_queue)
    }

    /// The attempt's wait in the bulkhead's queue ran out: the attempt, if its permit came meanwhile, or the
    /// rejection (report it with [`Steps::rejected`]). A breaker probe the attempt held is handed back.
    pub fn queue_timed_out(
        &mut self,
        mut attempt: StepAttempt,
    ) -> Result<StepAttempt, (Error<std::convert::Infallible>, Outcome)> {
        let Some(queued) = attempt.queued.take() else { return Ok(attempt) };
        if self.deadline.is_some_and(|d| clock::now() >= d) {
            drop(queued);
            let limit = self.envelope.inner.deadline.unwrap_or_default();
            return Err((self.envelope.timed_out(limit), Outcome::Timeout));
        }
        match queued.leave() {
            Ok(permit) => {
                attempt.bulkhead = Some(permit);
                Ok(attempt)
            }
            Err(e) => Err((Error::BulkheadFull(e), Outcome::BulkheadFull)),
        }
    }

    fn admit_with(
        &mut self,
        bulkhead: impl FnOnce(&bulkhead::Bulkhead) -> Result<bulkhead::Admission, bulkhead::BulkheadFull>,
    ) -> Result<StepAttempt, (Error<std::convert::Infallible>, Outcome)> {
        let p = &*self.envelope.inner;
        if self.deadline.is_some_and(|d| clock::now() >= d) {
            let limit = p.deadline.unwrap_or_default();
            return Err((self.envelope.timed_out(limit), Outcome::Timeout));
        }
        let limit = self.driver.begin(p.retry.as_ref(), p.attempt_timeout);
        let breaker = match &p.breaker {
            Some(b) => Some(b.try_acquire_owned().map_err(|e| (Error::CircuitOpen(e), Outcome::CircuitOpen))?),
            None => None,
        };
        if let Some(limiter) = &p.rate_limit {
            limiter.try_acquire().map_err(|e| (Error::RateLimited(e), Outcome::LocalRateLimited))?;
        }
        let (bulkhead, queued) = match &p.bulkhead {
            Some(b) => match bulkhead(b).map_err(|e| (Error::BulkheadFull(e), Outcome::BulkheadFull))? {
                bulkhead::Admission::Acquired(permit) => (Some(permit), None),
                bulkhead::Admission::Queued(queued) => (None, Some(queued)),
            },
            None => (None, None),
        };
        Ok(StepAttempt { breaker, bulkhead, queued, limit, deadline: self.deadline })
    }

    /// The attempt ended in `outcome` (`retry_after`: the dependency's requested wait; `may_retry`: whether this
    /// call may be repeated at all): `Some(wait)` to wait that long and admit another attempt, `None` to stop.
    pub fn after(
        &mut self,
        attempt: StepAttempt,
        outcome: Outcome,
        retry_after: Option<Duration>,
        may_retry: bool,
    ) -> Option<Duration> {
        let StepAttempt { breaker, bulkhead, .. } = attempt;
        if let Some(permit) = breaker {
            permit.record(outcome);
        }
        drop(bulkhead);
        self.decide(outcome, Hint { retry_after, may_retry })
    }

    /// An attempt was rejected before it ran (by [`Steps::admit`]): whether (and after how long) to try again.
    pub fn rejected(&mut self, outcome: Outcome, retry_after: Option<Duration>) -> Option<Duration> {
        self.decide(outcome, Hint { retry_after, may_retry: true })
    }

    fn decide(&mut self, outcome: Outcome, hint: Hint) -> Option<Duration> {
        self.driver.after(self.envelope.inner.retry.as_ref(), outcome, hint)
    }

    /// Whether the envelope's fallback answers a call that ended in `outcome`.
    pub fn fallback_applies(&self, outcome: Outcome) -> bool {
        let p = &*self.envelope.inner;
        !outcome.is_ok() && p.fallback.as_ref().is_some_and(|f| f.applies(outcome))
    }

    /// Time left before the envelope's deadline, if it has one.
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(clock::now()))
    }

    /// The call ended in `outcome`: the shedder learns its latency.
    pub fn finish(mut self, outcome: Outcome) {
        if let Some(permit) = self.shed.take() {
            permit.record(outcome);
        }
    }
}
