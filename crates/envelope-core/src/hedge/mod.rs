//! Hedging: when a call is slow, start another one in parallel and take whichever answers first
//! (Polly's hedging strategy; "The Tail at Scale").
//!
//! The first attempt starts at once. If it has not finished after `delay`, a second starts while the first keeps
//! running, and so on up to `max_hedged` extra attempts. An attempt that fails with a retryable outcome starts the
//! next one at once. The first result that is not a retryable failure wins and **every other attempt is
//! cancelled** (dropped). If all attempts fail, the last failure is returned.
//!
//! Hedging sends the same request more than once: use it only for idempotent operations (the HTTP layer enforces
//! this by method). Hedges can draw on a [`RetryBudget`] so that they add a bounded share of load.
//!
//! ```
//! use envelope_core::hedge::Hedge;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let hedge = Hedge::new("search", Duration::from_millis(50), 1);
//! let answer = hedge.call(|| async { Ok::<_, std::io::Error>("fast enough") }).await.unwrap();
//! assert_eq!(answer, "fast enough");
//! # }
//! ```

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::clock;
use crate::event::{Event, Listeners};
use crate::outcome::{Classify, DefaultClassifier, HasOutcome, Outcome};
use crate::retry::{RetryBudget, classified};

/// A hedging policy.
#[derive(Debug, Clone)]
pub struct Hedge {
    name: Arc<str>,
    delay: Duration,
    max_hedged: u32,
    budget: Option<RetryBudget>,
    listeners: Listeners,
}

impl Hedge {
    /// Starts up to `max_hedged` extra attempts, one every `delay` while none has answered.
    pub fn new(name: impl Into<Arc<str>>, delay: Duration, max_hedged: u32) -> Self {
        Hedge { name: name.into(), delay, max_hedged, budget: None, listeners: Listeners::new() }
    }

    /// Draws each extra attempt from `budget`.
    pub fn with_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Sends events to `listeners`.
    pub fn with_listeners(mut self, listeners: Listeners) -> Self {
        self.listeners = listeners;
        self
    }

    /// Runs `f`, hedging it; results are classified with [`DefaultClassifier`].
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, crate::Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: HasOutcome,
    {
        self.call_classified(&DefaultClassifier, f).await
    }

    /// Runs `f`, hedging it; results are classified with `classifier`.
    pub async fn call_classified<T, E, F, Fut, C>(&self, classifier: &C, mut f: F) -> Result<T, crate::Error<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Classify<T, E>,
    {
        self.race(|| {
            let fut = f();
            async move { classified(classifier, fut.await) }
        })
        .await
        .0
    }

    /// Races attempts made by `make`; each yields `(result, outcome, hint)`.
    pub(crate) async fn race<R, H, Fut, F>(&self, mut make: F) -> (R, Outcome, H)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = (R, Outcome, H)>,
    {
        if let Some(b) = &self.budget {
            b.deposit();
        }
        let mut running: Vec<Pin<Box<Fut>>> = vec![Box::pin(make())];
        let mut launched = 1u32;
        let timer = tokio::time::sleep(self.delay);
        tokio::pin!(timer);
        let mut last = None;
        poll_fn(|cx| {
            loop {
                let mut launch_now = false;
                let mut i = 0;
                while i < running.len() {
                    if let Poll::Ready(done) = running[i].as_mut().poll(cx) {
                        drop(running.swap_remove(i));
                        if done.1.is_ok() || !done.1.is_retryable() {
                            // The winner; returning drops (cancels) every other attempt.
                            return Poll::Ready(done);
                        }
                        last = Some(done);
                        launch_now = true;
                    } else {
                        i += 1;
                    }
                }
                let may_launch = launched <= self.max_hedged;
                if may_launch && (launch_now || timer.as_mut().poll(cx).is_ready()) {
                    if self.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                        launched = u32::MAX;
                    } else {
                        launched += 1;
                        self.listeners.emit(Event::HedgeLaunched { name: &self.name, attempt: launched });
                        running.push(Box::pin(make()));
                        timer.as_mut().reset(clock::now() + self.delay);
                        continue;
                    }
                }
                if running.is_empty() {
                    return Poll::Ready(last.take().expect("an attempt finished"));
                }
                return Poll::Pending;
            }
        })
        .await
    }
}
