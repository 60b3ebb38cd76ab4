//! The error of a composed call, and how Envelope's own errors are recognised anywhere in a source chain.

use std::fmt;

use crate::bulkhead::error::BulkheadFull;
use crate::circuit_breaker::error::CircuitOpen;
use crate::fault::InjectedFault;
use crate::outcome::{HasOutcome, Outcome};
use crate::rate_limit::error::RateLimited;
use crate::shed::error::Overloaded;
use crate::timeout::error::Elapsed;

/// A boxed error, as tower services return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call through Envelope's policies failed: the operation's own error, or a policy's decision.
#[non_exhaustive]
#[derive(Debug)]
pub enum Error<E> {
    /// The operation ran (perhaps several times) and its last attempt failed with this error.
    Inner(E),
    /// A timeout fired; the operation was cancelled.
    Timeout(Elapsed),
    /// The circuit breaker did not permit the call.
    CircuitOpen(CircuitOpen),
    /// The bulkhead was full.
    BulkheadFull(BulkheadFull),
    /// A local rate limit rejected the call.
    RateLimited(RateLimited),
    /// Load shedding rejected the call.
    Shed(Overloaded),
    /// Fault injection aborted the call.
    Injected(InjectedFault),
}

impl<E> Error<E> {
    /// The operation's own error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Error::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// The outcome of a policy rejection, or `None` for the operation's own error.
    pub fn policy_outcome(&self) -> Option<Outcome> {
        Some(match self {
            Error::Inner(_) => return None,
            Error::Timeout(_) => Outcome::Timeout,
            Error::CircuitOpen(_) => Outcome::CircuitOpen,
            Error::BulkheadFull(_) => Outcome::BulkheadFull,
            Error::RateLimited(_) => Outcome::LocalRateLimited,
            Error::Shed(_) => Outcome::Shed,
            Error::Injected(f) => f.outcome(),
        })
    }

    /// Converts the operation's error, keeping policy errors.
    pub fn map_inner<F>(self, f: impl FnOnce(E) -> F) -> Error<F> {
        match self {
            Error::Inner(e) => Error::Inner(f(e)),
            Error::Timeout(e) => Error::Timeout(e),
            Error::CircuitOpen(e) => Error::CircuitOpen(e),
            Error::BulkheadFull(e) => Error::BulkheadFull(e),
            Error::RateLimited(e) => Error::RateLimited(e),
            Error::Shed(e) => Error::Shed(e),
            Error::Injected(e) => Error::Injected(e),
        }
    }
}

impl<E: HasOutcome> HasOutcome for Error<E> {
    fn outcome(&self) -> Outcome {
        match self {
            Error::Inner(e) => e.outcome(),
            other => other.policy_outcome().unwrap_or(Outcome::Failure),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Inner(e) => e.fmt(f),
            Error::Timeout(e) => e.fmt(f),
            Error::CircuitOpen(e) => e.fmt(f),
            Error::BulkheadFull(e) => e.fmt(f),
            Error::RateLimited(e) => e.fmt(f),
            Error::Shed(e) => e.fmt(f),
            Error::Injected(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Error<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Inner(e) => Some(e),
            _ => None,
        }
    }
}

macro_rules! from_policy_error {
    ($($ty:ident => $variant:ident),*) => {$(
        impl<E> From<$ty> for Error<E> {
            fn from(e: $ty) -> Self {
                Error::$variant(e)
            }
        }
    )*};
}
from_policy_error!(Elapsed => Timeout, CircuitOpen => CircuitOpen, BulkheadFull => BulkheadFull,
    RateLimited => RateLimited, Overloaded => Shed, InjectedFault => Injected);

/// The outcome of `e` if it is one of Envelope's own policy errors.
fn own_outcome(e: &(dyn std::error::Error + 'static)) -> Option<Outcome> {
    if e.is::<Elapsed>() {
        Some(Outcome::Timeout)
    } else if e.is::<CircuitOpen>() {
        Some(Outcome::CircuitOpen)
    } else if e.is::<BulkheadFull>() {
        Some(Outcome::BulkheadFull)
    } else if e.is::<RateLimited>() {
        Some(Outcome::LocalRateLimited)
    } else if e.is::<Overloaded>() {
        Some(Outcome::Shed)
    } else {
        e.downcast_ref::<InjectedFault>().map(|f| f.outcome())
    }
}

/// Finds the outcome of a (boxed) error by walking its source chain for Envelope's own error types and
/// [`std::io::Error`]; anything else is [`Outcome::Failure`].
pub fn outcome_of_error(error: &(dyn std::error::Error + 'static)) -> Outcome {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = own_outcome(e) {
            return found;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return crate::outcome::io_outcome(io);
        }
        current = e.source();
    }
    Outcome::Failure
}

impl HasOutcome for Box<dyn std::error::Error + Send + Sync> {
    fn outcome(&self) -> Outcome {
        outcome_of_error(self.as_ref())
    }
}

/// Whether `error` or anything in its source chain is a `T` (linkerd's `is_caused_by`).
pub fn is_caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<T>() {
            return true;
        }
        current = e.source();
    }
    false
}
