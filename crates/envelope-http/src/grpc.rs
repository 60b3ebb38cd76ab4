//! gRPC as a proxy in front of it sees it (the gRPC over HTTP/2 protocol): which requests are gRPC, what a
//! `grpc-status` means to the policies, the caller's `grpc-timeout`, and local answers a gRPC client understands.
//!
//! - A request is gRPC when its `content-type` is `application/grpc` or `application/grpc+<codec>` (or with
//!   parameters after `;`).
//! - A call's status is the `grpc-status` of the answer's trailers, or of its head in a trailers-only answer (an
//!   error without messages). [`outcome`] maps it into the taxonomy: `UNAVAILABLE` is the dependency failing
//!   (`upstream_5xx`), `RESOURCE_EXHAUSTED` its throttling (`rate_limited`), both retryable ([`retryable`]);
//!   `DEADLINE_EXCEEDED` a timeout; `INTERNAL`, `UNKNOWN`, `DATA_LOSS`, `UNIMPLEMENTED` and `CANCELLED` failures of
//!   the dependency that the same request would meet again; the rest the caller's own (`upstream_4xx`).
//! - `grpc-timeout` ([`parse_timeout`]) is the caller's deadline for the whole call.
//! - A call refused or failed here is answered trailers-only ([`local_answer`]): HTTP 200, `content-type:
//!   application/grpc`, `grpc-status` and a percent-encoded `grpc-message`, with `grpc-retry-pushback-ms` when the
//!   caller should wait (gRPC's retry throttling reads it) — never a problem document a gRPC client cannot read.

use std::time::Duration;

use bytes::Bytes;
use envelope_core::Outcome;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::request_id::{RequestId, X_REQUEST_ID};

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// `grpc-retry-pushback-ms`.
pub static GRPC_RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The status codes, as the gRPC specification numbers them.
pub mod code {
    /// Not an error.
    pub const OK: u32 = 0;
    /// The operation was cancelled (typically by the caller).
    pub const CANCELLED: u32 = 1;
    /// An error the server could not classify.
    pub const UNKNOWN: u32 = 2;
    /// The caller sent an invalid argument.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// The deadline expired before the operation completed.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// Something requested was not found.
    pub const NOT_FOUND: u32 = 5;
    /// Something the caller tried to create exists already.
    pub const ALREADY_EXISTS: u32 = 6;
    /// The caller may not do this.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A resource (a quota, space) is exhausted: throttling.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// The system is not in a state the operation needs.
    pub const FAILED_PRECONDITION: u32 = 9;
    /// Aborted, typically by a concurrency conflict.
    pub const ABORTED: u32 = 10;
    /// Out of the valid range.
    pub const OUT_OF_RANGE: u32 = 11;
    /// Not implemented or not supported.
    pub const UNIMPLEMENTED: u32 = 12;
    /// An internal error of the server.
    pub const INTERNAL: u32 = 13;
    /// The service is unavailable now: transient, worth retrying.
    pub const UNAVAILABLE: u32 = 14;
    /// Unrecoverable data loss.
    pub const DATA_LOSS: u32 = 15;
    /// The caller is not authenticated.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Whether a request with these headers is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        let prefix = b"application/grpc";
        v.len() >= prefix.len()
            && v[..prefix.len()].eq_ignore_ascii_case(prefix)
            && matches!(v.get(prefix.len()), None | Some(b'+' | b';'))
    })
}

/// A `grpc-timeout` value: 1 to 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`); `None` for anything else.
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value, for the time a call has left: in the finest unit whose count fits the 8 digits
/// the specification allows, rounded up (so the callee never gets less time than there is, and a time left is
/// never written as none), at most `99999999H`.
pub fn format_timeout(d: Duration) -> String {
    let nanos = d.as_nanos();
    for (unit, per) in [
        ('n', 1u128),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
        ('M', 60_000_000_000),
        ('H', 3_600_000_000_000),
    ] {
        let n = nanos.div_ceil(per);
        if n < 100_000_000 {
            return format!("{n}{unit}");
        }
    }
    "99999999H".to_owned()
}

/// A `grpc-status` value: 1 to 3 ASCII digits (a code the specification does not name is treated as `UNKNOWN`
/// by [`outcome`]); `None` for anything else.
pub fn parse_status(value: &[u8]) -> Option<u32> {
    if value.is_empty() || value.len() > 3 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
}

/// The `grpc-status` in `headers` (a trailers-only head, or trailers), if there is a valid one.
pub fn status_in(headers: &HeaderMap) -> Option<u32> {
    headers.get(&GRPC_STATUS).and_then(|v| parse_status(v.as_bytes()))
}

/// What a call that ended with status `code` is, in the taxonomy.
pub fn outcome(code: u32) -> Outcome {
    use code::*;
    match code {
        OK => Outcome::Ok,
        UNAVAILABLE => Outcome::Upstream5xx,
        RESOURCE_EXHAUSTED => Outcome::RateLimited,
        DEADLINE_EXCEEDED => Outcome::Timeout,
        INVALID_ARGUMENT | NOT_FOUND | ALREADY_EXISTS | PERMISSION_DENIED | FAILED_PRECONDITION | ABORTED
        | OUT_OF_RANGE | UNAUTHENTICATED => Outcome::Upstream4xx,
        // CANCELLED, UNKNOWN, UNIMPLEMENTED, INTERNAL, DATA_LOSS, and codes the specification does not name.
        _ => Outcome::Upstream5xx,
    }
}

/// Whether a call that ended with status `code` may be made again: only the transient ones, `UNAVAILABLE` and
/// `RESOURCE_EXHAUSTED` (a `DEADLINE_EXCEEDED` of the upstream spent the caller's time already).
pub fn retryable(code: u32) -> bool {
    matches!(code, code::UNAVAILABLE | code::RESOURCE_EXHAUSTED)
}

/// The status a gRPC caller gets for a call that ended here in `outcome`, answered with HTTP `status` to other
/// callers.
pub fn code_for(outcome: Outcome, status: StatusCode) -> u32 {
    match outcome {
        Outcome::Timeout => code::DEADLINE_EXCEEDED,
        Outcome::Shed | Outcome::LocalRateLimited | Outcome::RateLimited => code::RESOURCE_EXHAUSTED,
        Outcome::CircuitOpen
        | Outcome::BulkheadFull
        | Outcome::ConnectError
        | Outcome::UpstreamReset
        | Outcome::Upstream5xx => code::UNAVAILABLE,
        Outcome::ClientCancelled => code::CANCELLED,
        _ => match status.as_u16() {
            404 | 405 => code::UNIMPLEMENTED,
            413 | 414 | 431 => code::RESOURCE_EXHAUSTED,
            401 => code::UNAUTHENTICATED,
            403 => code::PERMISSION_DENIED,
            _ => code::INTERNAL,
        },
    }
}

/// `text` as a `grpc-message`: percent-encoded outside printable ASCII and for `%` itself.
pub fn encode_message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A trailers-only gRPC answer: status `code`, `message`, the request id, and the time to wait before trying
/// again, if there is one.
pub fn local_answer(
    code: u32,
    message: &str,
    id: Option<&RequestId>,
    retry_after: Option<Duration>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
    h.insert(GRPC_MESSAGE.clone(), encode_message(message));
    if let Some(wait) = retry_after {
        h.insert(GRPC_RETRY_PUSHBACK.clone(), HeaderValue::from(wait.as_millis().min(u128::from(u32::MAX)) as u32));
    }
    if let Some(id) = id {
        h.insert(X_REQUEST_ID.clone(), id.header_value().clone());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_left_is_written_in_the_finest_unit_that_fits_rounded_up() {
        for (d, text) in [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_nanos(100_000_001), "100001u"),
            (Duration::from_millis(250_000), "250000m"),
            (Duration::from_secs(100_000), "100000S"),
            (Duration::from_secs(365 * 86_400), "31536000S"),
            (Duration::from_secs(100_000_000), "1666667M"),
            (Duration::MAX, "99999999H"),
        ] {
            assert_eq!(format_timeout(d), text);
        }
        // Read back, never less than it was, and less than one unit more, at most a hundred-thousandth of it.
        for nanos in [1u64, 999, 1_001, 123_456_789, 99_999_999_999, 6_000_000_000_001, 86_400_000_000_000] {
            let d = Duration::from_nanos(nanos);
            let back = parse_timeout(format_timeout(d).as_bytes()).unwrap();
            assert!(back >= d && back - d <= d / 100_000 + Duration::from_nanos(1), "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn grpc_requests_are_known_by_their_content_type() {
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/GRPC+json", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("application/json", false),
            ("", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), grpc, "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn timeouts_are_up_to_eight_digits_and_a_unit() {
        for (v, expect) in [
            (&b"100m"[..], Some(Duration::from_millis(100))),
            (b"1S", Some(Duration::from_secs(1))),
            (b"2M", Some(Duration::from_secs(120))),
            (b"1H", Some(Duration::from_secs(3600))),
            (b"5u", Some(Duration::from_micros(5))),
            (b"99999999n", Some(Duration::from_nanos(99_999_999))),
            (b"99999999H", Some(Duration::from_secs(99_999_999 * 3600))),
            (b"0m", Some(Duration::ZERO)),
            (b"123456789m", None),
            (b"m", None),
            (b"10", None),
            (b"10s", None),
            (b"-1S", None),
            (b" 1S", None),
            (b"", None),
        ] {
            assert_eq!(parse_timeout(v), expect, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn statuses_map_into_the_taxonomy_and_only_transient_ones_retry() {
        assert_eq!(parse_status(b"14"), Some(14));
        assert_eq!(parse_status(b"0"), Some(0));
        for bad in [&b""[..], b"1a", b"-1", b"1234", b" 1"] {
            assert_eq!(parse_status(bad), None);
        }
        assert_eq!(outcome(code::OK), Outcome::Ok);
        assert_eq!(outcome(code::UNAVAILABLE), Outcome::Upstream5xx);
        assert_eq!(outcome(code::RESOURCE_EXHAUSTED), Outcome::RateLimited);
        assert_eq!(outcome(code::DEADLINE_EXCEEDED), Outcome::Timeout);
        assert_eq!(outcome(code::NOT_FOUND), Outcome::Upstream4xx);
        assert_eq!(outcome(code::INTERNAL), Outcome::Upstream5xx);
        assert_eq!(outcome(99), Outcome::Upstream5xx, "an unnamed code is UNKNOWN");
        let retried: Vec<u32> = (0..=16).filter(|c| retryable(*c)).collect();
        assert_eq!(retried, [code::RESOURCE_EXHAUSTED, code::UNAVAILABLE]);
    }

    #[test]
    fn local_answers_are_trailers_only_with_a_readable_message() {
        assert_eq!(code_for(Outcome::CircuitOpen, StatusCode::SERVICE_UNAVAILABLE), code::UNAVAILABLE);
        assert_eq!(code_for(Outcome::Timeout, StatusCode::GATEWAY_TIMEOUT), code::DEADLINE_EXCEEDED);
        assert_eq!(code_for(Outcome::Shed, StatusCode::TOO_MANY_REQUESTS), code::RESOURCE_EXHAUSTED);
        assert_eq!(code_for(Outcome::BadRequest, StatusCode::NOT_FOUND), code::UNIMPLEMENTED);
        assert_eq!(code_for(Outcome::BadRequest, StatusCode::PAYLOAD_TOO_LARGE), code::RESOURCE_EXHAUSTED);
        assert_eq!(code_for(Outcome::BadRequest, StatusCode::BAD_REQUEST), code::INTERNAL);
        let r = local_answer(code::UNAVAILABLE, "breaker is open: 100% sure\n", None, Some(Duration::from_secs(2)));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "breaker is open: 100%25 sure%0A");
        assert_eq!(r.headers()["grpc-retry-pushback-ms"], "2000");
        assert_eq!(encode_message("café"), "caf%C3%A9");
    }
}
