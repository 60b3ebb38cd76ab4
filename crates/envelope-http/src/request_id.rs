//! Request ids: keep a valid incoming `X-Request-ID`, otherwise generate one; forward it upstream, echo it on the
//! response, and keep it identical across retries (it is set once, before the policies run).
//!
//! A request id ends up in log lines, metrics exemplars and response headers, so an incoming one is accepted only
//! if it is short and made of a conservative set of characters: ASCII letters and digits and `- _ . : / + =`,
//! 1 to [`MAX_LEN`] bytes. Anything else (control characters, quotes, spaces, newlines, overlong values) is
//! replaced by a fresh id and never echoed or logged.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// The header carrying the request id.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id accepted from a client.
pub const MAX_LEN: usize = 128;

/// A validated request id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// `value` as a request id, if it is valid (see the module docs).
    pub fn parse(value: &HeaderValue) -> Option<RequestId> {
        is_valid(value.as_bytes()).then(|| RequestId(value.clone()))
    }

    /// A new, unique request id: a UUIDv7 (millisecond timestamp first, so ids sort by arrival time), its 74
    /// random bits from a thread-local generator — not the OS, which would cost a system call per request. Request
    /// ids need to be unique, not secret.
    pub fn generate() -> RequestId {
        let millis =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut random = [0u8; 10];
        fastrand::fill(&mut random);
        let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid().as_u128();
        // The hyphenated form, two hex digits per step (one per request: uuid's own encoder costs more).
        let mut text = [b'-'; 36];
        for (range, shift) in [(0..8, 96), (9..13, 80), (14..18, 64), (19..23, 48), (24..36, 0)] {
            crate::trace::lower_hex(&mut text[range], uuid >> shift);
        }
        RequestId(HeaderValue::from_bytes(&text).expect("a UUID is a valid header value"))
    }

    /// The id of a request with `headers`: its own if valid, else a new one. The flag says whether it was kept.
    pub fn from_headers(headers: &http::HeaderMap) -> (RequestId, bool) {
        match crate::headers::find(headers, &X_REQUEST_ID).and_then(RequestId::parse) {
            Some(id) => (id, true),
            None => (RequestId::generate(), false),
        }
    }

    /// The id as text (always ASCII).
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

fn is_valid(bytes: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'='))
}

/// Sets the request id on requests (header and extension) and echoes it on responses.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// See [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let (id, kept) = RequestId::from_headers(req.headers());
        if !kept {
            req.headers_mut().insert(X_REQUEST_ID.clone(), id.header_value().clone());
        }
        req.extensions_mut().insert(id.clone());
        RequestIdFuture { inner: self.inner.call(req), id: Some(id) }
    }
}

pin_project! {
    /// Echoes the request id on the response.
    #[derive(Debug)]
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<RequestId>,
    }
}

impl<F, RB, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.inner.poll(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => return Poll::Pending,
        };
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id.0);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_conservative_ids_only() {
        for ok in ["abc", "0f8a-42_x.y:z", "a/b+c=", &"x".repeat(MAX_LEN)] {
            assert!(RequestId::parse(&HeaderValue::from_str(ok).unwrap()).is_some(), "{ok}");
        }
        for bad in ["", "a b", "a\"b", "a\tb", "{\"json\":1}", "<script>", &"x".repeat(MAX_LEN + 1), "é", "a\\nb"] {
            let value = HeaderValue::from_bytes(bad.as_bytes()).unwrap();
            assert!(RequestId::parse(&value).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_are_valid_unique_and_time_ordered() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert!(RequestId::parse(a.header_value()).is_some());
        assert_ne!(a, b);
        assert_eq!(&a.as_str()[14..15], "7", "a version-7 UUID");
        // Exactly the canonical lower-case hyphenated form of a valid v7 UUID.
        let parsed = uuid::Uuid::parse_str(a.as_str()).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(parsed.hyphenated().to_string(), a.as_str());
        // The first 48 bits are the millisecond timestamp: ids sort by creation time.
        assert!(a.as_str()[..13] <= b.as_str()[..13]);
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| RequestId::generate()).collect();
        assert_eq!(ids.len(), 10_000, "unique");
    }

    proptest! {
        /// Whatever a client sends, the id we keep is safe to put in a JSON log line and a header.
        #[test]
        fn kept_ids_need_no_escaping(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes)
                && let Some(id) = RequestId::parse(&value) {
                    let json = serde_json::to_string(id.as_str()).unwrap();
                    prop_assert_eq!(json.len(), id.as_str().len() + 2, "no escaping needed");
                    prop_assert!(id.as_str().len() <= MAX_LEN);
                }
        }
    }
}
