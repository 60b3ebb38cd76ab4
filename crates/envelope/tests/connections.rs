//! Every client connection has a timer, on both engines (the listener's own HTTP/1.1 loop and hyper): a new
//! connection's first byte and a request head within the header read timeout, the next request on a kept-alive
//! connection within the keep-alive timeout; and when `max_connections` is reached, idle connections give way so
//! that a flood of silent sockets cannot lock real clients out.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::{Action, FaultUpstream, envelope, get, send, two_engines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Both engines, with short timers.
fn config() -> String {
    two_engines("header_read_timeout = \"400ms\"\nkeepalive_timeout = \"700ms\"\nmax_connections = 40")
}

const HEADER_READ: Duration = Duration::from_millis(400);
const KEEPALIVE: Duration = Duration::from_millis(700);
/// The longest any test waits for the sidecar to act.
const BOUND: Duration = Duration::from_secs(10);

/// Reads until the sidecar closes the connection: what it sent, and when it closed (from `since`).
async fn until_closed(conn: &mut TcpStream, since: Instant) -> (String, Duration) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(BOUND, conn.read(&mut chunk)).await.expect("the sidecar closes the connection") {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), since.elapsed()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one whole response with a `Content-Length` body off `conn`.
async fn one_response(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(BOUND, conn.read(&mut chunk)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed before a whole response: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .map_or(0, |v| v.parse::<usize>().unwrap());
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let up = FaultUpstream::start().await;
    let env = envelope(&config(), up.addr).await;
    for addr in env.addrs.clone() {
        let started = Instant::now();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let (sent, after) = until_closed(&mut conn, started).await;
        assert!(sent.is_empty(), "{addr}: closed without an answer: {sent:?}");
        assert!(after >= HEADER_READ, "{addr}: not before the timeout: {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_closed_after_the_keepalive_timeout_and_not_before() {
    let up = FaultUpstream::start().await;
    let env = envelope(&config(), up.addr).await;
    for addr in env.addrs.clone() {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // Two requests, the second after longer than the header read timeout: a kept-alive connection waits for
        // the keep-alive timeout, not the header read timeout.
        conn.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(one_response(&mut conn).await.starts_with("HTTP/1.1 200"), "{addr}");
        tokio::time::sleep(HEADER_READ + Duration::from_millis(100)).await;
        conn.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(one_response(&mut conn).await.starts_with("HTTP/1.1 200"), "{addr}: still open");
        let answered = Instant::now();
        let (sent, after) = until_closed(&mut conn, answered).await;
        assert!(sent.is_empty(), "{addr}: {sent:?}");
        assert!(after >= KEEPALIVE - Duration::from_millis(50), "{addr}: not before the keep-alive timeout: {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_byte_by_byte_gets_408_at_the_header_read_timeout_from_its_first_byte() {
    let up = FaultUpstream::start().await;
    let env = envelope(&config(), up.addr).await;
    for addr in env.addrs.clone() {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        // A byte every 50 ms: the client is never silent for long, but the head never ends in time.
        let head =
            b"GET /slow HTTP/1.1\r\nHost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut cut_off = false;
        for b in head {
            if conn.write_all(&[*b]).await.is_err() {
                cut_off = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > BOUND {
                break;
            }
        }
        let (sent, after) = until_closed(&mut conn, started).await;
        assert!(cut_off || sent.starts_with("HTTP/1.1 408"), "{addr}: {sent:?}");
        assert!(sent.is_empty() || sent.starts_with("HTTP/1.1 408"), "{addr}: {sent:?}");
        assert!(after >= HEADER_READ && after < Duration::from_secs(4), "{addr}: {after:?}");
        assert_eq!(up.count("GET", "/slow"), 0);
    }
}

/// Opens `n` connections that send nothing (some may be closed again at once, or later to make room).
async fn silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        if let Ok(s) = TcpStream::connect(addr).await {
            out.push(s);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_sockets_gives_way_to_clients_with_requests() {
    let up = FaultUpstream::start().await;
    // Long timers: only giving way can make room here.
    let config = config().replace("\"400ms\"", "\"30s\"").replace("\"700ms\"", "\"30s\"");
    let env = envelope(&config, up.addr).await;
    for addr in env.addrs.clone() {
        // Five times the connection limit, all silent.
        let _flood = silent(addr, 200).await;
        for i in 0..20 {
            let path = format!("/real/{i}");
            let (status, _, _) = send(get(addr, &path)).await;
            assert_eq!(status, StatusCode::OK, "{addr}: request {i} served despite the flood");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_requests_in_flight_never_give_way() {
    let up = FaultUpstream::start().await;
    up.script("/long", [Action::delayed(200, Duration::from_millis(1500))]);
    let config = config().replace("max_connections = 40", "max_connections = 2");
    let env = envelope(&config, up.addr).await;
    for addr in env.addrs.clone() {
        let base = up.count("GET", "/long");
        let busy: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(async move {
                    let mut conn = TcpStream::connect(addr).await.unwrap();
                    conn.write_all(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
                    one_response(&mut conn).await
                })
            })
            .collect();
        // Both in flight at the upstream (bounded poll).
        let deadline = Instant::now() + BOUND;
        while up.count("GET", "/long") < base + 2 {
            assert!(Instant::now() < deadline, "both requests reach the upstream");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let up_before = up.count("GET", "/long");
        let mut third = TcpStream::connect(addr).await.unwrap();
        let _ = third.write_all(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (sent, _) = until_closed(&mut third, Instant::now()).await;
        assert!(sent.is_empty(), "{addr}: closed with no answer over the limit: {sent:?}");
        for b in busy {
            assert!(b.await.unwrap().starts_with("HTTP/1.1 200"), "{addr}: the busy connections were not touched");
        }
        assert_eq!(up.count("GET", "/long"), up_before, "the refused request never reached the upstream");
    }
}
