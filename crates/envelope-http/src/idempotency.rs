//! When may a request be sent again?
//!
//! - GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent (RFC 9110 §9.2.2): they may be retried and hedged.
//! - POST and PATCH may be retried only when the client says the server deduplicates them, with an
//!   `Idempotency-Key` header — or when the request provably never left: the connection failed before a byte of it
//!   was written. They are never hedged.

use http::{HeaderMap, HeaderName, Method};

/// The header by which a client marks a non-idempotent request as safe to repeat.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How safe it is to send a request again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Idempotent (by method or by key): retry on any retryable outcome; may be hedged.
    Safe,
    /// Not idempotent: retry only if no byte of the request was written (a refused connection).
    OnlyIfUnsent,
}

/// The replay safety of a request with `method` and `headers`.
pub fn replay_safety(method: &Method, headers: &HeaderMap) -> Replay {
    let idempotent_method =
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE);
    if idempotent_method || crate::headers::find(headers, &IDEMPOTENCY_KEY).is_some_and(|v| !v.is_empty()) {
        Replay::Safe
    } else {
        Replay::OnlyIfUnsent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn methods_and_keys() {
        let none = HeaderMap::new();
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE] {
            assert_eq!(replay_safety(&m, &none), Replay::Safe, "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT, Method::from_bytes(b"PURGE").unwrap()] {
            assert_eq!(replay_safety(&m, &none), Replay::OnlyIfUnsent, "{m}");
        }
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY.clone(), HeaderValue::from_static("order-42"));
        assert_eq!(replay_safety(&Method::POST, &keyed), Replay::Safe);
        keyed.insert(IDEMPOTENCY_KEY.clone(), HeaderValue::from_static(""));
        assert_eq!(replay_safety(&Method::POST, &keyed), Replay::OnlyIfUnsent, "an empty key is no key");
    }
}
