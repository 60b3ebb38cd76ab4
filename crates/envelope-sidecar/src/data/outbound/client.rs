//! HTTP/1.1 to plain-http endpoints, the common case, on pooled keep-alive connections driven by the request's
//! own task.
//!
//! hyper-util's pooled client runs each connection in a task of its own and talks to it through channels: a
//! request is handed over, written by the connection task, and its response handed back, which costs task
//! wake-ups, allocations and locks per request, and is most of the sidecar's own CPU per request after the
//! listener (BENCHMARKS.md). Here an attempt takes an idle connection (or connects), writes the request, and reads
//! the response head itself; the response body reads from the same connection and puts it back in the pool when
//! it ends cleanly. A body dropped early (the client went away, the deadline) closes the connection, so the
//! upstream sees the cancel.
//!
//! Served here: requests with a buffered body (or none) and no trailers, to `http` endpoints. Streamed bodies
//! (larger than the replay buffer) and `https` endpoints go through hyper-util's client.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use envelope_http::headers::name_is;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ProxyHeaders;
use crate::data::wire::{
    HeaderAt, RAW_HEADERS, RawHead, SMALL_HEAD, chunk_size, content_length, forget_readiness, has_token, header_line,
    header_map, positions, read_some, write_all,
};

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Buffers up to this size stay with a pooled connection.
const KEPT_BUFFER: usize = 64 * 1024;
/// Most response headers accepted (as hyper's default).
const MAX_HEADERS: usize = 100;

/// Idle keep-alive connections per endpoint.
pub(crate) struct Pool {
    endpoints: Vec<Mutex<VecDeque<Idle>>>,
    /// Where each endpoint is: host and port.
    targets: Vec<String>,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_idle: usize,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// A pooled connection idle for this long is asked of the kernel, not of tokio, whether the upstream closed it.
const PROBE_AFTER: Duration = Duration::from_millis(1);

/// Whether an idle connection can carry a request: the upstream has not closed it (or written to it unasked).
///
/// Pooled connections were left with no readiness (see `wire`), and tokio learns of a close only when its reactor
/// next turns, which on a busy worker can be after the connection was handed a request (a POST sent onto it then
/// fails). So a connection idle for [`PROBE_AFTER`] or more is asked of the kernel with a non-blocking `MSG_PEEK`;
/// one reused at once (the common case under load) is asked of tokio only, without a system call — an upstream
/// closing a connection within a millisecond of answering on it, without `Connection: close`, is not covered.
fn reusable(idle: &Idle) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if idle.conn.stream.poll_read_ready(&mut cx).is_ready() {
        // Readable: closed, or data nobody asked for. Either way, not reusable.
        return false;
    }
    if idle.since.elapsed() < PROBE_AFTER {
        return true;
    }
    let mut probe = [std::mem::MaybeUninit::uninit(); 1];
    matches!(socket2::SockRef::from(&idle.conn.stream).peek(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("endpoints", &self.targets).finish_non_exhaustive()
    }
}

/// A failure to connect: nothing was sent.
#[derive(Debug)]
pub(crate) struct ConnectError(io::Error);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectError {}

/// What went wrong in an exchange.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    Io(io::Error),
    /// The upstream closed the connection before a whole response head.
    Closed,
    /// The response head is malformed or too large.
    BadResponse(&'static str),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Io(e) => e.fmt(f),
            ExchangeError::Closed => f.write_str("the upstream closed the connection before answering"),
            ExchangeError::BadResponse(why) => write!(f, "invalid response from the upstream: {why}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

/// Why an attempt failed: before anything was sent (connect) or after.
#[derive(Debug)]
pub(crate) enum SendError {
    Connect(ConnectError),
    Exchange(ExchangeError),
}

impl Pool {
    pub(crate) fn new(
        targets: Vec<String>,
        connect_timeout: Duration,
        idle_timeout: Option<Duration>,
        max_idle: usize,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            endpoints: targets.iter().map(|_| Mutex::new(VecDeque::new())).collect(),
            targets,
            connect_timeout,
            idle_timeout,
            max_idle,
        });
        // Connections idle past the timeout are closed even when no request comes to find them (as Envoy's
        // idle_timeout does): a task per pool, which ends with the pool.
        if let (Some(timeout), Ok(runtime)) = (idle_timeout, tokio::runtime::Handle::try_current()) {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(timeout / 2);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else { break };
                    pool.close_expired(timeout);
                }
            });
        }
        pool
    }

    /// Closes the idle connections that have waited `timeout` or more (the oldest are at the front).
    fn close_expired(&self, timeout: Duration) {
        for idle in &self.endpoints {
            let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
            while idle.front().is_some_and(|c| c.since.elapsed() >= timeout) {
                idle.pop_front();
            }
        }
    }

    /// An idle connection to endpoint `i` that is still open, or a new one.
    async fn checkout(&self, i: usize) -> Result<Box<Conn>, ConnectError> {
        loop {
            let idle = self.endpoints[i].lock().unwrap_or_else(PoisonError::into_inner).pop_back();
            let Some(idle) = idle else { break };
            if self.idle_timeout.is_some_and(|t| idle.since.elapsed() >= t) {
                continue;
            }
            if reusable(&idle) {
                return Ok(idle.conn);
            }
        }
        // Connecting is rare and its future is large: boxed, so the future of every request stays small (it is
        // moved through each layer of the envelope before it first runs).
        Box::pin(self.connect(i)).await
    }

    /// A new connection to endpoint `i`, within the connect timeout.
    async fn connect(&self, i: usize) -> Result<Box<Conn>, ConnectError> {
        let connect = async {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the endpoint's name resolves to no address");
            for addr in tokio::net::lookup_host(self.targets[i].as_str()).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError(e)),
            Err(_) => return Err(ConnectError(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))),
        };
        let _ = stream.set_nodelay(true);
        // Boxed once for the connection's life: the response body that carries it is moved through every layer.
        Ok(Box::new(Conn { stream, buf: BytesMut::new(), out: Vec::new(), drained: false }))
    }

    fn checkin(&self, i: usize, mut conn: Box<Conn>) {
        // The buffers stay with the connection (no allocation per request), unless a large exchange grew them.
        if conn.out.capacity() > KEPT_BUFFER {
            conn.out = Vec::new();
        }
        if conn.buf.capacity() > KEPT_BUFFER {
            conn.buf = BytesMut::new();
        }
        let mut idle = self.endpoints[i].lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push_back(Idle { conn, since: Instant::now() });
        }
    }

    /// Sends `head` with `body` (the whole request body) to endpoint `i` and reads the response head.
    pub(crate) async fn send(
        self: &Arc<Self>,
        i: usize,
        head: &Head<'_>,
        body: &[u8],
    ) -> Result<Response<Body>, SendError> {
        let mut conn = self.checkout(i).await.map_err(SendError::Connect)?;
        conn.out.clear();
        write_head(&mut conn.out, head, body.len());
        conn.out.extend_from_slice(body);
        let exchange = async {
            write_all(&conn.stream, &conn.out).await.map_err(ExchangeError::Io)?;
            read_head(conn, head.parts.method == Method::HEAD).await
        };
        let (response, rest) = exchange.await.map_err(SendError::Exchange)?;
        let mut body = Body {
            conn: Some(rest.conn),
            framing: rest.framing,
            keep_alive: rest.keep_alive,
            pool: self.clone(),
            endpoint: i,
            passed: rest.passed,
        };
        if body.is_end_stream() {
            // No body (HEAD, 204, 304, length 0): the connection is free now.
            body.finish();
        }
        Ok(response.map(|()| body))
    }
}

/// A request head to send: the client's request (its headers cleaned of hop-by-hop ones), the target upstream,
/// and what the proxy sets: `Host`, and the headers in `set`.
pub(crate) struct Head<'a> {
    pub(crate) parts: &'a http::request::Parts,
    pub(crate) target: &'a str,
    pub(crate) host: &'a HeaderValue,
    pub(crate) set: &'a ProxyHeaders<'a>,
}

/// Writes the request head, framed by the body's length: the client's headers but those the proxy sets (see
/// `headers`) and the framing, which is written here.
fn write_head(out: &mut Vec<u8>, head: &Head<'_>, body_len: usize) {
    let parts = head.parts;
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let framing = |name: &header::HeaderName| {
        name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONNECTION
    };
    head.set.write(head.host, &parts.headers, framing, |name, value| header_line(out, name, value));
    if body_len > 0 || parts.headers.contains_key(header::CONTENT_LENGTH) {
        let _ = write!(out, "content-length: {body_len}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads until `buf` holds more bytes: `None` at the end of the stream, else whether the read drained the socket.
async fn fill(stream: &TcpStream, buf: &mut BytesMut) -> Result<Option<bool>, ExchangeError> {
    loop {
        poll_fn(|cx| stream.poll_read_ready(cx)).await.map_err(ExchangeError::Io)?;
        match read_some(stream, buf) {
            Ok((0, _)) => return Ok(None),
            Ok((_, drained)) => return Ok(Some(drained)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ExchangeError::Io(e)),
        }
    }
}

/// What [`read_head`] hands to the body: the connection (with the bytes after the head), how the body is framed,
/// and whether the connection can carry another exchange after it.
struct Rest {
    conn: Box<Conn>,
    framing: Framing,
    keep_alive: bool,
    passed: Option<Box<RawHead>>,
}

/// Reads a response head (skipping `1xx` answers) and works out how its body is framed.
async fn read_head(mut conn: Box<Conn>, is_head: bool) -> Result<(Response<()>, Rest), ExchangeError> {
    conn.buf.clear();
    loop {
        let Some(drained) = fill(&conn.stream, &mut conn.buf).await? else { return Err(ExchangeError::Closed) };
        conn.drained = drained;
        if let Some(p) = parse_head(&mut conn.buf, is_head)? {
            return Ok((p.response, Rest { conn, framing: p.framing, keep_alive: p.keep_alive, passed: p.passed }));
        }
    }
}

/// A response head taken off the front of the read buffer.
struct ParsedHead {
    response: Response<()>,
    framing: Framing,
    keep_alive: bool,
    passed: Option<Box<RawHead>>,
}

/// Takes a response head off the front of `buf`, skipping `1xx` answers, and works out how its body is framed:
/// `Ok(None)` while the head is not whole yet. `is_head`: the request was a HEAD (no body follows).
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<ParsedHead>, ExchangeError> {
    loop {
        // Uninitialised slots: httparse writes the ones it fills, and nothing else is read.
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(ExchangeError::BadResponse("head too large")),
            Err(_) => return Err(ExchangeError::BadResponse("malformed head")),
        };
        let Some(status) = r.code.and_then(|c| StatusCode::from_u16(c).ok()) else {
            return Err(ExchangeError::BadResponse("status"));
        };
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(ExchangeError::BadResponse("unexpected protocol switch"));
            }
            let _ = buf.split_to(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let count = r.headers.len();
        let (mut small, mut large) = ([HeaderAt::default(); SMALL_HEAD], Vec::new());
        let at = positions(&mut small, &mut large, count);
        let mut framing = Framing::Close;
        let mut keep_alive = r.version != Some(0);
        let mut pass = status.is_success() && count <= RAW_HEADERS;
        for (slot, h) in at.iter_mut().zip(r.headers.iter()) {
            let name = h.name.as_bytes();
            pass = pass && !envelope_http::headers::is_hop_by_hop(name);
            if name_is(name, b"transfer-encoding") {
                // Chunked only if it is the last coding; otherwise the body runs until the connection closes.
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                framing = if has_token(last, b"chunked") { Framing::Chunked(Chunk::Size) } else { Framing::Close };
            } else if name_is(name, b"content-length") && !matches!(framing, Framing::Chunked(_)) {
                match (content_length(h.value), framing) {
                    (Some(n), Framing::Close) => framing = Framing::Length(n),
                    (Some(n), Framing::Length(m)) if n == m => {}
                    _ => return Err(ExchangeError::BadResponse("content-length")),
                }
            } else if name_is(name, b"connection") && has_token(h.value, b"close") {
                keep_alive = false;
            }
            *slot = HeaderAt::of(buf, h);
        }
        if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            framing = Framing::Length(0);
        }
        let head = buf.split_to(len).freeze();
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = Version::HTTP_11;
        let passed = if pass {
            RawHead::new(head, at)
        } else {
            // Room for the request id the proxy adds.
            let Some(headers) = header_map(&head, at, 2) else {
                return Err(ExchangeError::BadResponse("header"));
            };
            *response.headers_mut() = headers;
            None
        };
        // A body that runs until the close leaves nothing to reuse.
        let keep_alive = keep_alive && !matches!(framing, Framing::Close);
        return Ok(Some(ParsedHead { response, framing, keep_alive, passed }));
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// After the last chunk.
    Chunked(Chunk),
    /// When the upstream closes the connection.
    Close,
    /// It has ended.
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

struct Conn {
    stream: TcpStream,
    /// What was read and not yet handed out.
    buf: BytesMut,
    /// The request being written.
    out: Vec<u8>,
    /// Whether the last read emptied the socket.
    drained: bool,
}

/// Decodes what `buf` holds of a body framed by `framing`, advancing both.
fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Step, ExchangeError> {
    loop {
        match framing {
            Framing::Done => return Ok(Step::End),
            Framing::Length(0) => return Ok(Step::End),
            Framing::Length(n) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = buf.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                return Ok(Step::Data(buf.split_to(take).freeze()));
            }
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                return Ok(Step::Data(buf.split().freeze()));
            }
            Framing::Chunked(c) => match *c {
                Chunk::Size => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > 4096 {
                            return Err(ExchangeError::BadResponse("chunk size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..end]).ok_or(ExchangeError::BadResponse("chunk size"))?;
                    let _ = buf.split_to(end + 2);
                    *c = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                }
                Chunk::Data(n) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let left = n - take as u64;
                    *c = if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ExchangeError::BadResponse("chunk end"));
                    }
                    let _ = buf.split_to(2);
                    *c = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > MAX_HEAD {
                            return Err(ExchangeError::BadResponse("trailers too large"));
                        }
                        return Ok(Step::More);
                    };
                    let _ = buf.split_to(end + 2);
                    if end == 0 {
                        return Ok(Step::End);
                    }
                }
            },
        }
    }
}

/// Fuzzing (see `crate::fuzz`): a chunked body arriving in pieces whose sizes are taken from the first bytes.
pub(crate) fn fuzz_chunked(data: &[u8]) {
    let (cuts, wire) = data.split_at(data.len().min(8));
    let cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c % 32) + 1).collect();
    decode_fuzzed(Framing::Chunked(Chunk::Size), wire, if cuts.is_empty() { &[1] } else { &cuts });
}

/// Fuzzing: a response head, then its body with the framing the head gave.
pub(crate) fn fuzz_response(data: &[u8]) {
    let Some((&flags, wire)) = data.split_first() else { return };
    let mut buf = BytesMut::from(wire);
    match parse_head(&mut buf, flags & 1 == 1) {
        Ok(Some(head)) => {
            if let Some(passed) = &head.passed {
                assert!(head.response.status().is_success(), "only a success's head is passed through");
                passed.for_each(|name, _| assert!(!envelope_http::headers::is_hop_by_hop(name)));
            }
            decode_fuzzed(head.framing, &buf.split(), &[usize::from(flags >> 1) + 1]);
        }
        Ok(None) => assert!(buf.len() < MAX_HEAD, "a head over the limit is an error"),
        Err(_) => {}
    }
}

/// Feeds `wire` to the decoder in pieces of the sizes in `cuts`; what it hands out is never more than it was fed.
fn decode_fuzzed(mut framing: Framing, wire: &[u8], cuts: &[usize]) {
    let mut buf = BytesMut::new();
    let (mut out, mut at, mut k) = (0usize, 0usize, 0usize);
    loop {
        match decode(&mut framing, &mut buf) {
            Ok(Step::Data(d)) => {
                assert!(!d.is_empty(), "no empty data frames");
                out += d.len();
                assert!(out <= at, "never more out than in");
            }
            Ok(Step::End) | Err(_) => return,
            Ok(Step::More) if at < wire.len() => {
                let n = cuts[k % cuts.len()].min(wire.len() - at);
                buf.extend_from_slice(&wire[at..at + n]);
                (at, k) = (at + n, k + 1);
            }
            Ok(Step::More) => return,
        }
    }
}

/// A response body read from its pooled connection.
pub(crate) struct Body {
    conn: Option<Box<Conn>>,
    framing: Framing,
    /// Whether the connection goes back to the pool once the body has ended cleanly.
    keep_alive: bool,
    pool: Arc<Pool>,
    endpoint: usize,
    /// The response's headers, when they were passed through (see [`RawHead`]).
    passed: Option<Box<RawHead>>,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body").field("framing", &self.framing).finish_non_exhaustive()
    }
}

/// What the decoder can do with the buffered bytes.
enum Step {
    Data(Bytes),
    More,
    End,
}

impl Body {
    /// The response's headers, when they were passed through instead of built into the response's header map.
    pub(crate) fn raw_head(&mut self) -> &mut Option<Box<RawHead>> {
        &mut self.passed
    }

    /// Whether the whole body is already read, waiting in the buffer (a small answer that came with its head).
    pub(crate) fn in_hand(&self) -> bool {
        match (&self.framing, &self.conn) {
            (Framing::Length(n), Some(conn)) => conn.buf.len() as u64 >= *n,
            (Framing::Done | Framing::Length(0), _) => true,
            _ => false,
        }
    }

    /// Whether the body has nothing more to give (a length body whose last byte was just handed out).
    fn step_ends(&self) -> bool {
        matches!(self.framing, Framing::Length(0))
    }

    /// Decodes what the buffer holds.
    fn step(&mut self) -> Result<Step, ExchangeError> {
        let Some(conn) = self.conn.as_mut() else { return Ok(Step::End) };
        decode(&mut self.framing, &mut conn.buf)
    }

    /// The body ended: a connection that can carry another request goes back to the pool.
    fn finish(&mut self) {
        let reusable = self.keep_alive && matches!(self.framing, Framing::Length(0) | Framing::Chunked(_));
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && reusable
            && conn.buf.is_empty()
            && conn.drained
        {
            // Idle, and known empty: its next checkout asks tokio, not the socket, whether it was closed meanwhile.
            forget_readiness(&conn.stream);
            self.pool.checkin(self.endpoint, conn);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        loop {
            match this.step() {
                Ok(Step::Data(data)) => {
                    if this.step_ends() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            if let Err(e) = ready!(conn.stream.poll_read_ready(cx)) {
                this.conn = None;
                this.framing = Framing::Done;
                return Poll::Ready(Some(Err(ExchangeError::Io(e))));
            }
            match read_some(&conn.stream, &mut conn.buf) {
                Ok((0, _)) => {
                    let whole = matches!(this.framing, Framing::Close);
                    this.conn = None;
                    this.framing = Framing::Done;
                    if whole {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(ExchangeError::Closed)));
                }
                Ok((_, drained)) => conn.drained = drained,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(ExchangeError::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Reads a whole body (tests).
    async fn collect(mut body: Body) -> Result<Vec<u8>, ExchangeError> {
        let mut out = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame?.into_data() {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    /// An upstream that answers each connection's requests with the given raw responses, in order.
    async fn upstream(responses: Vec<&'static str>) -> (std::net::SocketAddr, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut accepted = 0;
            let mut responses = responses.into_iter();
            while let Some(first) = responses.next() {
                let (mut s, _) = listener.accept().await.unwrap();
                accepted += 1;
                let mut pending = Some(first);
                while let Some(r) = pending.take() {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    s.write_all(r.as_bytes()).await.unwrap();
                    if r.contains("connection: close") {
                        break;
                    }
                    pending = responses.next();
                }
            }
            accepted
        });
        (addr, task)
    }

    fn request() -> http::request::Parts {
        Request::get("/x").header("host", "up").body(()).unwrap().into_parts().0
    }

    fn head(parts: &http::request::Parts) -> Head<'_> {
        static HOST: HeaderValue = HeaderValue::from_static("up");
        static FORWARDED: HeaderValue = HeaderValue::from_static("127.0.0.1");
        static SET: ProxyHeaders<'static> = ProxyHeaders {
            request_id: None,
            traceparent: b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            forwarded_for: &FORWARDED,
            grpc_timeout: None,
        };
        Head { parts, target: "/x", host: &HOST, set: &SET }
    }

    async fn exchange(pool: &Arc<Pool>) -> (StatusCode, Vec<u8>) {
        let parts = request();
        let r = match pool.send(0, &head(&parts), b"").await {
            Ok(r) => r,
            Err(e) => panic!("send failed: {e:?}"),
        };
        let status = r.status();
        (status, collect(r.into_body()).await.unwrap())
    }

    fn pool(addr: std::net::SocketAddr) -> Arc<Pool> {
        Pool::new(vec![addr.to_string().parse().unwrap()], Duration::from_secs(1), None, 8)
    }

    #[tokio::test]
    async fn length_and_chunked_bodies_reuse_one_connection() {
        let (addr, task) = upstream(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\ntrailer: x\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
        ])
        .await;
        let pool = pool(addr);
        assert_eq!(exchange(&pool).await, (StatusCode::OK, b"hello".to_vec()));
        assert_eq!(exchange(&pool).await, (StatusCode::CREATED, b"abcde".to_vec()));
        assert_eq!(exchange(&pool).await, (StatusCode::NO_CONTENT, Vec::new()));
        assert_eq!(exchange(&pool).await, (StatusCode::OK, b"ok".to_vec()));
        assert_eq!(task.await.unwrap(), 1, "every exchange on one kept-alive connection");
        assert!(pool.endpoints[0].lock().unwrap().is_empty(), "a connection the upstream closes is not pooled");
    }

    /// Sends one request and returns the response with its passed-through head, if any (tests).
    async fn answer(pool: &Arc<Pool>) -> (Response<Body>, Option<Box<RawHead>>) {
        let parts = request();
        let mut r = pool.send(0, &head(&parts), b"").await.unwrap_or_else(|e| panic!("send failed: {e:?}"));
        let passed = r.body_mut().raw_head().take();
        (r, passed)
    }

    fn written(passed: &RawHead) -> Vec<(String, String)> {
        let mut out = Vec::new();
        passed.for_each(|n, v| out.push((String::from_utf8_lossy(n).into(), String::from_utf8_lossy(v).into())));
        out
    }

    #[tokio::test]
    async fn a_plain_success_head_is_passed_through_and_anything_else_gets_a_header_map() {
        let (addr, _task) = upstream(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-ID: theirs\r\nx-app: a\r\n\r\nok",
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 3\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            MANY_HEADERS,
        ])
        .await;
        let pool = pool(addr);

        // 2xx, no hop-by-hop headers: no map; written as they came, the proxy's request id replacing theirs.
        let (r, passed) = answer(&pool).await;
        assert!(r.headers().is_empty());
        let mut passed = passed.expect("passed through");
        assert_eq!(
            written(&passed),
            [("Content-Length", "2"), ("X-Request-ID", "theirs"), ("x-app", "a")].map(|(n, v)| (n.into(), v.into()))
        );
        passed.set_request_id(HeaderValue::from_static("ours"));
        assert_eq!(
            written(&passed),
            [("Content-Length", "2"), ("x-app", "a"), ("x-request-id", "ours")].map(|(n, v)| (n.into(), v.into()))
        );
        // As a map (for hyper's connections), the same headers.
        let map = passed.into_map();
        assert_eq!(map.len(), 3);
        assert_eq!(map["content-length"], "2");
        assert_eq!(map["x-app"], "a");
        assert_eq!(map["x-request-id"], "ours");
        assert_eq!(collect(r.into_body()).await.unwrap(), b"ok");

        // Not a success (Retry-After is read from it), a hop-by-hop header, a chunked body: a header map.
        for expect in ["retry-after", "content-length", "transfer-encoding"] {
            let (r, passed) = answer(&pool).await;
            assert!(passed.is_none(), "{expect}");
            assert!(r.headers().contains_key(expect), "{expect}");
            collect(r.into_body()).await.unwrap();
        }
        // More headers than are passed through, and than fit the positions kept on the stack: every one in the map.
        let (r, passed) = answer(&pool).await;
        assert!(passed.is_none());
        assert_eq!(r.headers().len(), 21);
        assert_eq!(r.headers()["x-h0"], "0");
        assert_eq!(r.headers()["x-h19"], "19");
        assert_eq!(collect(r.into_body()).await.unwrap(), b"many");
    }

    /// A success with 20 headers of its own and a body.
    const MANY_HEADERS: &str = "HTTP/1.1 200 OK\r\nx-h0: 0\r\nx-h1: 1\r\nx-h2: 2\r\nx-h3: 3\r\nx-h4: 4\r\nx-h5: 5\r\n\
        x-h6: 6\r\nx-h7: 7\r\nx-h8: 8\r\nx-h9: 9\r\nx-h10: 10\r\nx-h11: 11\r\nx-h12: 12\r\nx-h13: 13\r\nx-h14: 14\r\n\
        x-h15: 15\r\nx-h16: 16\r\nx-h17: 17\r\nx-h18: 18\r\nx-h19: 19\r\ncontent-length: 4\r\n\r\nmany";

    #[tokio::test]
    async fn a_body_until_close_is_read_whole_and_its_connection_dropped() {
        let (addr, task) = upstream(vec!["HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"]).await;
        let pool = pool(addr);
        assert_eq!(exchange(&pool).await, (StatusCode::OK, b"all of it".to_vec()));
        assert_eq!(task.await.unwrap(), 1);
        assert!(pool.endpoints[0].lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_found_out_before_it_is_used() {
        // The test is the upstream, on the same task: it answers, keeps the connection a while, closes it and uses
        // the pool at once, with no await in between, so tokio's reactor cannot have seen the close: only the
        // kernel knows.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve_one = || async {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut [0u8; 4096]).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
            s
        };
        let pool = pool(addr);
        let (answer, mut upstream) = tokio::join!(exchange(&pool), serve_one());
        assert_eq!(answer.0, StatusCode::OK);
        for round in 0..3 {
            assert_eq!(pool.endpoints[0].lock().unwrap().len(), 1, "kept alive: nothing said otherwise");
            tokio::time::sleep(PROBE_AFTER * 3).await;
            drop(upstream);
            let (answer, next) = tokio::join!(exchange(&pool), serve_one());
            assert_eq!(answer.0, StatusCode::OK, "round {round}: a new connection, not the closed one");
            upstream = next;
        }
    }

    #[tokio::test]
    async fn a_short_body_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut [0u8; 4096]).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").await.unwrap();
        });
        let pool = pool(addr);
        let parts = request();
        let r = pool.send(0, &head(&parts), b"").await.unwrap();
        assert!(matches!(collect(r.into_body()).await, Err(ExchangeError::Closed)));
        assert!(pool.endpoints[0].lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let pool = pool(addr);
        let parts = request();
        assert!(matches!(pool.send(0, &head(&parts), b"").await, Err(SendError::Connect(_))));
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_traffic() {
        // One answer, then the upstream waits for its connection to end.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut [0u8; 4096]).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
            let answered = Instant::now();
            assert_eq!(s.read(&mut [0u8; 16]).await.unwrap(), 0, "no other request comes");
            answered.elapsed()
        });
        let timeout = Duration::from_millis(100);
        let pool = Pool::new(vec![addr.to_string().parse().unwrap()], Duration::from_secs(1), Some(timeout), 8);
        assert_eq!(exchange(&pool).await.0, StatusCode::OK);
        assert_eq!(pool.endpoints[0].lock().unwrap().len(), 1, "kept alive after the exchange");
        let after = tokio::time::timeout(Duration::from_secs(5), closed).await.unwrap().unwrap();
        assert!(after >= timeout, "closed after {after:?}, not before the idle timeout");
        assert!(pool.endpoints[0].lock().unwrap().is_empty());
    }

    /// Feeds `wire` to the decoder in pieces of the given sizes: what it handed out, whether it reached the end,
    /// and what is left over (bytes after the body stay for the next response).
    fn decode_in_pieces(mut framing: Framing, wire: &[u8], cuts: &[usize]) -> (Vec<u8>, bool, Vec<u8>) {
        let mut buf = BytesMut::new();
        let (mut out, mut at, mut k) = (Vec::new(), 0, 0);
        loop {
            match decode(&mut framing, &mut buf) {
                Ok(Step::Data(d)) => out.extend_from_slice(&d),
                Ok(Step::End) => return (out, true, [&buf[..], &wire[at..]].concat()),
                Ok(Step::More) if at < wire.len() => {
                    let n = cuts[k % cuts.len()].min(wire.len() - at);
                    buf.extend_from_slice(&wire[at..at + n]);
                    (at, k) = (at + n, k + 1);
                }
                Ok(Step::More) | Err(_) => return (out, false, buf.to_vec()),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn chunked_bodies_decode_whole_however_they_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..40), 0..8),
            upper in proptest::bool::ANY,
            extension in proptest::bool::ANY,
            trailer in proptest::bool::ANY,
            cuts in proptest::collection::vec(1usize..16, 1..32),
            next in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                let size = if upper { format!("{:X}", c.len()) } else { format!("{:x}", c.len()) };
                wire.extend_from_slice(size.as_bytes());
                if extension {
                    wire.extend_from_slice(b";name=value");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"x-checksum: 1\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&next);
            let (out, ended, rest) = decode_in_pieces(Framing::Chunked(Chunk::Size), &wire, &cuts);
            proptest::prop_assert!(ended);
            proptest::prop_assert_eq!(out, chunks.concat());
            proptest::prop_assert_eq!(rest, next);
        }

        #[test]
        fn length_bodies_stop_at_their_length(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..100),
            next in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
            cuts in proptest::collection::vec(1usize..16, 1..32),
        ) {
            let wire = [&body[..], &next[..]].concat();
            let (out, ended, rest) = decode_in_pieces(Framing::Length(body.len() as u64), &wire, &cuts);
            proptest::prop_assert!(ended);
            proptest::prop_assert_eq!(out, body);
            proptest::prop_assert_eq!(rest, next);
        }

        #[test]
        fn any_bytes_as_a_chunked_body_never_panic(
            wire in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            cuts in proptest::collection::vec(1usize..16, 1..32),
        ) {
            let _ = decode_in_pieces(Framing::Chunked(Chunk::Size), &wire, &cuts);
        }
    }

    #[test]
    fn the_head_carries_the_body_length_no_hop_by_hop_framing_and_the_headers_the_proxy_sets() {
        let mut parts = request();
        parts.method = Method::POST;
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        parts.headers.insert("traceparent", HeaderValue::from_static("client's"));
        parts.headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        parts.headers.insert("x-request-id", HeaderValue::from_static("bad id"));
        parts.headers.insert("x-app", HeaderValue::from_static("kept"));
        let (xff, id) = (HeaderValue::from_static("10.0.0.1, 127.0.0.1"), HeaderValue::from_static("new-id"));
        let set =
            ProxyHeaders { request_id: Some(&id), traceparent: b"attempt's", forwarded_for: &xff, grpc_timeout: None };
        let mut out = Vec::new();
        write_head(&mut out, &Head { set: &set, ..head(&parts) }, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /x HTTP/1.1\r\nhost: up\r\nx-app: kept\r\ntraceparent: attempt's\r\n\
             x-forwarded-for: 10.0.0.1, 127.0.0.1\r\nx-request-id: new-id\r\ncontent-length: 3\r\n\r\n"
        );
        // A valid client id (not replaced) is forwarded as it came.
        parts.headers.insert("x-request-id", HeaderValue::from_static("theirs"));
        let set = ProxyHeaders { request_id: None, ..set };
        let mut out = Vec::new();
        write_head(&mut out, &Head { set: &set, ..head(&parts) }, 0);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches("x-request-id").count(), 1, "{out}");
        assert!(out.contains("x-request-id: theirs\r\n"), "{out}");
    }
}
