//! What `check` accepts, `run` can serve: configs made of arbitrary values (durations up to and past the maximum,
//! sizes at and past their bounds, any endpoint port, retry, breaker, bulkhead and rate-limit settings) either fail
//! to parse with an error, or start a sidecar that answers a request — with any status, but an answer: a panic on
//! the request path would leave the connection without one.

use std::net::SocketAddr;
use std::time::Duration;

use envelope_sidecar::Sidecar;
use envelope_sidecar::config::Config;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A duration as written in the config: mostly small, sometimes long (up to the maximum), rarely past it.
fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => (1u64..5_000, prop::sample::select(vec!["us", "ms", "s"])).prop_map(|(n, u)| format!("{n}{u}")),
        4 => (1u64..365, prop::sample::select(vec!["h", "d"])).prop_map(|(n, u)| format!("{n}{u}")),
        2 => Just("365d".to_owned()),
        1 => Just(format!("{}s", u64::MAX)),
    ]
}

/// A size within `min..=max` mostly, at its ends sometimes, rarely past them.
fn size(min: u64, max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![20 => min..=max, 2 => Just(min), 2 => Just(max), 1 => Just(max + 1), 1 => Just(u64::MAX >> 1)]
}

#[derive(Debug, Clone)]
struct Values {
    timeout: String,
    attempt_timeout: String,
    base: String,
    max_delay: String,
    attempts: u32,
    open_for: String,
    min_calls: u32,
    bulkhead: u32,
    queue_timeout: String,
    rate: u32,
    per: String,
    header_read: String,
    keepalive: String,
    header_bytes: u64,
    headers: u64,
    uri_bytes: u64,
    body_bytes: u64,
    replay: u64,
    connections: u64,
    port: u32,
}

fn values() -> impl Strategy<Value = Values> {
    (
        // The retry's max_delay: the base itself, or the longest (check refuses one shorter than the base).
        (duration(), duration(), duration(), any::<bool>(), 1u32..20, duration(), 1u32..=20),
        (1u32..100, duration(), 1u32..1000, duration(), duration(), duration()),
        (
            size(8192, 1 << 20),
            size(1, 1000),
            size(1, 1 << 20),
            size(0, 1 << 40),
            size(0, 64 << 20),
            size(1, 1_000_000),
            prop_oneof![20 => 1u32..65_536, 1 => 65_536u32..70_000, 1 => Just(0u32)],
        ),
    )
        .prop_map(|(a, b, c)| Values {
            timeout: a.0,
            attempt_timeout: a.1,
            max_delay: if a.3 { a.2.clone() } else { "365d".to_owned() },
            base: a.2,
            attempts: a.4,
            open_for: a.5,
            min_calls: a.6,
            bulkhead: b.0,
            queue_timeout: b.1,
            rate: b.2,
            per: b.3,
            header_read: b.4,
            keepalive: b.5,
            header_bytes: c.0,
            headers: c.1,
            uri_bytes: c.2,
            body_bytes: c.3,
            replay: c.4,
            connections: c.5,
            port: c.6,
        })
}

fn config(v: &Values, upstream: SocketAddr) -> String {
    // The real upstream (which answers at once: a request waits for no backoff a long duration could set), or a
    // port out of range, which check must refuse.
    let port = if v.port == 0 || v.port > 65_535 { v.port } else { upstream.port().into() };
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[history]
path = ":memory:"

[[listener]]
name = "in"
listen = "127.0.0.1:0"
header_read_timeout = "{header_read}"
keepalive_timeout = "{keepalive}"
max_header_bytes = {header_bytes}
max_headers = {headers}
max_uri_bytes = {uri_bytes}
max_body_bytes = {body_bytes}
max_connections = {connections}
access_log = false

[[upstream]]
name = "app"
endpoints = ["http://127.0.0.1:{port}"]
bulkhead = {{ max_concurrent = {bulkhead}, queue = 2, queue_timeout = "{queue_timeout}" }}
breaker = {{ window = {{ count = 20 }}, min_calls = {min_calls}, failure_rate = 50, open_for = "{open_for}" }}
rate_limit = {{ rate = {rate}, per = "{per}" }}

[[route]]
name = "api"
match = {{ path_prefix = "/" }}
upstream = "app"
timeout = "{timeout}"
attempt_timeout = "{attempt_timeout}"
retry = {{ max_attempts = {attempts}, base = "{base}", max_delay = "{max_delay}" }}
replay_limit = {replay}
"#,
        header_read = v.header_read,
        keepalive = v.keepalive,
        header_bytes = v.header_bytes,
        headers = v.headers,
        uri_bytes = v.uri_bytes,
        body_bytes = v.body_bytes,
        connections = v.connections,
        bulkhead = v.bulkhead,
        queue_timeout = v.queue_timeout,
        min_calls = v.min_calls,
        open_for = v.open_for,
        rate = v.rate,
        per = v.per,
        timeout = v.timeout,
        attempt_timeout = v.attempt_timeout,
        attempts = v.attempts,
        base = v.base,
        max_delay = v.max_delay,
        replay = v.replay,
    )
}

/// An upstream answering every request with 200, quickly.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The status line of the answer to one POST with a small body, within 10 s; `None` without an answer.
async fn status_line(addr: SocketAddr) -> Option<String> {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello").await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        Some(text.lines().next().unwrap_or_default().to_owned())
    };
    // The route's own deadline may be long: an answer or the deadline's 504 come within 10 s in any case, since
    // the request is either served at once or refused.
    tokio::time::timeout(Duration::from_secs(10), exchange).await.ok().flatten()
}

#[test]
fn any_config_that_check_accepts_answers_a_request() {
    // Random configs, about a third of which `check` accepts: up to 256 are drawn and the first 24 accepted are
    // served (the rest return at once), so the run explores new configs each time and still serves enough of them
    // (fewer than 16 accepted of 256 is vanishingly unlikely).
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 256, ..ProptestConfig::default() });
    let served = std::cell::Cell::new(0);
    let result = runner.run(&values(), |v| {
        if served.get() >= 24 {
            return Ok(());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let up = upstream().await;
            let text = config(&v, up);
            let Ok(config) = Config::parse("any.toml", &text) else { return Ok(()) };
            let sidecar = Sidecar::start(config).await.expect("what check accepts can start");
            let line = status_line(sidecar.addrs()[0]).await;
            sidecar.shutdown().await;
            prop_assert!(line.as_deref().is_some_and(|l| l.starts_with("HTTP/1.1 ")), "no answer for {text}: {line:?}");
            served.set(served.get() + 1);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(served.get() >= 16, "enough accepted configs were served to mean something: {}", served.get());
}
