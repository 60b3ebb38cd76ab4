//! Hedging per route, end to end through the binary: a slow attempt gets a second one after a fixed delay or the
//! route's learnt latency percentile; the first answer wins and the loser is cancelled upstream; only requests that
//! may be sent twice are hedged; hedges are counted.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Action, FaultUpstream, envelope, get, send};

fn config(hedge: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{{upstream}}"]

[[route]]
name = "api"
match = {{ path_prefix = "/" }}
upstream = "app"
timeout = "10s"
hedge = {hedge}
"#
    )
}

async fn metric(admin: std::net::SocketAddr, needle: &str) -> f64 {
    let (_, _, body) = send(get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.contains(needle) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until the upstream has seen `n` requests cancelled.
async fn cancelled(up: &FaultUpstream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.cancelled() < n {
        assert!(Instant::now() < deadline, "{n} cancelled upstream within 5 s, saw {}", up.cancelled());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_slow_attempt_is_hedged_after_the_delay_and_the_loser_is_cancelled_upstream() {
    // Two endpoints, taken in turn: the first attempt goes to the stalling one, the hedge to the other, whichever
    // reaches its server first.
    let (slow, fast) = (FaultUpstream::start().await, FaultUpstream::start().await);
    slow.script("/search", [Action::delayed(200, Duration::from_secs(8))]);
    fast.script("/search", [Action::with_header(200, "x-attempt", "2")]);
    let two = config(r#"{ delay = "50ms" }"#)
        .replace("\"http://{upstream}\"", &format!("\"http://{{upstream}}\", \"http://{}\"", fast.addr));
    let env = envelope(&two, slow.addr).await;

    let started = Instant::now();
    let (status, headers, body) = send(get(env.addr, "/search")).await;
    let seen = format!(
        "{status} {headers:?} {:?} after {:?}; the endpoints saw {} and {} requests; sidecar: {:?}",
        String::from_utf8_lossy(&body),
        started.elapsed(),
        slow.count("GET", "/search"),
        fast.count("GET", "/search"),
        env.errors.lock().unwrap()
    );
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(headers.get("x-attempt").map(|v| v.as_bytes()), Some(&b"2"[..]), "the hedge answered: {seen}");
    assert!(started.elapsed() < Duration::from_secs(4), "not the first attempt's 8 s: {seen}");
    assert_eq!((slow.count("GET", "/search"), fast.count("GET", "/search")), (1, 1));
    cancelled(&slow, 1).await;
    assert_eq!(metric(env.admin, r#"envelope_hedges_total{route="api"}"#).await, 1.0);
    let log = env.access_log_lines(1).await;
    assert_eq!((log[0]["attempts"].as_u64(), log[0]["outcome"].as_str()), (Some(2), Some("ok")));
    // Both attempts carried the request's id.
    let ids = [slow.request_ids("/search"), fast.request_ids("/search")];
    assert_eq!((ids[0].len(), ids[1].len()), (1, 1));
    assert_eq!(ids[0][0], ids[1][0]);
}

#[tokio::test]
async fn a_write_without_an_idempotency_key_is_hedged_only_on_a_route_that_says_it_may_be() {
    let up = FaultUpstream::start().await;
    up.script("/orders", [Action::delayed(201, Duration::from_millis(300))]);
    let env = envelope(&config(r#"{ delay = "20ms", max_extra = 2 }"#), up.addr).await;

    let post = |key: Option<&str>| {
        let mut req = Request::post(format!("http://{}/orders", env.addr));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };
    assert_eq!(send(post(None)).await.0, StatusCode::CREATED);
    assert_eq!(up.count("POST", "/orders"), 1);
    assert_eq!(metric(env.admin, "envelope_hedges_total").await, 0.0);
    // With a key, it may be sent again: two hedges 20 ms apart, all three answer after 300 ms, the first wins.
    assert_eq!(send(post(Some("k-7"))).await.0, StatusCode::CREATED);
    assert_eq!(up.count("POST", "/orders"), 4);
    assert_eq!(up.bodies("/orders").iter().filter(|b| &b[..] == b"{}").count(), 4, "the same body every time");
    assert_eq!(metric(env.admin, r#"envelope_hedges_total{route="api"}"#).await, 2.0);
    drop(env);

    // A route that says its requests may all be sent twice (a search by POST, say) hedges them without a key.
    let config = config(r#"{ delay = "20ms", max_extra = 2 }"#).replace("hedge =", "idempotent = true\nhedge =");
    let env = envelope(&config, up.addr).await;
    let before = up.count("POST", "/orders");
    let req = Request::post(format!("http://{}/orders", env.addr)).body(Full::new(Bytes::from_static(b"{}")));
    assert_eq!(send(req.unwrap()).await.0, StatusCode::CREATED);
    assert_eq!(up.count("POST", "/orders") - before, 3);
    assert_eq!(metric(env.admin, r#"envelope_hedges_total{route="api"}"#).await, 2.0);
}

#[tokio::test]
async fn a_percentile_hedge_learns_the_routes_latency_then_hedges_the_slow_tail() {
    let up = FaultUpstream::start().await;
    let mut script = vec![Action::status(200); 20];
    script.push(Action::delayed(200, Duration::from_secs(8)));
    script.push(Action::with_header(200, "x-attempt", "hedge"));
    up.script("/q", script);
    let env = envelope(&config(r#"{ delay = "p95" }"#), up.addr).await;

    // It learns from the first 20 answers (none is hedged meanwhile).
    for _ in 0..20 {
        assert_eq!(send(get(env.addr, "/q")).await.0, StatusCode::OK);
    }
    assert_eq!(up.count("GET", "/q"), 20);
    assert_eq!(metric(env.admin, "envelope_hedges_total").await, 0.0);
    // The 21st stalls: hedged after the learnt p95 (a few milliseconds on loopback), not after 8 s.
    let started = Instant::now();
    let (status, headers, _) = send(get(env.addr, "/q")).await;
    assert_eq!((status, &headers["x-attempt"]), (StatusCode::OK, &"hedge".parse::<http::HeaderValue>().unwrap()));
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(metric(env.admin, r#"envelope_hedges_total{route="api"}"#).await, 1.0);
    cancelled(&up, 1).await;
}
