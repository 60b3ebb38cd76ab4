//! Local errors become HTTP responses here, and only here.
//!
//! Every rejection or failure that Envelope itself produces is answered — never turned into an error that would make
//! hyper drop the connection — as an RFC 9457 `application/problem+json` document carrying the outcome and the
//! request id:
//!
//! | outcome | status | `Retry-After` |
//! |---|---|---|
//! | `timeout` | 504 Gateway Timeout | |
//! | `connect_error`, `upstream_reset`, `failure`, `upstream_5xx` | 502 Bad Gateway | |
//! | `circuit_open` | 503 Service Unavailable | time until the breaker admits probes, spread |
//! | `bulkhead_full` | 503 Service Unavailable | 1 s, spread |
//! | `shed` | 429 Too Many Requests | 1 s, spread |
//! | `local_rate_limited`, `rate_limited` | 429 Too Many Requests | the limiter's wait, spread |
//! | `bad_request` | 400 Bad Request | |
//! | `client_cancelled` | 499 (never sent: the client is gone) | |
//!
//! *Spread*: the expected wait plus a uniformly random [`RETRY_AFTER_SPREAD`] at most, rounded up to whole seconds,
//! so clients that honour `Retry-After` do not all come back in the same second (with a fixed `1`, every client
//! shed during an overload would return at once, and be shed again).

use std::time::Duration;

use bytes::Bytes;
use envelope_core::Outcome;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::classify::retry_after_value;
use crate::request_id::{RequestId, X_REQUEST_ID};

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The status Envelope answers with for a call that ended locally in `outcome`.
pub fn status_for(outcome: Outcome) -> StatusCode {
    match outcome {
        Outcome::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Outcome::CircuitOpen | Outcome::BulkheadFull => StatusCode::SERVICE_UNAVAILABLE,
        Outcome::Shed | Outcome::LocalRateLimited | Outcome::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Outcome::BadRequest => StatusCode::BAD_REQUEST,
        Outcome::ClientCancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Outcome::Upstream4xx | Outcome::Ok => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// The most a `Retry-After` is spread beyond the expected wait.
pub const RETRY_AFTER_SPREAD: Duration = Duration::from_secs(2);

/// The `Retry-After` for an expected wait of `wait`: spread by up to [`RETRY_AFTER_SPREAD`], never earlier.
fn spread(wait: Duration) -> Duration {
    wait + RETRY_AFTER_SPREAD.mul_f64(fastrand::f64())
}

/// The default `Retry-After` for an outcome, when the policy did not say.
fn default_retry_after(outcome: Outcome) -> Option<Duration> {
    matches!(outcome, Outcome::Shed | Outcome::BulkheadFull).then_some(Duration::from_secs(1))
}

/// A `problem+json` response for a call that ended locally in `outcome`.
///
/// `detail` is a human-readable sentence (no secrets, no request data); `retry_after` overrides the default wait
/// hint. The request id, when known, is echoed in the body and in `X-Request-ID`.
pub fn problem(
    outcome: Outcome,
    detail: &str,
    request_id: Option<&RequestId>,
    retry_after: Option<Duration>,
) -> Response<Full<Bytes>> {
    problem_with_status(status_for(outcome), outcome, detail, request_id, retry_after)
}

/// Like [`problem`], answered with `status` rather than the outcome's own (a 404, 405, 413 or 414 is a
/// `bad_request` outcome): the document's `status` and `title` always say the response's status.
pub fn problem_with_status(
    status: StatusCode,
    outcome: Outcome,
    detail: &str,
    request_id: Option<&RequestId>,
    retry_after: Option<Duration>,
) -> Response<Full<Bytes>> {
    problem_after(status, outcome, detail, request_id, retry_after, None)
}

/// Like [`problem_with_status`], saying how many attempts were made for the call (`attempts`: 0 for a call
/// refused before any, which is what a fast fail is).
pub fn problem_after(
    status: StatusCode,
    outcome: Outcome,
    detail: &str,
    request_id: Option<&RequestId>,
    retry_after: Option<Duration>,
    attempts: Option<u32>,
) -> Response<Full<Bytes>> {
    let mut doc = serde_json::json!({
        "type": format!("urn:envelope:problem:{}", outcome.as_str()),
        "title": status.canonical_reason().unwrap_or("Client Closed Request"),
        "status": status.as_u16(),
        "detail": detail,
        "outcome": outcome.as_str(),
    });
    if let Some(id) = request_id {
        doc["request_id"] = serde_json::Value::from(id.as_str());
    }
    if let Some(n) = attempts {
        doc["attempts"] = serde_json::Value::from(n);
    }
    let body = serde_json::to_vec(&doc).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(wait) = retry_after.or_else(|| default_retry_after(outcome)) {
        headers.insert(header::RETRY_AFTER, retry_after_value(spread(wait)));
    }
    if let Some(id) = request_id {
        headers.insert(X_REQUEST_ID.clone(), id.header_value().clone());
    }
    // Layers further out (access log, metrics) read the true outcome from here rather than guess it from the status.
    response.extensions_mut().insert(outcome);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn retry_after_is_the_expected_wait_spread_over_the_next_seconds() {
        for (outcome, wait, low) in
            [(Outcome::Shed, None, 1), (Outcome::BulkheadFull, None, 1), (Outcome::CircuitOpen, Some(5), 5)]
        {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..300 {
                let r = problem(outcome, "x", None, wait.map(Duration::from_secs));
                let secs: u64 = r.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
                assert!((low..=low + 2).contains(&secs), "{outcome:?}: {secs}");
                seen.insert(secs);
            }
            assert!(seen.len() >= 2, "{outcome:?}: spread over several seconds, not one: {seen:?}");
        }
    }

    #[tokio::test]
    async fn problem_documents_carry_outcome_status_and_request_id() {
        let id = RequestId::parse(&HeaderValue::from_static("req-1")).unwrap();
        let r =
            problem(Outcome::CircuitOpen, "the payments breaker is open", Some(&id), Some(Duration::from_millis(2500)));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let wait: u64 = r.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((3..=5).contains(&wait), "2.5 s rounded up, spread by up to 2 s: {wait}");
        assert_eq!(r.headers()[&X_REQUEST_ID], "req-1");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["status"], 503);
        assert_eq!(doc["outcome"], "circuit_open");
        assert_eq!(doc["request_id"], "req-1");
        assert_eq!(doc["type"], "urn:envelope:problem:circuit_open");
    }

    #[test]
    fn statuses_per_outcome() {
        assert_eq!(status_for(Outcome::Timeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(status_for(Outcome::Shed), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status_for(Outcome::LocalRateLimited), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status_for(Outcome::BulkheadFull), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_for(Outcome::ConnectError), StatusCode::BAD_GATEWAY);
        assert_eq!(status_for(Outcome::BadRequest), StatusCode::BAD_REQUEST);
        let shed = problem(Outcome::Shed, "overloaded", None, None);
        assert!(shed.headers().contains_key(header::RETRY_AFTER));
        assert!(shed.headers().get(&X_REQUEST_ID).is_none());
        let timeout = problem(Outcome::Timeout, "route timeout", None, None);
        assert!(timeout.headers().get(header::RETRY_AFTER).is_none());
    }
}
