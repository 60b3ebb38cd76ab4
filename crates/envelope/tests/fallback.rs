//! Fallbacks per route, end to end through the binary: a static answer or another upstream, only for the reasons
//! the route names, never in place of the upstream's 4xx or for a write without an `Idempotency-Key`, marked for
//! the client, counted, logged, and bounded by the route's deadline.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Action, FaultUpstream, envelope, get, send};

/// Two upstreams: `app` (`{upstream}`) with a breaker that opens after 4 failures, and `replica` (`{replica}`);
/// the route's fallback is `{fallback}` (TOML), its retry two attempts.
fn config(fallback: &str, replica: std::net::SocketAddr) -> String {
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
breaker = {{ window = {{ count = 4 }}, min_calls = 4, failure_rate = 50, open_for = "30s" }}

[[upstream]]
name = "replica"
endpoints = ["http://{replica}"]

[[route]]
name = "api"
match = {{ path_prefix = "/" }}
upstream = "app"
timeout = "2s"
retry = {{ max_attempts = 2, base = "1ms", max_delay = "2ms" }}
fallback = {fallback}
"#
    )
}

const STATIC: &str = r#"{ on = ["circuit_open", "retries_exhausted"], status = 200, body = '{"items":[]}', headers = { "content-type" = "application/json", "cache-control" = "no-store" } }"#;

async fn metric(admin: std::net::SocketAddr, needle: &str) -> f64 {
    let (_, _, body) = send(get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.contains(needle) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn post(addr: std::net::SocketAddr, path: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::post(format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

#[tokio::test]
async fn a_static_answer_takes_over_when_retries_are_exhausted_and_when_the_breaker_is_open() {
    let up = FaultUpstream::start().await;
    up.script("/items", [Action::status(503)]);
    let env = envelope(&config(STATIC, "127.0.0.1:9".parse().unwrap()), up.addr).await;

    // Two failed attempts each: the first two requests open the breaker (4 failures in a window of 4).
    for _ in 0..2 {
        let (status, headers, body) = send(get(env.addr, "/items")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["envelope-fallback"], "retries_exhausted");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["cache-control"], "no-store");
        assert!(headers.contains_key("x-request-id"), "the fallback's answer carries the request id");
        assert_eq!(&body[..], br#"{"items":[]}"#);
    }
    assert_eq!(up.count("GET", "/items"), 4);
    // The breaker is open now: the fallback answers without an attempt.
    let (status, headers, _) = send(get(env.addr, "/items")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["envelope-fallback"], "circuit_open");
    assert_eq!(up.count("GET", "/items"), 4, "no attempt while the breaker is open");

    let log = env.access_log_lines(3).await;
    let reasons: Vec<_> =
        log.iter().map(|l| (l["outcome"].clone(), l["fallback"].clone(), l["attempts"].clone())).collect();
    assert_eq!(
        reasons,
        [
            ("fallback".into(), "retries_exhausted".into(), 2.into()),
            ("fallback".into(), "retries_exhausted".into(), 2.into()),
            ("fallback".into(), "circuit_open".into(), 0.into()),
        ]
    );
    assert_eq!(metric(env.admin, r#"envelope_fallbacks_total{route="api",reason="retries_exhausted"}"#).await, 2.0);
    assert_eq!(metric(env.admin, r#"envelope_fallbacks_total{route="api",reason="circuit_open"}"#).await, 1.0);
    assert_eq!(metric(env.admin, r#"outcome="fallback",code="2xx""#).await, 3.0);
}

#[tokio::test]
async fn another_upstream_answers_and_a_failing_one_leaves_the_original_error() {
    let up = FaultUpstream::start().await;
    let replica = FaultUpstream::start().await;
    up.script("/model", [Action::status(502)]);
    replica.script("/model", [Action::with_header(200, "x-served-by", "replica")]);
    let env = envelope(&config(r#"{ on = ["retries_exhausted"], upstream = "replica" }"#, replica.addr), up.addr).await;

    let (status, headers, _) = send(get(env.addr, "/model")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "replica");
    assert_eq!(headers["envelope-fallback"], "retries_exhausted");
    assert_eq!((up.count("GET", "/model"), replica.count("GET", "/model")), (2, 1));
    // The replica gets the same request: the same request id as the primary's attempts.
    assert_eq!(replica.request_ids("/model"), up.request_ids("/model")[..1]);
    let log = env.access_log_lines(1).await;
    assert_eq!(log[0]["attempts"], 3, "two to the primary, one to the replica");
    assert_eq!(log[0]["upstream_status"], 200);
    assert_eq!(metric(env.admin, r#"envelope_upstream_attempts_total{route="api",upstream="replica"}"#).await, 1.0);

    // The replica fails too: the client gets the primary's own answer, and the failed fallback is counted.
    replica.script("/model", [Action::status(500)]);
    let (status, headers, _) = send(get(env.addr, "/model")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "the primary's 502, not the replica's 500");
    assert!(!headers.contains_key("envelope-fallback"));
    assert_eq!(
        metric(env.admin, r#"envelope_fallback_failures_total{route="api",reason="retries_exhausted"}"#).await,
        1.0
    );
    let log = env.access_log_lines(2).await;
    assert_eq!(log[1]["outcome"], "upstream_5xx");
    assert!(log[1].get("fallback").is_none());
}

#[tokio::test]
async fn the_upstreams_4xx_and_unnamed_reasons_are_passed_on() {
    let up = FaultUpstream::start().await;
    up.script("/missing", [Action::status(404)]);
    up.script("/throttled", [Action::with_header(429, "retry-after", "1")]);
    let replica = FaultUpstream::start().await;
    replica.script("/", [Action::status(200)]);
    let fallback = r#"{ on = ["circuit_open", "timeout"], upstream = "replica" }"#;
    let env = envelope(&config(fallback, replica.addr), up.addr).await;

    assert_eq!(send(get(env.addr, "/missing")).await.0, StatusCode::NOT_FOUND);
    let (status, headers, _) = send(get(env.addr, "/throttled")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the upstream's 429 is its word to the client");
    assert!(!headers.contains_key("envelope-fallback"));
    // A 5xx is `retries_exhausted`, which this route does not name.
    up.script("/broken", [Action::status(503)]);
    assert_eq!(send(get(env.addr, "/broken")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(replica.count("GET", "/missing") + replica.count("GET", "/throttled"), 0);
    assert_eq!(replica.count("GET", "/broken"), 0);
}

#[tokio::test]
async fn a_write_falls_back_only_with_an_idempotency_key() {
    let up = FaultUpstream::start().await;
    up.script("/orders", [Action::status(503)]);
    let env = envelope(&config(STATIC, "127.0.0.1:9".parse().unwrap()), up.addr).await;

    let (status, headers, _) = send(post(env.addr, "/orders", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "a write the upstream may have done is not answered for");
    assert!(!headers.contains_key("envelope-fallback"));
    let (status, headers, _) = send(post(env.addr, "/orders", Some("k-1"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["envelope-fallback"], "retries_exhausted");
}

#[tokio::test]
async fn a_slow_fallback_is_cut_off_by_the_routes_deadline() {
    let up = FaultUpstream::start().await;
    let replica = FaultUpstream::start().await;
    up.script("/slow", [Action::status(503)]);
    replica.script("/slow", [Action::delayed(200, Duration::from_secs(10))]);
    let config = config(r#"{ on = ["retries_exhausted"], upstream = "replica" }"#, replica.addr)
        .replace("timeout = \"2s\"", "timeout = \"400ms\"");
    let env = envelope(&config, up.addr).await;

    let started = Instant::now();
    let (status, _, _) = send(get(env.addr, "/slow")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the original error");
    assert!(started.elapsed() < Duration::from_secs(5), "within the deadline, not the replica's 10 s");
    let log = env.access_log_lines(1).await;
    assert_eq!(log[0]["outcome"], "upstream_5xx");
    assert!(log[0]["duration_ms"].as_f64().unwrap() < 1000.0, "{}", log[0]);
}

#[tokio::test]
async fn a_static_body_can_come_from_a_file() {
    let up = FaultUpstream::start().await;
    let dir = support::TempDir::new();
    std::fs::write(dir.0.join("degraded.html"), "<p>We are back soon.</p>").unwrap();
    let fallback = format!(
        r#"{{ on = ["circuit_open", "retries_exhausted"], status = 503, body_file = "{}", headers = {{ "content-type" = "text/html", "retry-after" = "30" }} }}"#,
        dir.0.join("degraded.html").display()
    );
    up.script("/page", [Action::status(500)]);
    let env = envelope(&config(&fallback, "127.0.0.1:9".parse().unwrap()), up.addr).await;
    let (status, headers, body) = send(get(env.addr, "/page")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(headers["envelope-fallback"], "retries_exhausted");
    assert_eq!(&body[..], b"<p>We are back soon.</p>");
}
