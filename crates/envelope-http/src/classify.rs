//! Status-code-first classification of HTTP exchanges into Envelope's [`Outcome`]s, and `Retry-After`.
//!
//! - a response is classified by its status: 2xx and 3xx are [`Outcome::Ok`]; 5xx is [`Outcome::Upstream5xx`];
//!   429 is [`Outcome::RateLimited`]; other 4xx are [`Outcome::Upstream4xx`], which is neither a failure of the
//!   dependency nor retryable — unless the route lists the status as a failure ([`StatusClassifier::fail_on`],
//!   e.g. 408 or 409 for some APIs);
//! - an error (no response) carries its own outcome ([`HasOutcome`]): connection refused or reset is
//!   [`Outcome::ConnectError`], a timeout is [`Outcome::Timeout`];
//! - 501 Not Implemented and 505 HTTP Version Not Supported are failures but never retried: the same request
//!   meets the same answer (as the other 5xx do not);
//! - for 429 and 503 responses, `Retry-After` is read in both of its forms (delta-seconds and HTTP-date) so that
//!   the retry policy can honour it (and give up if it exceeds its maximum delay).

use std::time::{Duration, SystemTime};

use envelope_core::{Classify, HasOutcome, Outcome};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header::RETRY_AFTER};

/// Classifies responses by status code. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusClassifier {
    /// 4xx statuses counted as failures of the dependency (bit `n - 400`).
    failing_4xx: u128,
}

impl StatusClassifier {
    /// 5xx fail, 4xx do not.
    pub fn new() -> Self {
        StatusClassifier::default()
    }

    /// Also counts these 4xx statuses as failures (retryable, and against the breaker). Other statuses are ignored.
    pub fn fail_on(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        for s in statuses {
            if s.is_client_error() {
                self.failing_4xx |= 1 << (s.as_u16() - 400);
            }
        }
        self
    }

    /// The outcome of a response with `status`.
    pub fn outcome_of(&self, status: StatusCode) -> Outcome {
        let code = status.as_u16();
        match code {
            429 => Outcome::RateLimited,
            400..=499 if self.failing_4xx & (1 << (code - 400)) != 0 => Outcome::Upstream5xx,
            400..=499 => Outcome::Upstream4xx,
            500..=599 => Outcome::Upstream5xx,
            _ => Outcome::Ok,
        }
    }

    /// Whether an answer with `status` is one that the same request would meet again: 501 (the method is not
    /// implemented) and 505 (the HTTP version is not supported). Failures, but not retried.
    pub fn is_permanent(status: StatusCode) -> bool {
        matches!(status, StatusCode::NOT_IMPLEMENTED | StatusCode::HTTP_VERSION_NOT_SUPPORTED)
    }
}

impl<B, E: HasOutcome> Classify<Response<B>, E> for StatusClassifier {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        match result {
            Ok(response) => self.outcome_of(response.status()),
            Err(e) => e.outcome(),
        }
    }

    fn retry_after(&self, result: &Result<Response<B>, E>) -> Option<Duration> {
        let response = result.as_ref().ok()?;
        match response.status() {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                retry_after(response.headers(), SystemTime::now())
            }
            _ => None,
        }
    }

    fn may_retry(&self, result: &Result<Response<B>, E>) -> bool {
        !matches!(result, Ok(r) if StatusClassifier::is_permanent(r.status()))
    }
}

/// The wait a `Retry-After` header asks for, measured from `now` (an HTTP-date in the past means no wait).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    parse_retry_after(headers.get(RETRY_AFTER)?, now)
}

/// Parses a `Retry-After` value: delta-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`).
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Overlong numbers saturate rather than fail: they mean "a long time", which the caps then refuse.
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` value (whole seconds, rounded up, at least 1) for a wait of `wait`.
pub fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, retry_after: Option<&str>) -> Result<Response<()>, std::io::Error> {
        let mut b = Response::builder().status(status);
        if let Some(v) = retry_after {
            b = b.header(RETRY_AFTER, v);
        }
        Ok(b.body(()).unwrap())
    }

    #[test]
    fn not_implemented_and_version_not_supported_fail_but_are_not_retried() {
        let c = StatusClassifier::new();
        for status in [501, 505] {
            assert_eq!(c.classify(&response(status, None)), Outcome::Upstream5xx);
            assert!(!c.may_retry(&response(status, None)), "{status}");
        }
        for status in [500, 502, 503, 504, 429] {
            assert!(c.may_retry(&response(status, None)), "{status}");
        }
    }

    #[test]
    fn status_first() {
        let c = StatusClassifier::new();
        let cases = [
            (200, Outcome::Ok),
            (204, Outcome::Ok),
            (304, Outcome::Ok),
            (400, Outcome::Upstream4xx),
            (404, Outcome::Upstream4xx),
            (408, Outcome::Upstream4xx),
            (429, Outcome::RateLimited),
            (500, Outcome::Upstream5xx),
            (503, Outcome::Upstream5xx),
            (599, Outcome::Upstream5xx),
        ];
        for (status, outcome) in cases {
            assert_eq!(c.classify(&response(status, None)), outcome, "{status}");
        }
        let refused: Result<Response<()>, _> = Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(c.classify(&refused), Outcome::ConnectError);
    }

    #[test]
    fn chosen_4xx_count_as_failures() {
        let c = StatusClassifier::new().fail_on([StatusCode::REQUEST_TIMEOUT, StatusCode::OK]);
        assert_eq!(c.outcome_of(StatusCode::REQUEST_TIMEOUT), Outcome::Upstream5xx);
        assert!(c.outcome_of(StatusCode::REQUEST_TIMEOUT).is_retryable());
        assert_eq!(c.outcome_of(StatusCode::NOT_FOUND), Outcome::Upstream4xx);
        assert_eq!(c.outcome_of(StatusCode::OK), Outcome::Ok, "non-4xx statuses are not affected");
    }

    #[test]
    fn retry_after_in_both_forms() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 12:00:00 GMT").unwrap();
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_retry_after(&v("120"), now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(&v(" 3 "), now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(&v("Sun, 22 Nov 2026 12:00:30 GMT"), now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(&v("Sun, 22 Nov 2026 11:00:00 GMT"), now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&v("99999999999999999999999"), now), Some(Duration::from_secs(u64::MAX)));
        for bad in ["", "-1", "1.5", "soon", "12abc"] {
            assert_eq!(parse_retry_after(&v(bad), now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_only_for_429_and_503() {
        let c = StatusClassifier::new();
        assert_eq!(c.retry_after(&response(429, Some("2"))), Some(Duration::from_secs(2)));
        assert_eq!(c.retry_after(&response(503, Some("1"))), Some(Duration::from_secs(1)));
        assert_eq!(c.retry_after(&response(500, Some("1"))), None);
        assert_eq!(c.retry_after(&response(429, None)), None);
    }

    #[test]
    fn retry_after_values_round_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(2001)), "3");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }
}
