//! Protection of the upstream and of the sidecar itself: bulkhead, shedding, input limits, slowloris, drain.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Action, FaultUpstream, envelope, get, send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"
max_concurrent = 4
header_read_timeout = "500ms"
max_body_bytes = 1000
drain_timeout = "10s"

[[upstream]]
name = "app"
endpoints = ["http://{upstream}"]
bulkhead = { max_concurrent = 2 }

[[upstream]]
name = "open"
endpoints = ["http://{upstream}"]

[[route]]
name = "guarded"
match = { path_prefix = "/guarded" }
upstream = "app"

[[route]]
name = "busy"
match = { path_prefix = "/busy" }
upstream = "open"
tier = "critical"
"#;

async fn concurrently(n: usize, addr: std::net::SocketAddr, path: &'static str) -> Vec<(StatusCode, http::HeaderMap)> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(async move { send(get(addr, path)).await })).collect();
    let mut out = Vec::new();
    for t in tasks {
        let (status, headers, _) = t.await.unwrap();
        out.push((status, headers));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bulkhead_lets_exactly_its_limit_through() {
    let up = FaultUpstream::start().await;
    up.script("/guarded/x", [Action::delayed(200, Duration::from_millis(600))]);
    let env = envelope(CONFIG, up.addr).await;
    let answers = concurrently(4, env.addr, "/guarded/x").await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let full = answers.iter().filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE).count();
    assert_eq!((ok, full), (2, 2), "{answers:?}");
    assert_eq!(up.count("GET", "/guarded/x"), 2, "exactly the limit reached the upstream");
    assert!(
        answers
            .iter()
            .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
            .all(|(_, h)| h.contains_key("retry-after"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_listener_limit_requests_are_shed_with_429() {
    let up = FaultUpstream::start().await;
    up.script("/busy/x", [Action::delayed(200, Duration::from_millis(600))]);
    let env = envelope(CONFIG, up.addr).await;
    let answers = concurrently(7, env.addr, "/busy/x").await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let shed: Vec<_> = answers.iter().filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(ok, 4, "the listener admits 4 at a time: {answers:?}");
    assert_eq!(shed.len(), 3);
    assert!(shed.iter().all(|(_, h)| (1..=3).contains(&h["retry-after"].to_str().unwrap().parse::<u64>().unwrap())));
    assert_eq!(up.count("GET", "/busy/x"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_with_the_right_status() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let long = format!("/busy/{}", "a".repeat(9000));
    assert_eq!(send(get(env.addr, &long)).await.0, StatusCode::URI_TOO_LONG);

    let body = Request::post(format!("http://{}/busy/upload", env.addr))
        .body(Full::new(Bytes::from(vec![0u8; 5000])))
        .unwrap();
    assert_eq!(send(body).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(up.count("POST", "/busy/upload"), 0, "nothing reached the upstream");

    let mut big_headers = get(env.addr, "/busy/h");
    big_headers.headers_mut().insert("x-big", "b".repeat(20_000).parse().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), support::client().request(big_headers))
        .await
        .unwrap()
        .map(|r| r.status());
    assert_eq!(status.ok(), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));

    let mut many = get(env.addr, "/busy/h");
    for i in 0..150 {
        many.headers_mut()
            .insert(http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(), "1".parse().unwrap());
    }
    let status = tokio::time::timeout(Duration::from_secs(10), support::client().request(many))
        .await
        .unwrap()
        .map(|r| r.status());
    assert_eq!(status.ok(), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE), "more than 100 headers");
    assert_eq!(up.count("GET", "/busy/h"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_after_the_header_read_timeout() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut conn = TcpStream::connect(env.addr).await.unwrap();
    conn.write_all(b"GET /busy/slow HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The sidecar must close the connection (after answering 408 or not) well before our 10 s bound.
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the sidecar");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "answered 408 before closing: {text:?}");
    assert_eq!(up.count("GET", "/busy/slow"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let up = FaultUpstream::start().await;
    up.script("/busy/long", [Action::delayed(200, Duration::from_millis(800))]);
    let mut env = envelope(CONFIG, up.addr).await;
    let addr = env.addr;
    let in_flight: Vec<_> =
        (0..3).map(|_| tokio::spawn(async move { send(get(addr, "/busy/long")).await.0 })).collect();
    // All three at the upstream (bounded poll), then SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.count("GET", "/busy/long") < 3 {
        assert!(Instant::now() < deadline, "the requests reach the upstream");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = env.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Not ready once draining, while the requests are still in flight (they take 800 ms).
    while send(get(env.admin, "/readyz")).await.0 != StatusCode::SERVICE_UNAVAILABLE {
        assert!(Instant::now() < deadline, "readiness turns 503 once draining");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in in_flight {
        assert_eq!(t.await.unwrap(), StatusCode::OK, "no in-flight request dropped");
    }
    let status = tokio::time::timeout(Duration::from_secs(15), env.child.wait()).await.expect("exits").unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_never_wait_for_an_access_log_nobody_reads() {
    let up = FaultUpstream::start().await;
    let env = support::envelope_with_stdout_unread(CONFIG, up.addr).await;
    // Far more lines than the pipe and the log's queue hold: with a blocking write, the workers would stop here.
    let client = support::client();
    for i in 0..1600 {
        let req = get(env.addr, "/busy/log");
        let answer = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
        let status = answer.unwrap_or_else(|_| panic!("request {i} answered in time")).unwrap().status();
        assert_eq!(status, StatusCode::OK, "request {i}");
    }
    let metrics = send(get(env.admin, "/metrics")).await.2;
    let text = String::from_utf8_lossy(&metrics);
    let dropped: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("envelope_access_log_dropped_total "))
        .expect("the dropped-lines counter is exported")
        .parse()
        .unwrap();
    assert!(dropped >= 1.0, "lines that could not be written are counted: {dropped}");
}
