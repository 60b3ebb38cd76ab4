//! Composition: every policy in the documented order, in one place, usable three ways.
//!
//! ```text
//!  call ──► shed ──► deadline ──► fallback ──► retry ──► hedge ──► breaker ──► rate limit ──► bulkhead ──► attempt timeout ──► fault ──► f()
//!            (2)       (3)          (4)         (5)       (6)        (7)          (8)            (9)            (10)            (11)
//! ```
//!
//! Why this order (numbers as in `docs/architecture.md`):
//!
//! - **Shed** first: a call we will not serve should cost nothing, not even a deadline timer.
//! - **Deadline** outside retry: it bounds the whole call, waits between attempts included.
//! - **Fallback** outside retry: it answers only once every attempt has failed.
//! - **Retry** outside the breaker, rate limit and bulkhead: each attempt asks each of them again, so a retry
//!   never bypasses an open breaker or a full bulkhead (and their rejections are not retried by default).
//! - **Hedge** inside retry: a hedged group is one attempt to the retry policy.
//! - **Breaker** before rate limit and bulkhead: an open breaker rejects without using a token or a permit; a
//!   permit it gave is handed back if the call is then rejected locally.
//! - **Bulkhead** innermost of the admission checks: it holds its permit only while the call really runs.
//! - **Attempt timeout** inside the bulkhead: queue wait does not eat into the attempt's time, and the permit is
//!   released as soon as the attempt is cancelled.
//! - **Fault injection** innermost: an injected failure or delay looks exactly like the dependency's own, so every
//!   other policy reacts to it as it would in a real incident.
//!
//! The ways to use it: [`Envelope::call`] for async code, [`Envelope::call_blocking`] for blocking clients on
//! threads without a runtime, [`EnvelopeLayer`] for tower services, and [`Envelope::steps`] for a caller that runs
//! each attempt itself (another language's event loop).

mod blocking;
mod cover;
mod layer;
mod steps;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

pub use layer::{EnvelopeLayer, EnvelopeService, ResponseFuture};
pub use steps::{StepAttempt, Steps};

use crate::bulkhead::Bulkhead;
use crate::circuit_breaker::CircuitBreaker;
use crate::clock::{self, Instant};
use crate::error::Error;
use crate::event::{Event, Listeners};
use crate::fallback::Fallback;
use crate::fault::FaultInjector;
use crate::hedge::Hedge;
use crate::outcome::{Classify, DefaultClassifier, HasOutcome, Outcome};
use crate::rate_limit::RateLimiter;
use crate::retry::{Driver, Hint, Retry, classified};
use crate::shed::{LoadShedder, Priority};
use crate::timeout::Elapsed;

/// How one call runs, for a caller that needs more than [`Envelope::call_classified`] (see
/// [`Envelope::call_with`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct CallOptions<'a> {
    /// When the call began (say, when its request arrived, before its body was read): the deadline counts from
    /// then. Now, by default.
    pub started: Option<Instant>,
    /// The caller's own deadline (such as gRPC's `grpc-timeout`), from `started`: the call's deadline is this when
    /// it is sooner than the envelope's own, and an envelope without a deadline takes it.
    pub within: Option<Duration>,
    /// Counts the attempts admitted (past the breaker, the rate limit and the bulkhead), including those an
    /// injected fault answered: a call rejected before any attempt leaves it as it was.
    pub attempts: Option<&'a AtomicU32>,
}

/// Policies composed in the documented order. Cloning is one reference-count increment; clones share all state.
#[derive(Clone)]
pub struct Envelope {
    inner: Arc<Policies>,
}

#[derive(Default)]
struct Policies {
    name: Option<Arc<str>>,
    shed: Option<(LoadShedder, Priority)>,
    deadline: Option<Duration>,
    fallback: Option<Fallback>,
    retry: Option<Retry>,
    hedge: Option<Hedge>,
    breaker: Option<CircuitBreaker>,
    rate_limit: Option<RateLimiter>,
    global_limit: Option<crate::distributed::GlobalLimiter>,
    bulkhead: Option<Bulkhead>,
    attempt_timeout: Option<Duration>,
    fault: Option<FaultInjector>,
    listeners: Listeners,
}

/// Builds an [`Envelope`]. The order in which policies are added does not matter: they always run in the
/// documented order.
#[derive(Default)]
pub struct Builder {
    p: Policies,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder").finish_non_exhaustive()
    }
}

impl Builder {
    /// Names the composition.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.p.name = Some(name.into());
        self
    }
    /// (2) Sheds load with `shedder`; calls through this envelope have `priority`.
    pub fn shed(mut self, shedder: LoadShedder, priority: Priority) -> Self {
        self.p.shed = Some((shedder, priority));
        self
    }
    /// (3) Bounds the whole call, waits between retries included.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.p.deadline = Some(deadline);
        self
    }
    /// (4) Falls back on the fallback's outcomes (the fallback value is given per call).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.p.fallback = Some(fallback);
        self
    }
    /// (5) Retries. The retry's own `deadline` and `per_attempt_timeout`, if set, apply too.
    pub fn retry(mut self, retry: Retry) -> Self {
        self.p.retry = Some(retry);
        self
    }
    /// (6) Hedges each attempt.
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.p.hedge = Some(hedge);
        self
    }
    /// (7) Guards the dependency with a circuit breaker.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.p.breaker = Some(breaker);
        self
    }
    /// (8) Limits the rate of attempts.
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.p.rate_limit = Some(limiter);
        self.p.global_limit = None;
        self
    }
    /// (8) Limits the rate of attempts with a limit shared by a fleet (distributed mode), instead of an
    /// instance's own: each attempt asks the store (within its operation timeout; the instance's own limiter
    /// decides while the store cannot answer). Applied by the async face ([`Envelope::call`]); the blocking and
    /// step faces use the limiter's local fallback.
    pub fn shared_rate_limit(mut self, limiter: crate::distributed::GlobalLimiter) -> Self {
        self.p.rate_limit = Some(limiter.local().clone());
        self.p.global_limit = Some(limiter);
        self
    }
    /// (9) Limits concurrent attempts.
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.p.bulkhead = Some(bulkhead);
        self
    }
    /// (10) Times out each attempt.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.p.attempt_timeout = Some(timeout);
        self
    }
    /// (11) Injects faults into each attempt.
    pub fn fault(mut self, fault: FaultInjector) -> Self {
        self.p.fault = Some(fault);
        self
    }
    /// Sends the envelope's own events (its deadline and attempt timeouts firing) to `listeners`. Each policy
    /// reports to the listeners in its own configuration.
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.p.listeners = listeners;
        self
    }
    /// The envelope.
    pub fn build(self) -> Envelope {
        Envelope { inner: Arc::new(self.p) }
    }
}

/// One attempt's result, outcome, and what the classifier said about repeating it.
pub(crate) type Attempt<T, E> = (Result<T, Error<E>>, Outcome, Hint);

impl Envelope {
    /// An empty builder.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The circuit breaker, if any.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.breaker.as_ref()
    }
    /// The bulkhead, if any.
    pub fn bulkhead(&self) -> Option<&Bulkhead> {
        self.inner.bulkhead.as_ref()
    }
    /// The rate limiter shared by a fleet, if any.
    pub fn shared_rate_limiter(&self) -> Option<&crate::distributed::GlobalLimiter> {
        self.inner.global_limit.as_ref()
    }
    /// The rate limiter, if any.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.inner.rate_limit.as_ref()
    }
    /// The load shedder, if any.
    pub fn shedder(&self) -> Option<&LoadShedder> {
        self.inner.shed.as_ref().map(|(s, _)| s)
    }
    /// The retry policy, if any.
    pub fn retry(&self) -> Option<&Retry> {
        self.inner.retry.as_ref()
    }
    /// The fault injector, if any.
    pub fn fault(&self) -> Option<&FaultInjector> {
        self.inner.fault.as_ref()
    }

    /// Runs `f` (once per attempt) through every policy; results are classified with [`DefaultClassifier`].
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.call_classified(&DefaultClassifier, f).await.0
    }

    /// Runs `f` through every policy, classifying with `classifier`. Also returns the final outcome.
    pub async fn call_classified<T, E, F, Fut, C>(&self, classifier: &C, f: F) -> (Result<T, Error<E>>, Outcome)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        self.run(classifier, f, None::<fn(Outcome) -> T>, CallOptions::default()).await
    }

    /// Like [`call_classified`](Self::call_classified), for a call that began at `started` (say, when its request
    /// arrived, before its body was read): the deadline counts from then, so it bounds the whole request.
    pub async fn call_classified_since<T, E, F, Fut, C>(
        &self,
        started: Instant,
        classifier: &C,
        f: F,
    ) -> (Result<T, Error<E>>, Outcome)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        self.call_with(CallOptions { started: Some(started), ..CallOptions::default() }, classifier, f).await
    }

    /// Like [`call_classified`](Self::call_classified), with the [`CallOptions`] a caller of its own may need:
    /// when the call began, its own deadline, and a counter of the attempts made.
    pub async fn call_with<T, E, F, Fut, C>(
        &self,
        options: CallOptions<'_>,
        classifier: &C,
        f: F,
    ) -> (Result<T, Error<E>>, Outcome)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        self.run(classifier, f, None::<fn(Outcome) -> T>, options).await
    }

    /// Like [`call`](Self::call), answering `fallback(outcome)` when the configured [`Fallback`] applies.
    pub async fn call_or<T, E, F, Fut>(&self, f: F, fallback: impl FnOnce(Outcome) -> T) -> Result<T, Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.run(&DefaultClassifier, f, Some(fallback), CallOptions::default()).await.0
    }

    async fn run<T, E, F, Fut, C, FB>(
        &self,
        classifier: &C,
        f: F,
        fallback: Option<FB>,
        options: CallOptions<'_>,
    ) -> (Result<T, Error<E>>, Outcome)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
        FB: FnOnce(Outcome) -> T,
    {
        let p = &*self.inner;
        // (2) Shed before anything else is spent on the call.
        let shed_permit = match &p.shed {
            Some((shedder, priority)) => match shedder.try_acquire(*priority) {
                Ok(permit) => Some(permit),
                Err(e) => return (Err(Error::Shed(e)), Outcome::Shed),
            },
            None => None,
        };
        // (3) The deadline covers every attempt and every wait: the envelope's, or the caller's if sooner.
        let CallOptions { started, within, attempts: counter } = options;
        let deadline = match (p.deadline, within) {
            (Some(own), Some(caller)) => Some(own.min(caller)),
            (own, caller) => own.or(caller),
        };
        let (result, outcome) = match deadline {
            Some(limit) => {
                let now = started.unwrap_or_else(clock::now);
                let cover = cover::Cover::new(now + limit);
                // Futures that nest a call are pinned where they are made and awaited by reference: passed by
                // value, each would be copied whole (hundreds of bytes, every call) into the wrapper's state.
                let attempts = std::pin::pin!(self.attempts(classifier, f, Some((&cover, now)), counter));
                match cover::Deadline::new(attempts, &cover).await {
                    Ok(done) => done,
                    Err(()) => (Err(self.timed_out(limit)), Outcome::Timeout),
                }
            }
            None => self.attempts(classifier, f, None, counter).await,
        };
        if let Some(permit) = shed_permit {
            permit.record(outcome);
        }
        // (4) Fallback once everything else has been tried.
        if let (Some(policy), Some(fallback)) = (&p.fallback, fallback)
            && !outcome.is_ok()
            && policy.applies(outcome)
        {
            return (Ok(fallback(outcome)), outcome);
        }
        (result, outcome)
    }

    /// (5) The retry loop around (6) hedged or single attempts, under the call's deadline (`cover`, with the instant
    /// it was set, which is also when the first attempt begins) if it has one. The clock is read only when a
    /// deadline needs it.
    async fn attempts<T, E, F, Fut, C>(
        &self,
        classifier: &C,
        mut f: F,
        cover: Option<(&cover::Cover, Instant)>,
        counter: Option<&AtomicU32>,
    ) -> (Result<T, Error<E>>, Outcome)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        let p = &*self.inner;
        let (cover, start) = cover.unzip();
        let mut driver = Driver::new(p.retry.as_ref(), cover.map(cover::Cover::deadline), start);
        loop {
            let limit = driver.begin(p.retry.as_ref(), p.attempt_timeout);
            // A single attempt is awaited here rather than through `hedged`: one async layer fewer for every
            // call's result to be moved through.
            let (result, outcome, hint) = match &p.hedge {
                None => self.attempt(classifier, &mut f, limit, cover, counter).await,
                Some(hedge) => self.hedged(hedge, classifier, &mut f, limit, cover, counter).await,
            };
            match driver.after(p.retry.as_ref(), outcome, hint) {
                Some(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
                Some(_) => {}
                None => return (result, outcome),
            }
        }
    }

    /// (6) A hedged group of attempts, racing concurrently.
    async fn hedged<T, E, F, Fut, C>(
        &self,
        hedge: &Hedge,
        classifier: &C,
        f: &mut F,
        limit: Option<Duration>,
        cover: Option<&cover::Cover>,
        counter: Option<&AtomicU32>,
    ) -> Attempt<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        // Each attempt creates its call only once admitted.
        let shared = std::sync::Mutex::new(f);
        let make = || {
            let mut f = shared.lock().unwrap_or_else(|p| p.into_inner());
            (*f)()
        };
        hedge.race(|| classifier.can_send_again(), || self.attempt(classifier, make, limit, cover, counter)).await
    }

    /// (7)–(11) One attempt: admission by breaker, rate limit and bulkhead, then the call under its timeout. The
    /// call's future is created (`make`) only once the attempt is admitted.
    async fn attempt<T, E, M, Fut, C>(
        &self,
        classifier: &C,
        make: M,
        limit: Option<Duration>,
        cover: Option<&cover::Cover>,
        counter: Option<&AtomicU32>,
    ) -> Attempt<T, E>
    where
        M: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        let p = &*self.inner;
        let permit = match self.admit(true) {
            Ok(permit) => permit,
            Err(rejected) => return rejected,
        };
        // (8) A rate limit shared by the fleet: the store decides (the breaker's permit goes back if it refuses).
        if let Some(global) = &p.global_limit
            && let Err(e) = global.acquire().await
        {
            return (Err(Error::RateLimited(e)), Outcome::LocalRateLimited, Hint::wait(Some(e.retry_after())));
        }
        // (9) Bulkhead; the permit is held until this function returns or is cancelled.
        let _bulkhead_permit = match &p.bulkhead {
            Some(b) => match b.acquire().await {
                Ok(permit) => Some(permit),
                Err(e) => return (Err(Error::BulkheadFull(e)), Outcome::BulkheadFull, Hint::NONE),
            },
            None => None,
        };
        // Admitted: an attempt, whether the dependency or an injected fault answers it.
        if let Some(counter) = counter {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // (10) + (11): the call, with injected faults, under the attempt timeout.
        let run = async {
            if let Some(fault) = &p.fault {
                let decision = fault.decide();
                if let Some(delay) = decision.delay {
                    tokio::time::sleep(delay).await;
                }
                if let Some(outcome) = decision.abort {
                    return (Err(Error::Injected(crate::fault::InjectedFault::new(outcome))), outcome, Hint::NONE);
                }
            }
            classified(classifier, std::pin::pin!(make()).await)
        };
        let done = match limit {
            Some(limit) => match cover::Covering::new(crate::timeout::lazy(limit, run), cover).await {
                Ok(done) => done,
                Err(_) => (Err(self.timed_out(limit)), Outcome::Timeout, Hint::NONE),
            },
            None => run.await,
        };
        if let Some(permit) = permit {
            permit.record(done.1);
        }
        done
    }
}

impl Envelope {
    /// (7) Breaker, then (8) rate limit: the admission checks shared by the async and blocking paths. The breaker's
    /// permit is handed back on drop if a later check rejects the call. `shared_limit_asked`: the caller asks a
    /// shared rate limit itself (the async path); otherwise its local fallback (`rate_limit`) decides here.
    #[inline]
    fn admit<T, E>(
        &self,
        shared_limit_asked: bool,
    ) -> Result<Option<crate::circuit_breaker::Permit<'_>>, Attempt<T, E>> {
        let p = &*self.inner;
        let permit = match &p.breaker {
            Some(b) => match b.try_acquire() {
                Ok(permit) => Some(permit),
                Err(e) => return Err((Err(Error::CircuitOpen(e)), Outcome::CircuitOpen, Hint::wait(e.remaining()))),
            },
            None => None,
        };
        if !(shared_limit_asked && p.global_limit.is_some())
            && let Some(limiter) = &p.rate_limit
            && let Err(e) = limiter.try_acquire()
        {
            return Err((Err(Error::RateLimited(e)), Outcome::LocalRateLimited, Hint::wait(Some(e.retry_after()))));
        }
        Ok(permit)
    }

    #[cold]
    fn timed_out<E>(&self, after: Duration) -> Error<E> {
        let name = self.inner.name.as_deref().unwrap_or("envelope");
        self.inner.listeners.emit(Event::TimedOut { name, after });
        Error::Timeout(Elapsed::new(after))
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &*self.inner;
        f.debug_struct("Envelope")
            .field("name", &p.name)
            .field("shed", &p.shed.is_some())
            .field("deadline", &p.deadline)
            .field("fallback", &p.fallback.is_some())
            .field("retry", &p.retry.is_some())
            .field("hedge", &p.hedge.is_some())
            .field("circuit_breaker", &p.breaker.is_some())
            .field("rate_limit", &p.rate_limit.is_some())
            .field("bulkhead", &p.bulkhead.is_some())
            .field("attempt_timeout", &p.attempt_timeout)
            .field("fault", &p.fault.is_some())
            .finish()
    }
}
