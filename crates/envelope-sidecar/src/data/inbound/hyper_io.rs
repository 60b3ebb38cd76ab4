//! The client's socket as hyper sees it, with the listener's connection timers: the bytes the HTTP/1.1 loop
//! (`h1`) already read come first, then the socket.
//!
//! hyper's own header read timeout restarts for every head and also bounds the wait between requests, and it
//! closes without an answer; it is off, and this wrapper keeps the same timers as `h1` instead. It knows which
//! phase the connection is in from its reads and from [`InFlight`], which the service holds from a request's
//! arrival until its response body is done:
//!
//! - *idle* (nothing in flight, no bytes of a new request): the first request within the header read timeout of
//!   the connection's start, later ones within the keep-alive timeout of the last answer; idle connections give way
//!   when the listener is full. At the deadline the read ends (hyper closes the connection).
//! - *head* (HTTP/1 bytes read while idle): the request must be in hand within the header read timeout of its first
//!   byte, else `408 Request Timeout` and the connection closes.
//! - *busy* (a request in flight): no timer; the route's deadline bounds the request.
//!
//! On HTTP/2, frames other than requests (PING, SETTINGS) do not count as activity: an HTTP/2 connection with no
//! stream open for the keep-alive timeout closes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::data::inbound::connections::{Place, REQUEST_TIMEOUT, Timer, Timers};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Requests of one connection in flight, from their arrival until their response body is done (or dropped).
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<Count>);

#[derive(Debug, Default)]
struct Count {
    n: AtomicUsize,
    /// The connection's reader, waiting for the last request to finish so that its idle timer starts.
    reader: Mutex<Option<Waker>>,
}

/// One request in flight; dropped when its response body is done.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Count>);

impl InFlight {
    pub(crate) fn start(&self) -> Busy {
        self.0.n.fetch_add(1, Ordering::AcqRel);
        Busy(self.0.clone())
    }

    /// Whether a request is in flight; if one is, the reader is woken when none is left.
    fn poll_any(&self, cx: &Context<'_>) -> bool {
        if self.0.n.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut reader = self.0.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *reader = Some(cx.waker().clone());
        }
        drop(reader);
        // The last one may have finished meanwhile, before it could see the waker.
        self.0.n.load(Ordering::Acquire) > 0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(reader) = self.0.reader.lock().unwrap_or_else(PoisonError::into_inner).take()
        {
            reader.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is done.
    pub(crate) struct Tracked<B> {
        #[pin]
        body: B,
        busy: Option<Busy>,
    }
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, busy: Busy) -> Self {
        Tracked { body, busy: Some(busy) }
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.busy.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Waiting for a request since this instant.
    Idle(Instant),
    /// A request head's first byte arrived at this instant.
    Head(Instant),
    /// A request is in flight.
    Busy,
}

/// A client socket, with bytes already read from it in front, under the listener's connection timers.
pub(crate) struct TimedIo {
    /// Read from the socket before hyper took over; hyper reads them first.
    prefix: Bytes,
    stream: TcpStream,
    timers: Timers,
    in_flight: InFlight,
    idle: Place,
    timer: Timer,
    phase: Phase,
    /// Whether a request was answered (the idle wait is then the keep-alive timeout).
    answered: bool,
    /// Whether the connection speaks HTTP/2 (no head phase, no 408).
    h2: bool,
}

impl TimedIo {
    pub(crate) fn new(prefix: Bytes, stream: TcpStream, timers: Timers, in_flight: InFlight, idle: Place) -> Self {
        let h2 = prefix.starts_with(H2_PREFACE);
        // Bytes already read are a request begun (the `h1` loop hands over with a head in hand, or none).
        let phase = if prefix.is_empty() || h2 { Phase::Idle(Instant::now()) } else { Phase::Head(Instant::now()) };
        TimedIo { prefix, stream, timers, in_flight, idle, timer: Timer::default(), phase, answered: false, h2 }
    }

    /// Moves the phase on from what the service and the socket say.
    fn update(&mut self, read_bytes: bool, cx: &Context<'_>) {
        if self.in_flight.poll_any(cx) {
            self.phase = Phase::Busy;
        } else if self.phase == Phase::Busy {
            self.answered = true;
            self.phase = Phase::Idle(Instant::now());
        }
        if read_bytes && !self.h2 && matches!(self.phase, Phase::Idle(_)) {
            self.phase = Phase::Head(Instant::now());
        }
        self.idle.set_idle(match self.phase {
            Phase::Idle(since) => Some(since),
            _ => None,
        });
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = if this.prefix.is_empty() {
            Pin::new(&mut this.stream).poll_read(cx, buf)
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            Poll::Ready(Ok(()))
        };
        if !this.h2 && before == 0 && buf.filled().starts_with(H2_PREFACE) {
            this.h2 = true;
        }
        this.update(matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before, cx);
        if result.is_ready() {
            return result;
        }
        match this.phase {
            Phase::Busy => Poll::Pending,
            Phase::Idle(since) => {
                let limit = if this.answered { this.timers.keepalive } else { this.timers.header_read };
                if this.idle.poll_give_way(cx).is_ready() || this.timer.poll_expired(since + limit, cx) {
                    // The end of the stream: hyper closes the connection.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            Phase::Head(since) => {
                if this.timer.poll_expired(since + this.timers.header_read, cx) {
                    let _ = this.stream.try_write(REQUEST_TIMEOUT);
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
