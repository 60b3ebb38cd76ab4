//! The client's socket as hyper sees it: the bytes the HTTP/1.1 loop (`h1`) already read, then the socket; and a
//! 408 for a client that is too slow to send its request head.
//!
//! hyper enforces the header read timeout but closes the connection without a response. This wrapper around the
//! client's socket remembers when the client started a request it has not finished sending (bytes read, nothing
//! answered since); when hyper drops the connection at least a header-read timeout after that, the wrapper writes a
//! `408 Request Timeout` (non-blocking, best effort) before the socket closes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

const RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// A client socket, with bytes already read from it in front, that answers 408 if it is dropped in the middle of a
/// request head past the timeout.
pub(crate) struct SlowClientGuard {
    /// Read from the socket before hyper took over; hyper reads them first.
    prefix: Bytes,
    stream: TcpStream,
    timeout: Duration,
    /// When the first byte of a not-yet-answered request arrived.
    waiting_since: Option<Instant>,
}

impl SlowClientGuard {
    pub(crate) fn new(prefix: Bytes, stream: TcpStream, timeout: Duration) -> Self {
        SlowClientGuard { prefix, stream, timeout, waiting_since: None }
    }
}

impl AsyncRead for SlowClientGuard {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = if self.prefix.is_empty() {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        } else {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            Poll::Ready(Ok(()))
        };
        if buf.filled().len() > before && self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
        result
    }
}

impl AsyncWrite for SlowClientGuard {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // Writing means the request was answered: the client is not stuck in a head.
        self.waiting_since = None;
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.waiting_since = None;
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

impl Drop for SlowClientGuard {
    fn drop(&mut self) {
        if self.waiting_since.is_some_and(|since| since.elapsed() >= self.timeout) {
            let _ = self.stream.try_write(RESPONSE);
        }
    }
}
