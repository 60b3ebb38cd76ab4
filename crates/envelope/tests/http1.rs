//! HTTP/1.1 on the wire: the listener's own loop for plain requests, and hyper taking over a connection for the
//! rest (HTTP/1.0, chunked bodies) — pipelining, HEAD, `Connection: close`, chunked responses, hand-over midway.

mod support;

use std::time::Duration;

use support::{Action, FaultUpstream, envelope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{upstream}"]

[[route]]
name = "all"
match = { path_prefix = "/" }
upstream = "app"
"#;

/// One response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A raw client connection with its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Conn {
        Conn { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &str) {
        self.stream.write_all(bytes.as_bytes()).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("the proxy answers within 10 s")
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads one response; `head` says the request was a HEAD (no body follows).
    async fn answer(&mut self, head: bool) -> Answer {
        let (len, status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8(h.value.to_vec()).unwrap()))
                    .collect::<Vec<_>>();
                break (n, r.code.unwrap(), headers);
            }
            assert!(self.fill().await, "connection closed before a whole head");
        };
        self.buf.drain(..len);
        let mut answer = Answer { status, headers, body: Vec::new() };
        if head {
            return answer;
        }
        if let Some(n) = answer.header("content-length").map(|v| v.parse::<usize>().unwrap()) {
            while self.buf.len() < n {
                assert!(self.fill().await, "connection closed inside a body");
            }
            answer.body = self.buf.drain(..n).collect();
        } else if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "connection closed inside a chunk size");
                };
                let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16).unwrap();
                while self.buf.len() < line_end + 2 + size + 2 {
                    assert!(self.fill().await, "connection closed inside a chunk");
                }
                answer.body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.buf);
        }
        answer
    }

    /// Whether the proxy closed the connection (reads to the end).
    async fn closed(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut [0u8; 64])).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_each_with_its_own_id() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("GET /one HTTP/1.1\r\nhost: x\r\n\r\nGET /two HTTP/1.1\r\nhost: x\r\n\r\nGET /three HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut ids = Vec::new();
    for path in ["/one", "/two", "/three"] {
        let a = c.answer(false).await;
        assert_eq!(a.status, 200);
        assert_eq!(String::from_utf8_lossy(&a.body), format!("200 from upstream {path}"));
        ids.push(a.header("x-request-id").unwrap().to_owned());
        assert!(a.header("date").is_some(), "a Date header on every response");
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct request ids: {ids:?}");
    for path in ["/one", "/two", "/three"] {
        assert_eq!(up.count("GET", path), 1);
    }
}

#[tokio::test]
async fn a_chunked_request_midway_is_served_and_the_connection_goes_on() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("GET /first HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.status, 200);
    c.send(
        "POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let a = c.answer(false).await;
    assert_eq!(a.status, 200);
    assert_eq!(up.bodies("/upload"), vec![bytes::Bytes::from_static(b"hello world")]);
    // The same connection keeps serving (now through hyper).
    c.send("GET /after HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.status, 200);
    assert_eq!(up.count("GET", "/after"), 1);
}

#[tokio::test]
async fn a_body_sent_after_its_head_is_read_whole() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("PUT /late HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send("hello world").await;
    assert_eq!(c.answer(false).await.status, 200);
    assert_eq!(up.bodies("/late"), vec![bytes::Bytes::from_static(b"hello world")]);
}

#[tokio::test]
async fn http_1_0_is_answered_and_closed() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("GET /old HTTP/1.0\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status, 200);
    assert_eq!(String::from_utf8(a.body).unwrap(), "200 from upstream /old");
    assert!(c.closed().await);
}

#[tokio::test]
async fn the_upstreams_headers_and_one_request_id_reach_the_client_through_either_engine() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    // The upstream echoes a request id of its own: the client sees the envelope's, once.
    let reply = || Action::Respond {
        status: 200,
        delay: Duration::ZERO,
        headers: vec![("x-app", "kept".to_owned()), ("x-request-id", "theirs".to_owned())],
    };
    up.script("/h", [reply(), reply(), reply(), reply()]);
    // The listener's own loop (HTTP/1.1), then hyper (HTTP/1.0): the same answer, hop-by-hop headers aside.
    for request in
        ["GET /h HTTP/1.1\r\nhost: x\r\nx-request-id: id-1\r\n\r\n", "GET /h HTTP/1.0\r\nx-request-id: id-1\r\n\r\n"]
    {
        let mut c = Conn::open(env.addr).await;
        c.send(request).await;
        let a = c.answer(false).await;
        assert_eq!(a.status, 200, "{request}");
        assert_eq!(a.header("x-app"), Some("kept"), "{request}");
        assert_eq!(a.header("x-request-id"), Some("id-1"), "{request}");
        let ids = a.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("x-request-id")).count();
        assert_eq!(ids, 1, "{request}: {:?}", a.headers);
        assert_eq!(a.header("content-length"), Some(a.body.len().to_string().as_str()), "{request}");
        assert!(a.header("date").is_some(), "{request}");
    }
}

#[tokio::test]
async fn the_upstream_gets_the_clients_headers_without_hop_by_hop_ones_and_with_those_the_proxy_sets() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let hostile = "x-forwarded-for: 10.0.0.1\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\n\
                   x-request-id: bad id\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
                   x-app: kept\r\n";
    // The listener's own loop (HTTP/1.1), then hyper (HTTP/1.0): the upstream sees the same.
    for request in
        [format!("GET /fwd HTTP/1.1\r\nhost: x\r\n{hostile}\r\n"), format!("GET /fwd HTTP/1.0\r\n{hostile}\r\n")]
    {
        let mut c = Conn::open(env.addr).await;
        c.send(&request).await;
        let a = c.answer(false).await;
        assert_eq!(a.status, 200);
        let seen = up.headers("/fwd").pop().unwrap();
        let all = |name: &str| seen.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(all("x-forwarded-for"), ["10.0.0.1, 127.0.0.1"], "{request}");
        assert!(all("x-hop").is_empty() && all("keep-alive").is_empty(), "hop-by-hop headers stripped: {seen:?}");
        assert_eq!(all("x-app"), ["kept"]);
        // The invalid id is replaced by the one the client is answered with; the trace is continued.
        assert_eq!(all("x-request-id"), [a.header("x-request-id").unwrap()]);
        assert_ne!(all("x-request-id"), ["bad id"]);
        let traceparent = all("traceparent");
        assert_eq!(traceparent.len(), 1);
        assert!(traceparent[0].starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{traceparent:?}");
        assert!(!traceparent[0].contains("b7ad6b7169203331"), "this hop is the parent: {traceparent:?}");
        assert_eq!(all("host"), [up.addr.to_string()]);
    }
}

#[tokio::test]
async fn head_has_no_body_and_the_connection_stays_usable() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let a = c.answer(true).await;
    assert_eq!(a.status, 200);
    c.send("GET /g HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let b = c.answer(false).await;
    assert_eq!(b.status, 200, "a HEAD's answer carried no body that would be read as the next response");
    assert_eq!(String::from_utf8(b.body).unwrap(), "200 from upstream /g");
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("GET /bye HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn a_body_of_unknown_length_is_relayed_chunked() {
    let up = FaultUpstream::start().await;
    up.script("/stream", [Action::StallBody(Duration::from_millis(50))]);
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("GET /stream HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));
    assert!(a.header("content-length").is_none());
    assert!(a.body.starts_with(b"first part"), "{:?}", String::from_utf8_lossy(&a.body));
    c.send("GET /next HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(c.answer(false).await.status, 200);
}

#[tokio::test]
async fn a_malformed_head_gets_400_from_hyper() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut c = Conn::open(env.addr).await;
    c.send("GET /x HTTP/1.1\r\nbad header line\r\n\r\n").await;
    assert_eq!(c.answer(false).await.status, 400);
    assert_eq!(up.count("GET", "/x"), 0);
}
