//! Fallback: answer with something degraded but useful when the call fails in a way you chose
//! (Polly's `FallbackAction`).
//!
//! The fallback runs only for outcomes in its set (by default every failure of the dependency, an open breaker and
//! a full bulkhead; never for a shed or rate-limited call, which the caller should see), and is counted through
//! the [`Event::FallbackUsed`] event so a degraded answer is never silent.
//!
//! ```
//! use envelope_core::fallback::Fallback;
//! use envelope_core::Outcome;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let fallback = Fallback::new("recommendations");
//! let top = fallback
//!     .call(|| async { Err::<Vec<&str>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) },
//!           |_outcome| vec!["bestsellers"])
//!     .await
//!     .unwrap();
//! assert_eq!(top, vec!["bestsellers"]);
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;

use crate::event::{Event, Listeners};
use crate::outcome::{Classify, DefaultClassifier, HasOutcome, Outcome, OutcomeSet};

/// A fallback policy.
#[derive(Debug, Clone)]
pub struct Fallback {
    name: Arc<str>,
    on: OutcomeSet,
    listeners: Listeners,
}

impl Fallback {
    /// Falls back on [`OutcomeSet::DEPENDENCY_FAILURES`].
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Fallback { name: name.into(), on: OutcomeSet::DEPENDENCY_FAILURES, listeners: Listeners::new() }
    }

    /// Falls back only on these outcomes.
    pub fn on(mut self, outcomes: OutcomeSet) -> Self {
        self.on = outcomes;
        self
    }

    /// Sends events to `listeners`.
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// The outcomes that trigger the fallback.
    pub fn outcomes(&self) -> OutcomeSet {
        self.on
    }

    /// Whether `outcome` triggers the fallback; emits the event if so.
    pub(crate) fn applies(&self, outcome: Outcome) -> bool {
        let applies = self.on.contains(outcome);
        if applies {
            self.listeners.emit(Event::FallbackUsed { name: &self.name, outcome });
        }
        applies
    }

    /// Runs `f`; if it ends in one of the fallback's outcomes, answers `fallback(outcome)` instead.
    pub async fn call<T, E, F, Fut>(&self, f: F, fallback: impl FnOnce(Outcome) -> T) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.call_classified(&DefaultClassifier, f, fallback).await
    }

    /// Like [`call`](Self::call), classifying with `classifier`.
    pub async fn call_classified<T, E, F, Fut, C>(
        &self,
        classifier: &C,
        f: F,
        fallback: impl FnOnce(Outcome) -> T,
    ) -> Result<T, crate::Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        let result = f().await;
        let outcome = classifier.classify(&result);
        if !outcome.is_ok() && self.applies(outcome) {
            return Ok(fallback(outcome));
        }
        result.map_err(crate::Error::Inner)
    }
}
