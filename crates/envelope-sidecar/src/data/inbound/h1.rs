//! HTTP/1.1 from clients, the common case, without hyper's connection machinery.
//!
//! A proxy spends most of its time moving small requests and responses; hyper's server dispatcher (its body
//! channel, its buffered codec, its per-message state machine) costs more than the whole envelope around it (see
//! BENCHMARKS.md: a hand-written HTTP/1 loop used about a third of the CPU per request of hyper's). So the listener
//! serves the common case here, and everything else stays with hyper:
//!
//! - served here: HTTP/1.1 requests whose head arrives whole, within the listener's head limits, without
//!   `Transfer-Encoding`, `Expect` or `Upgrade`, with no body or a `Content-Length` body of at most
//!   [`MAX_FAST_BODY`] that has arrived with the head;
//! - handed to hyper, with the bytes already read, for the rest of the connection: anything else — HTTP/2's
//!   preface, HTTP/1.0, heads over the limits (hyper's 431), malformed heads (hyper's 400), chunked or large
//!   bodies.
//!
//! Every connection has a timer: a new connection's first byte and each head's last byte (counted from its first)
//! within the header read timeout (else 408 for a head begun), the next request on a kept-alive connection within
//! the keep-alive timeout. A connection waiting for a request's first byte is idle and gives way when the listener
//! is full (see `connections`). Heads that arrive in pieces are read here too, up to the head size limit.
//!
//! Requests served here go through the same proxy as hyper's, as `Request<InBody>` (`proxy::handle_passing`, which
//! may leave a plain upstream answer's head as it came, for `write_response` to write out). While a request is
//! handled the client's socket is watched: a client that goes away cancels its request, as with hyper.
//! Responses are written with their own framing: the upstream's `Content-Length`, else the body's exact size,
//! else chunked; a body that fails midway (the deadline, the upstream reset) ends the connection, so the client
//! sees a truncated response, never a wrong one.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use envelope_http::headers::name_is;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::data::inbound::connections::{Place, REQUEST_TIMEOUT, Timer, Timers};

use crate::data::InBody;
use crate::data::wire::{
    HeaderAt, READ_BUFFER, SMALL_HEAD, content_length, forget_readiness, has_token, header_line, header_map, positions,
    read_some, write_all,
};

/// The largest request body served here (larger ones go to hyper, which streams them).
pub(crate) const MAX_FAST_BODY: usize = envelope_http::body::DEFAULT_REPLAY_LIMIT;

/// Most headers looked at here; a request with more goes to hyper (which applies the listener's limit).
const MAX_FAST_HEADERS: usize = 64;

/// Once this much is buffered while a request is in flight (a client pipelining), the socket is left alone.
const MAX_BUFFERED: usize = 2 * MAX_FAST_BODY;

/// The listener's limits on a request head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
}

/// How a connection left this loop.
#[derive(Debug)]
pub(crate) enum Next {
    /// It is finished (closed by either side, or drained on shutdown).
    Closed,
    /// Hyper takes over, starting with these bytes already read from the socket.
    HandOver(Bytes),
}

/// Serves requests on `stream` until it closes, times out, gives way to a new connection, the listener stops, or a
/// request needs hyper.
pub(crate) async fn serve<S, F>(
    stream: &mut TcpStream,
    limits: Limits,
    timers: Timers,
    idle: &mut Place,
    stop: &mut watch::Receiver<bool>,
    mut service: S,
) -> Next
where
    S: FnMut(Request<InBody>) -> F,
    F: Future<Output = Response<crate::data::proxy::ProxyBody>>,
{
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut out = Vec::with_capacity(1024);
    // The stop signal: `stopping` asks for it with an atomic read; `stopped` is polled once so that the signal
    // wakes an idle connection (a task's waker stays the same, so once is enough).
    let stopping = stop.clone();
    let mut stopped = pin!(stop.changed());
    let mut registered = false;
    // Whether the last read emptied the socket.
    let mut drained = false;
    // The connection's one timer, armed when first needed and moved, not made again, for each wait.
    let mut timer = Timer::default();
    // Whether a request was answered on this connection (then the idle wait is the keep-alive timeout).
    let mut answered = false;
    // When the head being read began to arrive, if it came in pieces.
    let mut head_started: Option<Instant> = None;
    loop {
        if buf.is_empty() {
            // Idle: wait for the next request's first byte, the listener to stop, a new connection to need this
            // one's place, or the idle timer.
            let since = Instant::now();
            let deadline = since + if answered { timers.keepalive } else { timers.header_read };
            idle.set_idle(Some(since));
            let woke = poll_fn(|cx| {
                if stopping.has_changed().unwrap_or(true) {
                    return Poll::Ready(false);
                }
                if !registered {
                    registered = true;
                    if stopped.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(false);
                    }
                }
                if let Poll::Ready(r) = stream.poll_read_ready(cx) {
                    return Poll::Ready(r.is_ok());
                }
                if idle.poll_give_way(cx).is_ready() || timer.poll_expired(deadline, cx) {
                    return Poll::Ready(false);
                }
                Poll::Pending
            })
            .await;
            idle.set_idle(None);
            if !woke {
                return Next::Closed;
            }
            match read_some(stream, &mut buf) {
                Ok((0, _)) => return Next::Closed,
                Ok((_, all)) => drained = all,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Next::Closed,
            }
        }
        let head = match parse(&mut buf, limits) {
            Ok(head) => head,
            Err(Refused::Partial) => {
                // The rest of the head must come within the header read timeout of its first byte (a slow client
                // holds a connection, never the listener): 408 and the connection closed otherwise.
                let deadline = *head_started.get_or_insert_with(Instant::now) + timers.header_read;
                let readable = poll_fn(|cx| {
                    if let Poll::Ready(r) = stream.poll_read_ready(cx) {
                        return Poll::Ready(r.is_ok());
                    }
                    if timer.poll_expired(deadline, cx) {
                        return Poll::Ready(false);
                    }
                    Poll::Pending
                })
                .await;
                if !readable {
                    let _ = write_all(stream, REQUEST_TIMEOUT).await;
                    return Next::Closed;
                }
                match read_some(stream, &mut buf) {
                    Ok((0, _)) => return Next::Closed,
                    Ok((_, all)) => drained = all,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Next::Closed,
                }
                continue;
            }
            Err(Refused::HandOver) => return Next::HandOver(buf.freeze()),
            Err(Refused::BadRequest) => {
                let _ = write_all(stream, BAD_REQUEST).await;
                return Next::Closed;
            }
        };
        head_started = None;
        answered = true;
        let (request, close, is_head) = head;
        if buf.is_empty() && drained {
            // Nothing more to read: the watch below waits for the next event instead of asking the socket.
            forget_readiness(stream);
        }

        // Handle it, watching the client: if it goes away (end of stream, error), the request is cancelled
        // (dropped). Bytes that arrive meanwhile (a pipelined request) are kept for later.
        let response = {
            let mut call = pin!(service(request));
            let mut watching = true;
            loop {
                let step = poll_fn(|cx| {
                    if let Poll::Ready(response) = call.as_mut().poll(cx) {
                        return Poll::Ready(Some(response));
                    }
                    if watching && stream.poll_read_ready(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                });
                if let Some(response) = step.await {
                    break response;
                }
                match read_some(stream, &mut buf) {
                    Ok((0, _)) => return Next::Closed,
                    Ok((_, all)) => {
                        drained = all;
                        watching = buf.len() < MAX_BUFFERED;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Next::Closed,
                }
            }
        };
        // The listener stopping while the request was in flight: this answer is the connection's last.
        let close = close || stopping.has_changed().unwrap_or(true);
        match write_response(stream, &mut out, response, is_head, close).await {
            Ok(true) if !close => {}
            _ => {
                let _ = poll_fn(|cx| Pin::new(&mut *stream).poll_shutdown(cx)).await;
                return Next::Closed;
            }
        }
    }
}

/// A request head read whole: the request, whether the client asked to close, whether it is a HEAD.
type Head = (Request<InBody>, bool, bool);

/// Why a request is not served here.
enum Refused {
    /// Its head has not arrived whole yet (and is within the head size limit): read more.
    Partial,
    /// hyper serves it (and the rest of the connection).
    HandOver,
    /// Its target or a header value cannot be represented: 400, and the connection ends.
    BadRequest,
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Takes one request (head and body) off the front of `buf`, or says why it cannot be served here.
fn parse(buf: &mut BytesMut, limits: Limits) -> Result<Head, Refused> {
    // Uninitialised slots: httparse writes the ones it fills, and nothing else is read.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_FAST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= limits.max_header_bytes => return Err(Refused::Partial),
        // Too large (hyper's 431), malformed (hyper's 400), or more headers than looked at here.
        _ => return Err(Refused::HandOver),
    };
    if head_len > limits.max_header_bytes || req.headers.len() > limits.max_headers || req.version != Some(1) {
        return Err(Refused::HandOver);
    }
    let Some(method) = req.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()) else {
        return Err(Refused::HandOver);
    };
    if method == Method::CONNECT {
        return Err(Refused::HandOver);
    }
    let Some(path) = req.path else { return Err(Refused::HandOver) };
    let path_at = path.as_ptr() as usize - buf.as_ptr() as usize;
    let path_at = path_at..path_at + path.len();
    // Where each header is (the head is frozen afterwards).
    let count = req.headers.len();
    let (mut small, mut large) = ([HeaderAt::default(); SMALL_HEAD], Vec::new());
    let at = positions(&mut small, &mut large, count);
    let mut declared: Option<usize> = None;
    let mut close = false;
    for (slot, h) in at.iter_mut().zip(req.headers.iter()) {
        let name = h.name.as_bytes();
        if name_is(name, b"transfer-encoding") || name_is(name, b"expect") || name_is(name, b"upgrade") {
            return Err(Refused::HandOver);
        }
        if name_is(name, b"content-length") {
            let n = content_length(h.value).and_then(|n| usize::try_from(n).ok());
            match (declared, n) {
                (None, Some(n)) if n <= MAX_FAST_BODY => declared = Some(n),
                _ => return Err(Refused::HandOver),
            }
        }
        if name_is(name, b"connection") {
            if has_token(h.value, b"upgrade") {
                return Err(Refused::HandOver);
            }
            close |= has_token(h.value, b"close");
        }
        *slot = HeaderAt::of(buf, h);
    }
    let body_len = declared.unwrap_or(0);
    if buf.len() < head_len + body_len {
        // The body is still on its way: hyper reads it.
        return Err(Refused::HandOver);
    }
    let head = buf.split_to(head_len).freeze();
    let body = buf.split_to(body_len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at)) else { return Err(Refused::BadRequest) };
    // The proxy adds nothing to them (the headers it sets are written with the upstream request).
    let Some(headers) = header_map(&head, at, 0) else { return Err(Refused::BadRequest) };
    let is_head = method == Method::HEAD;
    let mut request = Request::new(Either::Right(Full::new(body)));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok((request, close, is_head))
}

/// Fuzzing (see `crate::fuzz`): parses requests off `data` until it is used up or one is not served here.
pub(crate) fn fuzz_parse(data: &[u8]) {
    let limits = Limits { max_header_bytes: 16 * 1024, max_headers: 100 };
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match parse(&mut buf, limits) {
            Ok((request, _, _)) => {
                assert!(buf.len() < before, "a request served here consumed its head");
                assert_eq!(request.version(), Version::HTTP_11);
                assert!(request.method() != Method::CONNECT);
            }
            // Refused with 400: the connection closes, what was read does not matter.
            Err(Refused::BadRequest) => return,
            Err(Refused::HandOver | Refused::Partial) => {
                assert_eq!(buf.len(), before, "a request not served here leaves every byte for hyper or the next read");
                return;
            }
        }
    }
}

/// Writes `response`; `Ok(true)` if the connection can carry another request.
async fn write_response(
    stream: &TcpStream,
    out: &mut Vec<u8>,
    response: Response<crate::data::proxy::ProxyBody>,
    is_head: bool,
    close: bool,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let raw = crate::data::proxy::take_raw_head(&mut body);
    let status = parts.status;
    let bodiless =
        is_head || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let mut body = pin!(body);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut declared: Option<u64> = None;
    let mut dated = false;
    // Each header (raw name, any case): framing headers are redone here, the first Content-Length is kept.
    let mut write_header = |name: &[u8], value: &[u8]| {
        if name_is(name, b"connection") || name_is(name, b"transfer-encoding") {
            return;
        }
        dated |= name_is(name, b"date");
        if name_is(name, b"content-length") {
            if declared.is_some() {
                return;
            }
            declared = Some(content_length(value).unwrap_or(u64::MAX));
        }
        header_line(out, name, value);
    };
    if let Some(raw) = &raw {
        raw.for_each(&mut write_header);
    }
    for (name, value) in &parts.headers {
        write_header(name.as_str().as_bytes(), value.as_bytes());
    }
    if !dated {
        DATE.with(|d| header_line(out, b"date", d.borrow_mut().now()));
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if bodiless {
        out.extend_from_slice(b"\r\n");
        write_all(stream, out).await?;
        return Ok(true);
    }
    // The framing: the declared length, else the body's exact size, else chunked.
    let chunked = match declared {
        Some(_) => false,
        None => match body.size_hint().exact() {
            Some(n) => {
                let mut digits = itoa::Buffer::new();
                header_line(out, b"content-length", digits.format(n).as_bytes());
                declared = Some(n);
                false
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    let mut remaining = declared.unwrap_or(u64::MAX);
    // What is ready is coalesced into one write (the head with the first piece of a small body); whenever the body
    // would make the writer wait, what it holds goes out first. So a streamed body (server-sent events, tokens,
    // progress) reaches the client piece by piece as the upstream sends it, and a small one in one write.
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    write_all(stream, out).await?;
                    out.clear();
                }
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        match frame {
            None => break,
            Some(Err(_)) => {
                // Cut off (deadline, upstream reset): what was sent stands, the connection ends.
                write_all(stream, out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                } else {
                    let len = data.len() as u64;
                    if len > remaining {
                        // More than declared: never send it; end the connection.
                        out.extend_from_slice(&data[..remaining as usize]);
                        write_all(stream, out).await?;
                        return Ok(false);
                    }
                    remaining -= len;
                    out.extend_from_slice(&data);
                }
                if out.len() >= READ_BUFFER {
                    write_all(stream, out).await?;
                    out.clear();
                }
            }
        }
        if body.is_end_stream() {
            break;
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_all(stream, out).await?;
    // A body shorter than declared leaves the client waiting for bytes that never come: end the connection.
    Ok(chunked || remaining == 0 || declared.is_none())
}

/// The `Date` header, formatted once a second.
struct CachedDate {
    second: u64,
    text: [u8; 29],
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
        }
        &self.text
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: 0, text: [0; 29] }) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_header_bytes: 8192, max_headers: 100 };

    proptest::proptest! {
        #[test]
        fn any_bytes_are_served_handed_over_or_refused_never_a_panic(
            wire in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let mut buf = BytesMut::from(&wire[..]);
            let _ = parse(&mut buf, LIMITS);
        }

        #[test]
        fn a_plain_request_keeps_its_method_target_headers_and_body(
            method in proptest::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
            path in "/[a-z0-9/._~-]{0,30}(\\?[a-z0-9=&]{0,20})?",
            // Up to past the positions kept on the stack (`SMALL_HEAD`).
            headers in proptest::collection::vec(("x-[a-z]{1,10}", "[ -~]{0,20}"), 0..24),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            next in "(GET / HTTP/1.1\r\n\r\n)?",
        ) {
            let mut wire = format!("{method} {path} HTTP/1.1\r\nhost: example\r\n");
            for (name, value) in &headers {
                wire.push_str(&format!("{name}: {value}\r\n"));
            }
            wire.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
            let mut bytes = wire.into_bytes();
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(next.as_bytes());
            let mut buf = BytesMut::from(&bytes[..]);
            let Ok((request, close, is_head)) = parse(&mut buf, LIMITS) else {
                return Err(proptest::test_runner::TestCaseError::fail("a plain request is served here"));
            };
            proptest::prop_assert!(!close && !is_head);
            proptest::prop_assert_eq!(request.method().as_str(), method);
            proptest::prop_assert_eq!(request.uri().to_string(), path);
            for (name, value) in &headers {
                let got: Vec<_> = request.headers().get_all(name.as_str()).iter().map(|v| v.as_bytes().to_vec()).collect();
                proptest::prop_assert!(got.contains(&value.trim().as_bytes().to_vec()), "{name}: {value:?} in {got:?}");
            }
            let Either::Right(full) = request.into_body() else {
                return Err(proptest::test_runner::TestCaseError::fail("the body is buffered"));
            };
            let data = http_body_util::BodyExt::collect(full);
            let Ok(data) = ready_now(data);
            let data = data.to_bytes();
            proptest::prop_assert_eq!(&data[..], &body[..]);
            proptest::prop_assert_eq!(&buf[..], next.as_bytes(), "the next request stays buffered");
        }
    }

    /// Polls a future that is ready at once (a buffered body).
    fn ready_now<F: Future>(f: F) -> F::Output {
        let mut f = pin!(f);
        match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("a buffered body is ready at once"),
        }
    }

    #[test]
    fn a_head_in_pieces_is_read_on_here_within_the_head_limit_and_handed_over_past_it() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nhost: partial"[..]);
        assert!(matches!(parse(&mut buf, LIMITS), Err(Refused::Partial)));
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nhost: partial", "nothing consumed");
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(LIMITS.max_header_bytes + 1, b'a');
        let mut buf = BytesMut::from(&long[..]);
        assert!(matches!(parse(&mut buf, LIMITS), Err(Refused::HandOver)), "hyper answers 431");
    }

    #[test]
    fn what_hyper_must_serve_is_handed_over() {
        for wire in [
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\ncontent-length: 10\r\n\r\nshort",
            "PUT / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT example:443 HTTP/1.1\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(wire.as_bytes());
            assert!(matches!(parse(&mut buf, LIMITS), Err(Refused::HandOver)), "{wire:?}");
            assert_eq!(&buf[..], wire.as_bytes(), "nothing consumed: hyper sees every byte");
        }
    }
}
