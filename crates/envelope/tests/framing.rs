//! Strict HTTP/1.1 framing (RFC 9112), the same on both engines: each case of the table goes to a listener served
//! by the own HTTP/1.1 loop and to one served by hyper alone, and both must give the same answer — the same
//! status, and the same fate for the connection (kept for the next request, or closed) — and the status the table
//! expects.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{FaultUpstream, envelope, two_engines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// (what is sent, the status expected).
const CASES: &[(&str, u16)] = &[
    ("GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ("POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 200),
    ("POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 03\r\n\r\nabc", 200),
    ("POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 200),
    // Lengths: digits only.
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3 3\r\n\r\nabc", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: \u{a0}3\r\n\r\nabc", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    // Chunk sizes: hex digits only.
    ("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n", 400),
    ("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    // Ambiguous framing. A length and a coding: read by the coding alone and the connection closed after the
    // answer (RFC 9112 §6.1's other choice; hyper reads every such request, and hides the length from the proxy).
    (
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        200,
    ),
    // A coding that does not end in chunked.
    ("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    // Header names are tokens.
    ("GET /x HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
    ("GET /x HTTP/1.1\r\nHost: x\r\nBad:Name: 1\r\n\r\n", 200),
    ("GET /x HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n", 400),
    // Underscores: dropped by default (the request goes on without them).
    ("GET /ok HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\r\n", 200),
    // Host: exactly one on HTTP/1.1.
    ("GET /x HTTP/1.1\r\n\r\n", 400),
    ("GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("GET /ok HTTP/1.0\r\n\r\n", 200),
    // CONNECT is not proxied.
    ("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    // Malformed request lines.
    ("GET /x HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
    ("GET\r\n\r\n", 400),
    ("GET /x HTTP/9.9\r\nHost: x\r\n\r\n", 400),
];

/// Sends `wire` on a new connection; returns the status and whether the connection still carries a request.
async fn exchange(addr: SocketAddr, wire: &str) -> (u16, bool) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(wire.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let status = read_status(&mut conn, &mut buf).await;
    // Kept or closed: a follow-up request on the same connection is answered, or meets the end of the stream.
    let kept = conn.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.is_ok() && {
        buf.clear();
        read_status_or_end(&mut conn, &mut buf).await.is_some()
    };
    (status.unwrap_or(0), kept)
}

async fn read_status(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    read_status_or_end(conn, buf).await
}

/// The status of the next response, after reading it whole (`None` at the end of the stream).
async fn read_status_or_end(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = r.parse(buf) {
            let status = r.code?;
            let len = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < n + len {
                let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await;
                match read.expect("the body within 10 s") {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            buf.drain(..(n + len).min(buf.len()));
            return Some(status);
        }
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await;
        match read.expect("an answer or the end within 10 s") {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_gets_the_same_answer_from_both_engines() {
    let up = FaultUpstream::start().await;
    let env = envelope(&two_engines(""), up.addr).await;
    let (auto, hyper) = (env.addrs[0], env.addrs[1]);
    let mut wrong = Vec::new();
    for (wire, expected) in CASES {
        let fast = exchange(auto, wire).await;
        let reference = exchange(hyper, wire).await;
        if fast != reference || fast.0 != *expected {
            wrong.push(format!("{wire:?}: own loop {fast:?}, hyper {reference:?}, expected {expected}"));
        }
        // Ambiguous framing ends the connection, whatever the answer.
        if wire.contains("Content-Length: 3\r\nTransfer-Encoding") && (fast.1 || reference.1) {
            wrong.push(format!("{wire:?}: the connection stays open: {fast:?} {reference:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The underscore header never reached the upstream.
    assert!(up.headers("/ok").iter().all(|h| !h.contains_key("transfer_encoding")));
}
