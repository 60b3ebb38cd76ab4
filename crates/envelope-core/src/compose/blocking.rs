//! The blocking face of [`Envelope`]: the same policies for synchronous clients on threads without a runtime.
//!
//! What differs from the async path, because a blocking call cannot be interrupted:
//! - the attempt timeout and the deadline cannot cancel a call in progress; the deadline still stops retries
//!   (no attempt starts that cannot finish in time), and slow calls still count against the breaker;
//! - hedging is skipped (it would need extra threads);
//! - waits (backoff, bulkhead queue, injected delay) block the calling thread.

use std::time::Duration;

use super::Envelope;
use crate::clock;
use crate::error::Error;
use crate::fault::InjectedFault;
use crate::outcome::{Classify, DefaultClassifier, HasOutcome, Outcome};
use crate::retry::{Driver, Hint, classified};

impl Envelope {
    /// Runs the blocking `f` (once per attempt) through every policy; classifies with [`DefaultClassifier`].
    pub fn call_blocking<T, E, F>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnMut() -> Result<T, E>,
        E: HasOutcome,
    {
        self.call_blocking_classified(&DefaultClassifier, f).0
    }

    /// Runs the blocking `f` through every policy, classifying with `classifier`. Also returns the outcome.
    pub fn call_blocking_classified<T, E, F, C>(&self, classifier: &C, mut f: F) -> (Result<T, Error<E>>, Outcome)
    where
        F: FnMut() -> Result<T, E>,
        C: Classify<T, E>,
    {
        let p = &*self.inner;
        let shed_permit = match &p.shed {
            Some((shedder, priority)) => match shedder.try_acquire(*priority) {
                Ok(permit) => Some(permit),
                Err(e) => return (Err(Error::Shed(e)), Outcome::Shed),
            },
            None => None,
        };
        // The clock is read only when a deadline needs it.
        let start = p.deadline.map(|_| clock::now());
        let mut driver = Driver::new(p.retry.as_ref(), start.zip(p.deadline).map(|(s, d)| s + d), start);
        let (result, outcome) = loop {
            // A blocking call cannot be cut off: the attempt's time limit is not enforced, but the deadline still
            // decides whether another attempt may start.
            let _ = driver.begin(p.retry.as_ref(), None);
            let (result, outcome, hint) = self.attempt_blocking(classifier, &mut f);
            match driver.after(p.retry.as_ref(), outcome, hint) {
                Some(delay) => sleep(delay),
                None => break (result, outcome),
            }
        };
        if let Some(permit) = shed_permit {
            permit.record(outcome);
        }
        (result, outcome)
    }

    fn attempt_blocking<T, E, F, C>(&self, classifier: &C, f: &mut F) -> super::Attempt<T, E>
    where
        F: FnMut() -> Result<T, E>,
        C: Classify<T, E>,
    {
        let p = &*self.inner;
        // A shared rate limit cannot be asked from a blocked thread: its local fallback decides.
        let permit = match self.admit(false) {
            Ok(permit) => permit,
            Err(rejected) => return rejected,
        };
        let _bulkhead_permit = match &p.bulkhead {
            Some(b) => match b.acquire_blocking() {
                Ok(permit) => Some(permit),
                Err(e) => return (Err(Error::BulkheadFull(e)), Outcome::BulkheadFull, Hint::NONE),
            },
            None => None,
        };
        let done = 'call: {
            if let Some(fault) = &p.fault {
                let decision = fault.decide();
                if let Some(delay) = decision.delay {
                    sleep(delay);
                }
                if let Some(outcome) = decision.abort {
                    break 'call (Err(Error::Injected(InjectedFault::new(outcome))), outcome, Hint::NONE);
                }
            }
            classified(classifier, f())
        };
        if let Some(permit) = permit {
            permit.record(done.1);
        }
        done
    }
}

fn sleep(d: Duration) {
    if !d.is_zero() {
        std::thread::sleep(d);
    }
}
