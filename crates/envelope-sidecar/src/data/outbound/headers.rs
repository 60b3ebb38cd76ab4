//! Which headers the proxy changes on the way out and on the way back, for every transport: the one place that
//! says so.
//!
//! - On the request, once: hop-by-hop headers go ([`clean_request`]). On each attempt, the headers in
//!   [`ProxyHeaders`] replace the client's own: `Host` (the endpoint's), `traceparent` (this hop's or the attempt's
//!   span), `X-Forwarded-For` (the client appended), `X-Request-ID` when the client's was missing or invalid, and
//!   on a gRPC call `grpc-timeout` (the attempt's time left).
//!   The own client writes them as it writes the head; hyper-util's gets them in its copy of the header map.
//! - On the answer: hop-by-hop headers go and the request id is set ([`clean_answer`]), on a header map or on a
//!   head passed on as it came.
//!
//! Framing (`Content-Length`, `Transfer-Encoding`, `Connection`) is each transport's own: it writes the framing of
//! what it sends.

use envelope_http::grpc::GRPC_TIMEOUT;
use envelope_http::headers::{X_FORWARDED_FOR, strip_hop_by_hop};
use envelope_http::request_id::X_REQUEST_ID;
use envelope_http::trace::TRACEPARENT;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Body;

/// The headers the proxy sets on each attempt it forwards, replacing the client's own.
#[derive(Debug)]
pub(crate) struct ProxyHeaders<'a> {
    /// `X-Request-ID`, when the client's was missing or invalid (a valid one is forwarded as it came).
    pub(crate) request_id: Option<&'a HeaderValue>,
    /// `traceparent`: this hop's span (or, with span export on, the attempt's), as bytes (see
    /// `TraceContext::traceparent`).
    pub(crate) traceparent: &'a [u8],
    /// `X-Forwarded-For`, the client's address appended.
    pub(crate) forwarded_for: &'a HeaderValue,
    /// `grpc-timeout` on a gRPC call: the time the attempt has left (the caller's or the route's deadline, or the
    /// attempt timeout, whichever is sooner), so the callee stops when nobody waits for it any more.
    pub(crate) grpc_timeout: Option<&'a [u8]>,
}

impl ProxyHeaders<'_> {
    /// Whether the client's header `name` is left out because one set here takes its place.
    pub(crate) fn replaces(&self, name: &HeaderName) -> bool {
        name == header::HOST
            || name == TRACEPARENT
            || name == X_FORWARDED_FOR
            || (self.request_id.is_some() && name == X_REQUEST_ID)
            || (self.grpc_timeout.is_some() && name == GRPC_TIMEOUT)
    }

    /// The headers set here: `Host` is the endpoint's `host`.
    pub(crate) fn each(&self, host: &HeaderValue, mut f: impl FnMut(&HeaderName, &[u8])) {
        f(&header::HOST, host.as_bytes());
        f(&TRACEPARENT, self.traceparent);
        f(&X_FORWARDED_FOR, self.forwarded_for.as_bytes());
        if let Some(id) = self.request_id {
            f(&X_REQUEST_ID, id.as_bytes());
        }
        if let Some(timeout) = self.grpc_timeout {
            f(&GRPC_TIMEOUT, timeout);
        }
    }

    /// Every header of the forwarded request, in order, for a transport that writes the head itself: `Host` first
    /// (RFC 9110 §7.2), then the client's `headers` but those set here and those the transport frames with
    /// (`framing`), then the others set here.
    pub(crate) fn write(
        &self,
        host: &HeaderValue,
        headers: &HeaderMap,
        framing: impl Fn(&HeaderName) -> bool,
        mut line: impl FnMut(&[u8], &[u8]),
    ) {
        line(b"host", host.as_bytes());
        for (name, value) in headers {
            if !self.replaces(name) && !framing(name) {
                line(name.as_str().as_bytes(), value.as_bytes());
            }
        }
        self.each(host, |name, value| {
            if name != header::HOST {
                line(name.as_str().as_bytes(), value);
            }
        });
    }

    /// The client's `headers` with these set: for a transport that takes a header map.
    pub(crate) fn applied(&self, host: &HeaderValue, headers: &HeaderMap) -> HeaderMap {
        let mut out = headers.clone();
        self.each(host, |name, value| {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                out.insert(name.clone(), value);
            }
        });
        out
    }
}

/// The client's request headers, once before any attempt: hop-by-hop headers removed.
pub(crate) fn clean_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

/// An upstream's answer on its way back: hop-by-hop headers removed, the request id set (a head passed on as it
/// came has no hop-by-hop headers, and takes the request id instead of a map).
pub(crate) fn clean_answer(response: &mut http::Response<Body>, request_id: &HeaderValue) {
    if let Some(raw) = response.body_mut().raw_head() {
        raw.set_request_id(request_id.clone());
        return;
    }
    strip_hop_by_hop(response.headers_mut());
    response.headers_mut().insert(X_REQUEST_ID.clone(), request_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headers_set_replace_the_clients_own_and_nothing_else() {
        let xff = HeaderValue::from_static("10.0.0.1");
        let id = HeaderValue::from_static("ours");
        let set =
            ProxyHeaders { request_id: Some(&id), traceparent: b"00-tp", forwarded_for: &xff, grpc_timeout: None };
        let mut client = HeaderMap::new();
        for (name, value) in [
            ("host", "client"),
            ("x-request-id", "bad id"),
            ("x-forwarded-for", "1.2.3.4"),
            ("traceparent", "old"),
            ("accept", "*/*"),
            ("grpc-timeout", "5S"),
        ] {
            client.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        let host = HeaderValue::from_static("up:80");
        let map = set.applied(&host, &client);
        let mut written = Vec::new();
        set.write(
            &host,
            &client,
            |_| false,
            |name, value| {
                written.push((String::from_utf8(name.to_vec()).unwrap(), value.to_vec()));
            },
        );
        assert_eq!(written[0], ("host".to_owned(), b"up:80".to_vec()), "Host first");
        // Both transports send the same headers.
        let mut from_map: Vec<_> = map.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect();
        from_map.sort();
        written.sort();
        assert_eq!(from_map, written);
        assert_eq!(map["host"], "up:80");
        assert_eq!(map["x-request-id"], "ours");
        assert_eq!(map["x-forwarded-for"], "10.0.0.1");
        assert_eq!(map["traceparent"], "00-tp");
        assert_eq!(map["accept"], "*/*");

        // A valid client id is kept.
        let keep = ProxyHeaders { request_id: None, ..set };
        assert!(!keep.replaces(&X_REQUEST_ID));
        assert_eq!(keep.applied(&host, &client)["x-request-id"], "bad id");
        assert_eq!(map["grpc-timeout"], "5S", "kept when the proxy sets none");

        // A gRPC call's time left replaces the caller's, once, on both transports.
        let grpc = ProxyHeaders { grpc_timeout: Some(b"1200m"), ..set };
        let map = grpc.applied(&host, &client);
        assert_eq!(map.get_all("grpc-timeout").iter().collect::<Vec<_>>(), ["1200m"]);
        let mut lines = Vec::new();
        grpc.write(&host, &client, |_| false, |name, value| lines.push((name.to_vec(), value.to_vec())));
        assert_eq!(
            lines.iter().filter(|(n, _)| n == b"grpc-timeout").collect::<Vec<_>>(),
            [&(b"grpc-timeout".to_vec(), b"1200m".to_vec())]
        );
    }
}
