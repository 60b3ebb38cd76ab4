//! Responses stream through every inbound path: the listener's own HTTP/1.1 loop, hyper's HTTP/1.1 and hyper's
//! HTTP/2, with chunked and with `Content-Length` upstream bodies.
//!
//! The upstream sends an event and then waits until the test's client has received it before it sends the next:
//! a proxy that held anything back would never deliver the first event, and the client's bounded wait fails. So
//! the test proves events arrive as they are sent, without timing anything.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::{envelope, two_engines, two_engines_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const EVENTS: usize = 3;
const BOUND: Duration = Duration::from_secs(10);

/// Reads a request head off `s`: the head, and what came after it. `None` if the connection ends first.
async fn read_head(s: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(at + 4);
            return Some((buf, rest));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn event(k: usize) -> String {
    format!("data: event-{k}\n\n")
}

/// An upstream answering every request with [`EVENTS`] server-sent events, each sent only once the client has
/// acknowledged the one before (`acked` counts them). `/chunked` frames the body chunked, `/length` with a
/// `Content-Length`.
async fn upstream(acked: watch::Receiver<usize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let mut acked = acked.clone();
            tokio::spawn(async move {
                let Some((head, _)) = read_head(&mut s).await else { return };
                let chunked = String::from_utf8_lossy(&head).contains("/chunked");
                let start = *acked.borrow_and_update();
                let framing = if chunked {
                    "transfer-encoding: chunked".to_owned()
                } else {
                    format!("content-length: {}", (0..EVENTS).map(|k| event(k).len()).sum::<usize>())
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n{framing}\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for k in 0..EVENTS {
                    let data = event(k);
                    let wire = if chunked { format!("{:x}\r\n{data}\r\n", data.len()) } else { data };
                    if s.write_all(wire.as_bytes()).await.is_err() {
                        return;
                    }
                    // The next event only once the client has this one.
                    let wait = acked.wait_for(|&n| n > start + k);
                    if tokio::time::timeout(BOUND, wait).await.is_err() {
                        return;
                    }
                }
                if chunked {
                    let _ = s.write_all(b"0\r\n\r\n").await;
                }
            });
        }
    });
    addr
}

/// Over a raw HTTP/1.1 connection: each event is seen before the next is sent.
async fn over_http1(addr: SocketAddr, path: &str, ack: &watch::Sender<usize>) {
    over_http1_conn(addr, path, ack).await;
}

/// [`over_http1`], returning the connection and what it read.
async fn over_http1_conn(addr: SocketAddr, path: &str, ack: &watch::Sender<usize>) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut chunk = [0u8; 4096];
    for k in 0..EVENTS {
        while !seen.contains(&event(k)) {
            let read = tokio::time::timeout(BOUND, conn.read(&mut chunk)).await;
            let n = read.unwrap_or_else(|_| panic!("{addr}{path}: event {k} not delivered; got {seen:?}")).unwrap();
            assert!(n > 0, "{addr}{path}: closed before event {k}: {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        ack.send_modify(|n| *n += 1);
    }
    (conn, seen)
}

/// Over HTTP/2 (prior knowledge): each event is seen before the next is sent.
async fn over_http2(addr: SocketAddr, path: &str, ack: &watch::Sender<usize>) {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}{path}")).body(Empty::<Bytes>::new()).unwrap();
    let mut body = tokio::time::timeout(BOUND, send.send_request(req)).await.unwrap().unwrap().into_body();
    let mut seen = String::new();
    for k in 0..EVENTS {
        while !seen.contains(&event(k)) {
            let frame = tokio::time::timeout(BOUND, body.frame()).await;
            let frame = frame.unwrap_or_else(|_| panic!("h2 {addr}{path}: event {k} not delivered; got {seen:?}"));
            let frame = frame.expect("the stream goes on").unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        ack.send_modify(|n| *n += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_the_upstream_sends_them_on_every_engine_path() {
    let (ack, acked) = watch::channel(0usize);
    let up = upstream(acked).await;
    let env = envelope(&two_engines(""), up).await;
    let (auto, hyper) = (env.addrs[0], env.addrs[1]);
    for path in ["/chunked", "/length"] {
        // The listener's own HTTP/1.1 loop, then hyper's HTTP/1.1, then HTTP/2 on each listener (hyper's).
        over_http1(auto, path, &ack).await;
        over_http1(hyper, path, &ack).await;
        over_http2(auto, path, &ack).await;
        over_http2(hyper, path, &ack).await;
    }
}

/// An upstream whose answers break off after their head: `/broken` sends 10 of its 100 bytes and closes, `/stall`
/// sends 10 and then nothing (until the test ends).
async fn breaking_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Some((head, _)) = read_head(&mut s).await else { return };
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
                if String::from_utf8_lossy(&head).contains("/stall") {
                    // Holds the connection open, sending nothing more, until the proxy gives up on it.
                    let _ = s.read(&mut [0u8; 64]).await;
                }
            });
        }
    });
    addr
}

/// Reads a raw HTTP/1.1 answer to `GET path` until the proxy closes the connection.
async fn truncated(addr: SocketAddr, path: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, conn.read_to_end(&mut got)).await.expect("the proxy ends the answer").unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_breaks_off_after_its_head_is_recorded_as_such_on_both_engines() {
    let up = breaking_upstream().await;
    let env = envelope(&two_engines_with("", "timeout = \"500ms\""), up).await;
    let mut lines = 0;
    for (engine, addr) in ["auto", "hyper"].into_iter().zip(env.addrs.clone()) {
        for (path, outcome) in [("/broken", "upstream_reset"), ("/stall", "timeout")] {
            // The client never gets more than came, and sees the answer end early: the own loop passes on the head
            // and the bytes it has; hyper drops what it had not yet written when the body fails.
            let got = truncated(addr, path).await;
            if !got.is_empty() {
                assert!(got.starts_with("HTTP/1.1 200"), "{engine}{path}: {got:?}");
                assert!(got.ends_with("0123456789"), "{engine}{path}: what came is passed on, nothing more: {got:?}");
            }
            lines += 1;
            let log = env.access_log_lines(lines).await;
            let line = &log[lines - 1];
            assert_eq!(line["route"], engine, "{line}");
            assert_eq!(line["status"], 200, "{engine}{path}: {line}");
            assert_eq!(line["outcome"], outcome, "{engine}{path}: {line}");
            assert!(line["error"].as_str().unwrap().contains("broke off"), "{engine}{path}: {line}");
        }
    }
    let metrics = String::from_utf8(support::send(support::get(env.admin, "/metrics")).await.2.to_vec()).unwrap();
    for engine in ["auto", "hyper"] {
        for outcome in ["upstream_reset", "timeout"] {
            let counted = metrics.lines().any(|l| {
                l.starts_with("envelope_requests_total{")
                    && l.contains(&format!("route=\"{engine}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
                    && l.ends_with(" 1")
            });
            assert!(counted, "{engine}: one request counted as {outcome}:\n{metrics}");
        }
        assert!(
            !metrics.lines().any(|l| l.starts_with("envelope_requests_total{")
                && l.contains(&format!("route=\"{engine}\""))
                && l.contains("outcome=\"ok\"")
                && !l.ends_with(" 0")),
            "{engine}: nothing counted as ok"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_recorded_when_it_ends() {
    let (ack, acked) = watch::channel(0usize);
    let up = upstream(acked).await;
    let env = envelope(&two_engines(""), up).await;
    for (k, addr) in env.addrs.clone().into_iter().enumerate() {
        let (mut conn, mut seen) = over_http1_conn(addr, "/chunked", &ack).await;
        // Read to the end of the answer (its last chunk) before the connection goes.
        let mut chunk = [0u8; 4096];
        while !seen.ends_with("0\r\n\r\n") {
            let n = tokio::time::timeout(BOUND, conn.read(&mut chunk)).await.expect("the answer ends").unwrap();
            assert!(n > 0, "closed before the answer ended: {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
        let log = env.access_log_lines(k + 1).await;
        assert_eq!(log[k]["outcome"], "ok", "{}", log[k]);
        assert_eq!(log[k]["status"], 200, "{}", log[k]);
    }
}

const UPLOAD: usize = 256 * 1024;

/// A request body whose pieces the test sends as it goes.
struct Frames(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|piece| piece.map(|data| Ok(http_body::Frame::data(data))))
    }
}
const FIRST_PART: usize = 192 * 1024;

/// An upstream that reads each request's body to its end (by its `Content-Length` or its last chunk), counting the
/// bytes it has received so far in `received`, then answers `200`.
async fn counting_upstream(received: watch::Sender<usize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let received = received.clone();
            tokio::spawn(async move {
                let Some((head, mut body)) = read_head(&mut s).await else { return };
                let mut chunk = [0u8; 16 * 1024];
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse::<usize>().unwrap());
                loop {
                    received.send_replace(body.len());
                    let done = match length {
                        Some(n) => body.len() >= n,
                        None => body.ends_with(b"0\r\n\r\n"),
                    };
                    if done {
                        break;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            });
        }
    });
    addr
}

/// Waits until the upstream has received more than the replay buffer could hold and more than half the body: it
/// cannot, unless the proxy forwards the body while the client is still sending it.
async fn upstream_has_most_of_it(received: &mut watch::Receiver<usize>, path: &str) {
    let got = tokio::time::timeout(BOUND, received.wait_for(|&n| n >= 128 * 1024)).await.is_ok();
    assert!(got, "{path}: the upstream got {} bytes while the client held back the rest", *received.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_upstream_on_every_engine_path() {
    let (tx, mut received) = watch::channel(0usize);
    let up = counting_upstream(tx.clone()).await;
    let env = envelope(&two_engines(""), up).await;
    let body = vec![b'x'; UPLOAD];
    for (engine, addr) in ["auto", "hyper"].into_iter().zip(env.addrs.clone()) {
        // HTTP/1.1, with a Content-Length: the first part, then the rest only once the upstream has most of it.
        tx.send_replace(0);
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {UPLOAD}\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&body[..FIRST_PART]).await.unwrap();
        upstream_has_most_of_it(&mut received, &format!("{engine} http/1.1")).await;
        conn.write_all(&body[FIRST_PART..]).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(BOUND, conn.read_to_end(&mut answer)).await.unwrap().unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{engine}: {}", String::from_utf8_lossy(&answer));

        // HTTP/2: the same, as DATA frames.
        tx.send_replace(0);
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, h2) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(h2);
        let (frames, channel) = tokio::sync::mpsc::channel::<Bytes>(4);
        let req = http::Request::post(format!("http://{addr}/upload"))
            .header("content-length", UPLOAD)
            .body(Frames(channel))
            .unwrap();
        let answer = tokio::spawn(send.send_request(req));
        for part in body[..FIRST_PART].chunks(16 * 1024) {
            frames.send(Bytes::copy_from_slice(part)).await.unwrap();
        }
        upstream_has_most_of_it(&mut received, &format!("{engine} h2")).await;
        frames.send(Bytes::copy_from_slice(&body[FIRST_PART..])).await.unwrap();
        drop(frames);
        let answer = tokio::time::timeout(BOUND, answer).await.unwrap().unwrap().unwrap();
        assert_eq!(answer.status(), 200, "{engine} h2");
    }
}
