//! One taxonomy of outcomes, shared by every policy, the HTTP layers, metrics and logs.
//!
//! Every call that passes through a policy ends in exactly one [`Outcome`]. The outcome alone answers the two
//! questions the policies ask: *may this be retried?* ([`Outcome::is_retryable`]) and *what does it mean for a
//! circuit breaker?* ([`Outcome::breaker_verdict`]). Rejections made by Envelope itself (an open breaker, a full
//! bulkhead, shedding, a local rate limit) never count against a dependency.
//!
//! A [`Classify`] turns the result of a call into an outcome. [`DefaultClassifier`] treats `Ok` as
//! [`Outcome::Ok`] and every `Err` as [`Outcome::Failure`]; any closure `Fn(&Result<T, E>) -> Outcome` is a
//! classifier too.

use std::fmt;

/// How a single call ended.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Outcome {
    /// The call succeeded.
    Ok = 0,
    /// The call failed with an application error (the in-process default for `Err`).
    Failure,
    /// The call, or one attempt of it, ran out of time.
    Timeout,
    /// No connection could be made (refused, reset before a byte was written, DNS, TLS handshake).
    ConnectError,
    /// The connection was made and the request (or part of it) sent, but the exchange broke before a whole answer
    /// came back: the connection reset or closed mid-response, or the answer was malformed.
    UpstreamReset,
    /// The dependency answered with a 5xx status.
    Upstream5xx,
    /// The dependency answered with a 4xx status other than 429 (the caller's fault, not the dependency's).
    Upstream4xx,
    /// The dependency throttled us (HTTP 429).
    RateLimited,
    /// Rejected locally: the circuit breaker is open (or half-open and out of probes).
    CircuitOpen,
    /// Rejected locally: the bulkhead and its queue are full, or the queue wait ran out.
    BulkheadFull,
    /// Rejected locally: load shedding or the adaptive concurrency limit.
    Shed,
    /// Rejected locally: a local rate limit.
    LocalRateLimited,
    /// The caller went away before the call finished.
    ClientCancelled,
    /// The request was invalid before it was sent anywhere.
    BadRequest,
    /// The call failed for a reason its fallback covers, and the fallback answered in its place (a degraded answer:
    /// a static one, or another dependency's).
    Fallback,
}

/// What an outcome means to a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerVerdict {
    /// Counts as a successful call.
    Success,
    /// Counts as a failed call.
    Failure,
    /// Not recorded at all; a half-open probe permit is handed back.
    Ignore,
}

impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Outcome; 15] = [
        Outcome::Ok,
        Outcome::Failure,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::UpstreamReset,
        Outcome::Upstream5xx,
        Outcome::Upstream4xx,
        Outcome::RateLimited,
        Outcome::CircuitOpen,
        Outcome::BulkheadFull,
        Outcome::Shed,
        Outcome::LocalRateLimited,
        Outcome::ClientCancelled,
        Outcome::BadRequest,
        Outcome::Fallback,
    ];

    /// The stable snake_case name used in metrics labels, logs and config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::UpstreamReset => "upstream_reset",
            Outcome::Upstream5xx => "upstream_5xx",
            Outcome::Upstream4xx => "upstream_4xx",
            Outcome::RateLimited => "rate_limited",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::BulkheadFull => "bulkhead_full",
            Outcome::Shed => "shed",
            Outcome::LocalRateLimited => "local_rate_limited",
            Outcome::ClientCancelled => "client_cancelled",
            Outcome::BadRequest => "bad_request",
            Outcome::Fallback => "fallback",
        }
    }

    /// Parses the name produced by [`Outcome::as_str`].
    pub fn from_name(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// Whether a retry policy may try again after this outcome by default.
    ///
    /// Transient faults of the dependency are retryable; local rejections are not (retrying into an open breaker
    /// or a full bulkhead only adds load), and neither are the caller's own mistakes.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Outcome::Failure
                | Outcome::Timeout
                | Outcome::ConnectError
                | Outcome::UpstreamReset
                | Outcome::Upstream5xx
                | Outcome::RateLimited
        )
    }

    /// What this outcome means to a circuit breaker by default.
    ///
    /// Upstream 429 is ignored: the dependency is healthy and asking us to slow down, which is the rate limiter's
    /// job, not the breaker's.
    pub const fn breaker_verdict(self) -> BreakerVerdict {
        match self {
            Outcome::Ok | Outcome::Upstream4xx => BreakerVerdict::Success,
            Outcome::Failure
            | Outcome::Timeout
            | Outcome::ConnectError
            | Outcome::UpstreamReset
            | Outcome::Upstream5xx => BreakerVerdict::Failure,
            Outcome::RateLimited
            | Outcome::CircuitOpen
            | Outcome::BulkheadFull
            | Outcome::Shed
            | Outcome::LocalRateLimited
            | Outcome::ClientCancelled
            | Outcome::BadRequest
            | Outcome::Fallback => BreakerVerdict::Ignore,
        }
    }

    /// Whether Envelope itself rejected the call without reaching the dependency.
    pub const fn is_local_rejection(self) -> bool {
        matches!(self, Outcome::CircuitOpen | Outcome::BulkheadFull | Outcome::Shed | Outcome::LocalRateLimited)
    }

    /// Whether this outcome spends availability budget (an SLO's bad event): anything the client could not get
    /// served, except its own mistakes (4xx, an invalid request) and its own cancellation. A fallback's answer is
    /// served (degraded by design, and counted on its own: the `fallback` outcome has alerts of its own).
    pub const fn counts_against_availability(self) -> bool {
        !matches!(
            self,
            Outcome::Ok | Outcome::Upstream4xx | Outcome::BadRequest | Outcome::ClientCancelled | Outcome::Fallback
        )
    }

    /// Whether the call counts as successful for the caller.
    pub const fn is_ok(self) -> bool {
        matches!(self, Outcome::Ok)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of outcomes, as a bit set (cheap to copy and to test).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct OutcomeSet(u32);

impl OutcomeSet {
    /// The empty set.
    pub const EMPTY: OutcomeSet = OutcomeSet(0);

    /// The outcomes for which [`Outcome::is_retryable`] holds.
    pub const RETRYABLE: OutcomeSet = OutcomeSet::of(&[
        Outcome::Failure,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::UpstreamReset,
        Outcome::Upstream5xx,
        Outcome::RateLimited,
    ]);

    /// Every failure of the dependency: what a fallback covers by default, plus an open breaker.
    pub const DEPENDENCY_FAILURES: OutcomeSet = OutcomeSet::of(&[
        Outcome::Failure,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::UpstreamReset,
        Outcome::Upstream5xx,
        Outcome::RateLimited,
        Outcome::CircuitOpen,
        Outcome::BulkheadFull,
    ]);

    /// A set holding exactly `outcomes`.
    pub const fn of(outcomes: &[Outcome]) -> OutcomeSet {
        let mut bits = 0u32;
        let mut i = 0;
        while i < outcomes.len() {
            bits |= 1 << outcomes[i] as u8;
            i += 1;
        }
        OutcomeSet(bits)
    }

    /// Whether `outcome` is in the set.
    #[inline]
    pub const fn contains(self, outcome: Outcome) -> bool {
        self.0 & (1 << outcome as u8) != 0
    }

    /// This set with `outcome` added.
    pub const fn with(self, outcome: Outcome) -> OutcomeSet {
        OutcomeSet(self.0 | 1 << outcome as u8)
    }

    /// This set with `outcome` removed.
    pub const fn without(self, outcome: Outcome) -> OutcomeSet {
        OutcomeSet(self.0 & !(1 << outcome as u8))
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The outcomes in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Outcome> {
        Outcome::ALL.into_iter().filter(move |o| self.contains(*o))
    }
}

impl fmt::Debug for OutcomeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Outcome::as_str)).finish()
    }
}

impl FromIterator<Outcome> for OutcomeSet {
    fn from_iter<I: IntoIterator<Item = Outcome>>(iter: I) -> Self {
        iter.into_iter().fold(OutcomeSet::EMPTY, OutcomeSet::with)
    }
}

/// Decides the [`Outcome`] of a finished call.
///
/// Implemented by [`DefaultClassifier`] and by every `Fn(&Result<T, E>) -> Outcome`.
pub trait Classify<T, E> {
    /// The outcome of `result`.
    fn classify(&self, result: &Result<T, E>) -> Outcome;

    /// How long the dependency asked us to wait before trying again (an HTTP `Retry-After`), if it did. Only asked
    /// for results that are not [`Outcome::Ok`].
    fn retry_after(&self, result: &Result<T, E>) -> Option<std::time::Duration> {
        let _ = result;
        None
    }

    /// Whether this particular call may be made again after `result`, whatever the retry policy says. A classifier
    /// that knows the request uses it to forbid replaying one that is not safe to send twice (an HTTP POST without
    /// an idempotency key, once its bytes have left). Only asked for results that are not [`Outcome::Ok`].
    fn may_retry(&self, result: &Result<T, E>) -> bool {
        let _ = result;
        true
    }

    /// Whether another attempt of this call could be sent now, while one is still in flight (a hedge): not yet
    /// for a request whose body is still arriving from its client. A hedge that is due waits (another delay) until
    /// it can.
    fn can_send_again(&self) -> bool {
        true
    }
}

/// `Ok` is [`Outcome::Ok`]; an `Err` carries its own outcome when it is one of Envelope's errors or an
/// [`std::io::Error`] (see [`crate::error::outcome_of_error`]), and is [`Outcome::Failure`] otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<T, E: HasOutcome> Classify<T, E> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(e) => e.outcome(),
        }
    }
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// An error that knows which [`Outcome`] it stands for.
///
/// Implemented by Envelope's own errors and by common error types; the blanket rule for everything else is to
/// implement it yourself, or to classify with a closure.
pub trait HasOutcome {
    /// The outcome this error stands for.
    fn outcome(&self) -> Outcome;
}

impl HasOutcome for std::io::Error {
    fn outcome(&self) -> Outcome {
        io_outcome(self)
    }
}

impl HasOutcome for String {
    fn outcome(&self) -> Outcome {
        Outcome::Failure
    }
}

impl HasOutcome for &'static str {
    fn outcome(&self) -> Outcome {
        Outcome::Failure
    }
}

impl HasOutcome for () {
    fn outcome(&self) -> Outcome {
        Outcome::Failure
    }
}

/// The outcome an I/O error stands for: a timeout, a connection that failed, or a failure.
pub(crate) fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        TimedOut => Outcome::Timeout,
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | AddrNotAvailable => {
            Outcome::ConnectError
        }
        _ => Outcome::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        for o in Outcome::ALL {
            assert_eq!(Outcome::from_name(o.as_str()), Some(o));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Outcome::ALL.len());
    }

    #[test]
    fn local_rejections_never_count_against_a_breaker_nor_retry() {
        for o in Outcome::ALL.into_iter().filter(|o| o.is_local_rejection()) {
            assert_eq!(o.breaker_verdict(), BreakerVerdict::Ignore, "{o}");
            assert!(!o.is_retryable(), "{o}");
        }
    }

    #[test]
    fn retryable_set_matches_predicate() {
        for o in Outcome::ALL {
            assert_eq!(OutcomeSet::RETRYABLE.contains(o), o.is_retryable(), "{o}");
        }
    }

    #[test]
    fn outcome_set_operations() {
        let s = OutcomeSet::EMPTY.with(Outcome::Timeout).with(Outcome::Shed);
        assert!(s.contains(Outcome::Timeout) && s.contains(Outcome::Shed));
        assert!(!s.contains(Outcome::Ok));
        assert_eq!(s.without(Outcome::Shed).iter().collect::<Vec<_>>(), vec![Outcome::Timeout]);
        assert_eq!(format!("{s:?}"), r#"{"timeout", "shed"}"#);
    }

    #[test]
    fn io_errors_and_closures_classify() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(DefaultClassifier.classify(&Err::<(), _>(refused)), Outcome::ConnectError);
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(DefaultClassifier.classify(&Err::<(), _>(boxed)), Outcome::Timeout);
        let by_status = |r: &Result<u16, ()>| match r {
            Ok(s) if *s >= 500 => Outcome::Upstream5xx,
            Ok(_) => Outcome::Ok,
            Err(()) => Outcome::ConnectError,
        };
        assert_eq!(by_status.classify(&Ok(503)), Outcome::Upstream5xx);
        assert_eq!(by_status.classify(&Ok(200)), Outcome::Ok);
    }
}
