//! Socket helpers shared by the listener's HTTP/1.1 loop (`h1`) and the upstream client (`client`).
//!
//! Tokio remembers a socket as readable until a read returns `WouldBlock`, so finding out that a socket is empty
//! costs a system call that returns nothing — two per proxied request (the client's socket while its request is
//! handled, the upstream's when its connection is reused). A read that returned less than the room it had drained
//! the socket at that moment; [`forget_readiness`] then tells tokio so without a system call. Edge-triggered epoll
//! reports every later arrival (and a close is never forgotten: tokio keeps the closed bit), so nothing is missed.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What a read adds to the buffer at least room for.
pub(crate) const READ_BUFFER: usize = 8 * 1024;

/// Reads what the socket holds into `buf`: the byte count (0 at the end of the stream), and whether the read
/// drained the socket (it returned less than the room it had).
pub(crate) fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<(usize, bool)> {
    buf.reserve(READ_BUFFER);
    let room = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    Ok((n, n < room))
}

/// Records that the socket has nothing to read (after a read that drained it), without a system call.
pub(crate) fn forget_readiness(stream: &TcpStream) {
    let _ = stream.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
}

/// Writes all of `data`, waiting for the socket when it is full.
pub(crate) async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => poll_fn(|cx| stream.poll_write_ready(cx)).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends `name: value\r\n`.
pub(crate) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where a header's name and value are in a message head, kept while the head is still being checked (before it
/// is frozen and the values can share its bytes). Offsets are 32-bit (heads are limited far below 4 GiB): the
/// positions of a small head live on the stack of each parse (see [`positions`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeaderAt {
    name: (u32, u32),
    value: (u32, u32),
}

/// Header positions kept on the stack; a head with more headers than this puts them on the heap.
pub(crate) const SMALL_HEAD: usize = 16;

/// Room for the positions of `count` headers: `small` if they fit (most heads), else `large`. Only what is used is
/// written, not room for the most headers a head may have.
pub(crate) fn positions<'a>(
    small: &'a mut [HeaderAt; SMALL_HEAD],
    large: &'a mut Vec<HeaderAt>,
    count: usize,
) -> &'a mut [HeaderAt] {
    if count <= SMALL_HEAD {
        &mut small[..count]
    } else {
        large.resize(count, HeaderAt::default());
        large
    }
}

impl HeaderAt {
    /// Where `h`, parsed out of `head`, is in it.
    pub(crate) fn of(head: &[u8], h: &httparse::Header<'_>) -> HeaderAt {
        let base = head.as_ptr() as usize;
        let at = |s: &[u8]| {
            let offset = u32::try_from(s.as_ptr() as usize - base).unwrap_or(u32::MAX);
            (offset, u32::try_from(s.len()).unwrap_or(0))
        };
        HeaderAt { name: at(h.name.as_bytes()), value: at(h.value) }
    }

    /// The name's and the value's byte ranges.
    fn ranges(self) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let range = |(offset, len): (u32, u32)| offset as usize..offset as usize + len as usize;
        (range(self.name), range(self.value))
    }

    /// The name and the value, in the `head` they were found in (empty if it is not that head).
    pub(crate) fn of_head(self, head: &[u8]) -> (&[u8], &[u8]) {
        let (name, value) = self.ranges();
        (head.get(name).unwrap_or_default(), head.get(value).unwrap_or_default())
    }
}

/// The headers at `at` in the frozen `head`, with room for `more`: values share the head's bytes. `None` if one
/// cannot be represented.
pub(crate) fn header_map(head: &Bytes, at: &[HeaderAt], more: usize) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(at.len() + more);
    for h in at {
        let (name, value) = h.ranges();
        let name = HeaderName::from_bytes(head.get(name)?).ok()?;
        if value.end > head.len() {
            return None;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value)).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

/// A `Content-Length` value as a number: ASCII digits only (RFC 9112 §6.3: `1*DIGIT`), with nothing but spaces
/// and tabs around them. `None` for anything else — a sign, a Unicode space, a list, an overflow — which a
/// front proxy might read differently (request smuggling).
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// A chunk size line's size (RFC 9112 §7.1: `1*HEXDIG`, then optional extensions after `;`, with optional spaces
/// or tabs before the `;`). `None` for anything else: a sign, leading spaces, more than 16 digits.
pub(crate) fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = match line.iter().position(|&b| b == b';') {
        Some(at) => trim_ows_end(&line[..at]),
        None => line,
    };
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 16).ok()
}

/// Without spaces and tabs (only those: `trim_ascii` also removes other ASCII whitespace) at either end.
fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(value.len());
    trim_ows_end(&value[start..])
}

fn trim_ows_end(value: &[u8]) -> &[u8] {
    let end = value.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(0, |i| i + 1);
    &value[..end]
}

/// Whether the comma-separated header value `value` lists `token` (case-insensitive), as `Connection` does.
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only() {
        for (value, expect) in [
            (&b"0"[..], Some(0)),
            (b"42", Some(42)),
            (b" 42\t", Some(42)),
            (b"007", Some(7)),
            (b"18446744073709551615", None),
            (b"9999999999999999999", Some(9_999_999_999_999_999_999)),
            (b"+3", None),
            (b"-3", None),
            (b"3 3", None),
            (b"3,3", None),
            (b"0x10", None),
            (b"", None),
            (b" ", None),
            ("\u{a0}3".as_bytes(), None),
            ("3\u{2003}".as_bytes(), None),
            (b"\x0b3", None),
        ] {
            assert_eq!(content_length(value), expect, "{:?}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn chunk_sizes_are_hex_digits_then_extensions() {
        for (line, expect) in [
            (&b"0"[..], Some(0)),
            (b"1a", Some(26)),
            (b"1A", Some(26)),
            (b"5;name=value", Some(5)),
            (b"5 ;name", Some(5)),
            (b"5\t;name", Some(5)),
            (b"ffffffffffffffff", Some(u64::MAX)),
            (b"1ffffffffffffffff", None),
            (b"+5", None),
            (b" 5", None),
            (b"5 ", None),
            (b"0x5", None),
            (b"", None),
            (b";ext", None),
            (b"-1", None),
        ] {
            assert_eq!(chunk_size(line), expect, "{:?}", String::from_utf8_lossy(line));
        }
    }
}

/// The most headers a response head can have to be passed on as it came (see [`RawHead`]).
pub(crate) const RAW_HEADERS: usize = 8;

/// A response head passed on as the upstream wrote it, instead of being built into a header map that the
/// listener's own writer would only write out again: for a `2xx` answer with at most [`RAW_HEADERS`] headers, none
/// of them hop-by-hop (so its body is not chunked either), as the upstream client reads it. The outbound side sets
/// the request id on it; anything that needs the headers as a map (HTTP/2, hyper's connections, the rate-limit
/// fields) gets them with [`RawHead::into_map`].
#[derive(Debug)]
pub(crate) struct RawHead {
    head: Bytes,
    at: [HeaderAt; RAW_HEADERS],
    len: usize,
    request_id: Option<HeaderValue>,
}

impl RawHead {
    /// The head `head` with its headers at `at`, boxed (the body that carries it is moved through every layer of
    /// the proxy); `None` if it has more than [`RAW_HEADERS`].
    pub(crate) fn new(head: Bytes, at: &[HeaderAt]) -> Option<Box<RawHead>> {
        let mut kept = [HeaderAt::default(); RAW_HEADERS];
        kept.get_mut(..at.len())?.copy_from_slice(at);
        Some(Box::new(RawHead { head, at: kept, len: at.len(), request_id: None }))
    }

    /// Replaces the upstream's `X-Request-ID`, if it sent one.
    pub(crate) fn set_request_id(&mut self, value: HeaderValue) {
        self.request_id = Some(value);
    }

    /// The headers to forward, in order, as raw names and values: the upstream's (without its `X-Request-ID` when
    /// one was set), then the request id.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        for h in &self.at[..self.len] {
            let (name, value) = h.of_head(&self.head);
            if self.request_id.is_none() || !envelope_http::headers::name_is(name, b"x-request-id") {
                f(name, value);
            }
        }
        if let Some(id) = &self.request_id {
            f(envelope_http::request_id::X_REQUEST_ID.as_str().as_bytes(), id.as_bytes());
        }
    }

    /// The same headers as a map.
    pub(crate) fn into_map(self) -> HeaderMap {
        // The parser checked every name and value (token names; visible or tab value bytes): none is refused here.
        let mut headers = header_map(&self.head, &self.at[..self.len], 1).unwrap_or_default();
        if let Some(id) = self.request_id {
            headers.insert(envelope_http::request_id::X_REQUEST_ID.clone(), id);
        }
        headers
    }
}
