//! Retry: try again after a transient failure, without turning a dependency's bad minute into a retry storm.
//!
//! What a retry policy decides, after each failed attempt, in this order:
//!
//! 1. Is the outcome one we retry? ([`Config::retry_on`], default [`OutcomeSet::RETRYABLE`]: transient faults
//!    of the dependency, never Envelope's own rejections.)
//! 2. Are attempts left? `max_attempts` counts the first call: 3 means one call and at most two retries.
//! 3. How long to wait? The [`Backoff`], unless the dependency said how long (`Retry-After`, supplied by the
//!    classifier): that wait is honoured, and if it is longer than the backoff's `max_delay`, we do not retry at
//!    all (waiting that long is worse than failing now).
//! 4. Is there time? With a deadline, a retry starts only if, after its wait, the time left is at least as long as
//!    the previous attempt took: no attempt that cannot finish is started.
//! 5. Does the [`RetryBudget`] allow it? The budget is shared by every clone of the policy.
//!
//! Each attempt may have its own timeout (`per_attempt_timeout`, shortened to the time left before the deadline).
//!
//! ```
//! use envelope_core::retry::{Backoff, Config, Retry};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let retry = Retry::new("catalog", Config::builder()
//!     .max_attempts(3)
//!     .backoff(Backoff::exponential(Duration::from_millis(50), Duration::from_secs(1)).unwrap())
//!     .build().unwrap());
//! let mut calls = 0;
//! let result = retry.call(|| { calls += 1; async move { if calls < 3 { Err("flaky") } else { Ok(calls) } } }).await;
//! assert_eq!(result.unwrap(), 3);
//! # }
//! ```

mod backoff;
mod budget;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use backoff::{Backoff, DEFAULT_BASE, DEFAULT_MAX_DELAY, DEFAULT_MULTIPLIER, Growth, InvalidBackoff, Jitter};
pub use budget::{DEFAULT_MIN_PER_SECOND, DEFAULT_RETRY_RATIO, DEFAULT_TTL, InvalidBudget, RetryBudget};

use crate::clock::{self, Instant};
use crate::event::{Event, GiveUpReason, Listener, Listeners};
use crate::outcome::{Classify, DefaultClassifier, HasOutcome, Outcome, OutcomeSet};

/// Default attempts, counting the first call.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Largest `max_attempts` accepted.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// A validated retry configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) retry_on: OutcomeSet,
    pub(crate) per_attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) listeners: Listeners,
}

impl Default for Config {
    fn default() -> Self {
        Builder::default().build().expect("defaults are valid")
    }
}

/// Two configs are equal when their settings are (a budget by its settings, not its balance): where their events
/// go is not a setting.
impl PartialEq for Config {
    fn eq(&self, other: &Config) -> bool {
        let budget = |c: &Config| c.budget.as_ref().map(RetryBudget::settings);
        self.max_attempts == other.max_attempts
            && self.backoff == other.backoff
            && self.retry_on == other.retry_on
            && self.per_attempt_timeout == other.per_attempt_timeout
            && self.deadline == other.deadline
            && budget(self) == budget(other)
    }
}

impl Config {
    /// A builder starting from the documented defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A builder holding these settings, to change some and validate again.
    pub fn to_builder(&self) -> Builder {
        Builder { config: self.clone() }
    }

    /// The same settings, reporting to `listeners` instead (listeners are not validated: this cannot fail).
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }
    /// Attempts, counting the first call.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    /// The backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
    /// Outcomes that are retried.
    pub fn retry_on(&self) -> OutcomeSet {
        self.retry_on
    }
    /// Timeout of each attempt.
    pub fn per_attempt_timeout(&self) -> Option<Duration> {
        self.per_attempt_timeout
    }
    /// Total time for all attempts.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }
    /// The shared budget.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }
}

/// Why a retry configuration is invalid.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    /// `max_attempts` of zero or above [`MAX_ATTEMPTS_LIMIT`].
    MaxAttempts(u32),
    /// A zero timeout or deadline.
    ZeroDuration(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::MaxAttempts(n) => write!(f, "max_attempts {n} must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            ConfigError::ZeroDuration(field) => write!(f, "{field} must be greater than zero"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Builds a retry [`Config`].
#[derive(Debug, Clone)]
pub struct Builder {
    config: Config,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            config: Config {
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                backoff: Backoff::default(),
                retry_on: OutcomeSet::RETRYABLE,
                per_attempt_timeout: None,
                deadline: None,
                budget: None,
                listeners: Listeners::new(),
            },
        }
    }
}

impl Builder {
    /// Attempts, counting the first call (1 = never retry).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.max_attempts = n;
        self
    }
    /// Waits between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }
    /// Outcomes that are retried.
    pub fn retry_on(mut self, outcomes: OutcomeSet) -> Self {
        self.config.retry_on = outcomes;
        self
    }
    /// Timeout of each attempt.
    pub fn per_attempt_timeout(mut self, d: Duration) -> Self {
        self.config.per_attempt_timeout = Some(d);
        self
    }
    /// Total time for all attempts and waits.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.config.deadline = Some(d);
        self
    }
    /// Draws retries from `budget` (shared with its clones).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.config.budget = Some(budget);
        self
    }
    /// Sends events to `listener` too.
    pub fn listener(mut self, listener: impl Listener) -> Self {
        self.config.listeners = self.config.listeners.with(listener);
        self
    }
    /// Use exactly these listeners.
    pub fn listeners(mut self, listeners: Listeners) -> Self {
        self.config.listeners = listeners;
        self
    }
    /// Validates the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.config;
        if c.max_attempts == 0 || c.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(ConfigError::MaxAttempts(c.max_attempts));
        }
        if c.per_attempt_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("per_attempt_timeout"));
        }
        if c.deadline.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("deadline"));
        }
        Ok(c)
    }
}

/// A retry policy. Cloning is cheap; clones share the budget.
#[derive(Debug, Clone)]
pub struct Retry {
    name: Arc<str>,
    config: Arc<Config>,
}

/// Where a call stands between attempts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attempts {
    /// Attempts made so far.
    pub(crate) made: u32,
    previous_delay: Duration,
    /// How long the last attempt took.
    pub(crate) last_duration: Duration,
}

/// What the classifier said about a failed attempt, besides its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hint {
    /// The dependency's requested wait (`Retry-After`).
    pub(crate) retry_after: Option<Duration>,
    /// Whether this call may be repeated at all.
    pub(crate) may_retry: bool,
}

impl Hint {
    /// No wait requested, retry allowed.
    pub(crate) const NONE: Hint = Hint { retry_after: None, may_retry: true };

    /// A requested wait.
    pub(crate) fn wait(retry_after: Option<Duration>) -> Hint {
        Hint { retry_after, may_retry: true }
    }
}

/// One call's retry loop, shared by every way of calling — [`Retry::call`], the async [`crate::Envelope`], its
/// blocking face and its step face — so that they decide alike: which attempt may start, how long it may take,
/// whether and how long to wait before the next. They differ only in how an attempt runs and how a wait is spent.
/// The policy is passed to each step (`None`: no retry policy), so a call that keeps its state between steps needs
/// no borrow of it.
#[derive(Debug)]
pub(crate) struct Driver {
    st: Attempts,
    /// The earliest of the caller's deadline and the retry policy's own.
    deadline: Option<Instant>,
    /// When the call began, if read already: the first attempt begins then.
    start: Option<Instant>,
    /// When the current attempt began (read only when there is a deadline).
    began: Option<Instant>,
}

impl Driver {
    /// A call under `retry` (if any), with the caller's `deadline` (if any) and the instant it began (if read).
    /// Records the call in the retry budget.
    pub(crate) fn new(retry: Option<&Retry>, mut deadline: Option<Instant>, mut start: Option<Instant>) -> Self {
        if let Some(r) = retry {
            if let Some(d) = r.config.deadline {
                let own = *start.get_or_insert_with(clock::now) + d;
                deadline = Some(deadline.map_or(own, |outer| outer.min(own)));
            }
            r.on_first_attempt(start);
        }
        Driver { st: Attempts::default(), deadline, start, began: None }
    }

    /// Begins an attempt; returns how long it may take: the caller's `limit` (an attempt timeout), the retry
    /// policy's, and the time left before the deadline, whichever is shortest.
    pub(crate) fn begin(&mut self, retry: Option<&Retry>, limit: Option<Duration>) -> Option<Duration> {
        self.began = self.deadline.map(|_| self.start.take().unwrap_or_else(clock::now));
        self.st.made += 1;
        let limit = clock::shorter(limit, clock::left(self.deadline, self.began));
        match retry {
            Some(r) => r.attempt_limit(limit),
            None => limit,
        }
    }

    /// The attempt ended in `outcome`: `Some(delay)` to wait that long and try again, `None` to stop with it.
    pub(crate) fn after(&mut self, retry: Option<&Retry>, outcome: Outcome, hint: Hint) -> Option<Duration> {
        let retry = retry?;
        if outcome.is_ok() {
            return None;
        }
        self.st.last_duration = self.began.map_or(Duration::ZERO, |b| b.elapsed());
        match retry.next(&mut self.st, outcome, hint, self.deadline) {
            Next::RetryAfter(delay) => Some(delay),
            Next::GiveUp(_) => None,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    RetryAfter(Duration),
    GiveUp(GiveUpReason),
}

impl Retry {
    /// A policy named `name` (for events).
    pub fn new(name: impl Into<Arc<str>>, config: Config) -> Self {
        Retry { name: name.into(), config: Arc::new(config) }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Records a live call in the budget, at `now` if the caller has read the clock already.
    #[inline]
    pub(crate) fn on_first_attempt(&self, now: Option<Instant>) {
        if let Some(b) = &self.config.budget {
            b.deposit_at(now);
        }
    }

    /// The timeout for the next attempt: the per-attempt timeout, shortened to `bound` (the time left before the
    /// deadline, or a tighter limit the caller already has).
    #[inline]
    pub(crate) fn attempt_limit(&self, bound: Option<Duration>) -> Option<Duration> {
        clock::shorter(self.config.per_attempt_timeout, bound)
    }

    /// Decides what follows an attempt that ended in `outcome`. `now` is read only when there is a deadline.
    pub(crate) fn next(&self, st: &mut Attempts, outcome: Outcome, hint: Hint, deadline: Option<Instant>) -> Next {
        let c = &self.config;
        let give_up = |reason| {
            if reason != GiveUpReason::NotRetryable || st.made > 1 {
                c.listeners.emit(Event::RetryGaveUp { name: &self.name, attempts: st.made, outcome, reason });
            }
            Next::GiveUp(reason)
        };
        if outcome.is_ok() || !c.retry_on.contains(outcome) {
            return give_up(GiveUpReason::NotRetryable);
        }
        if !hint.may_retry {
            return give_up(GiveUpReason::NotReplayable);
        }
        if st.made >= c.max_attempts {
            return give_up(GiveUpReason::AttemptsExhausted);
        }
        let delay = match hint.retry_after {
            Some(wait) if wait > c.backoff.max_delay() => return give_up(GiveUpReason::RetryAfterTooLong),
            Some(wait) => wait,
            None => c.backoff.delay(st.made, st.previous_delay),
        };
        if let Some(deadline) = deadline {
            let left_after_wait = deadline.saturating_duration_since(clock::now()).saturating_sub(delay);
            if left_after_wait.is_zero() || left_after_wait < st.last_duration {
                return give_up(GiveUpReason::DeadlineTooClose);
            }
        }
        if let Some(b) = &c.budget
            && !b.withdraw()
        {
            return give_up(GiveUpReason::BudgetExhausted);
        }
        st.previous_delay = delay;
        c.listeners.emit(Event::RetryScheduled { name: &self.name, attempt: st.made, outcome, delay });
        Next::RetryAfter(delay)
    }

    /// Calls `f` until it succeeds or the policy gives up; errors are classified with [`DefaultClassifier`].
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.call_classified(&DefaultClassifier, f).await
    }

    /// Calls `f` until it succeeds or the policy gives up, classifying results with `classifier`.
    pub async fn call_classified<T, E, F, Fut, C>(&self, classifier: &C, mut f: F) -> Result<T, crate::Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        // The clock is read only when a deadline needs it: a call that succeeds at once costs no clock read.
        let mut driver = Driver::new(Some(self), None, None);
        loop {
            let (result, outcome, hint) = match driver.begin(Some(self), None) {
                Some(limit) => match crate::timeout::lazy(limit, f()).await {
                    Ok(r) => classified(classifier, r),
                    Err(_) => {
                        (Err(crate::Error::Timeout(crate::timeout::Elapsed::new(limit))), Outcome::Timeout, Hint::NONE)
                    }
                },
                None => classified(classifier, f().await),
            };
            match driver.after(Some(self), outcome, hint) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return result,
            }
        }
    }
}

/// Classifies an attempt's result and wraps its error.
#[inline]
pub(crate) fn classified<T, E, C: Classify<T, E>>(
    classifier: &C,
    result: Result<T, E>,
) -> (Result<T, crate::Error<E>>, Outcome, Hint) {
    let outcome = classifier.classify(&result);
    let hint = if outcome.is_ok() {
        Hint::NONE
    } else {
        Hint { retry_after: classifier.retry_after(&result), may_retry: classifier.may_retry(&result) }
    };
    (result.map_err(crate::Error::Inner), outcome, hint)
}
