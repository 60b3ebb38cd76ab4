//! End-to-end behaviour of the real `envelope` binary against a misbehaving upstream, over 127.0.0.1.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Action, FaultUpstream, envelope, get, send};

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 10 }, min_calls = 10, failure_rate = 50, open_for = "2s", half_open_calls = 2 }

[[route]]
name = "api"
match = { path_prefix = "/api" }
upstream = "app"
timeout = "5s"
attempt_timeout = "300ms"
retry = { max_attempts = 3, base = "10ms", max_delay = "2s" }
replay_limit = 64

[[route]]
name = "slow"
match = { path_prefix = "/slow" }
upstream = "app"
timeout = "200ms"
"#;

/// Waits (bounded) until the admin API says the `app` breaker's open time is over: the next call is a probe.
async fn open_time_over(env: &support::Envelope) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = send(get(env.admin, "/api/v1/breakers")).await.2;
        let breakers: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let app = breakers.as_array().unwrap().iter().find(|b| b["upstream"] == "app").cloned().unwrap();
        if app["remaining_open_ms"].as_u64().unwrap_or(0) == 0 {
            // Whole milliseconds: up to one may still be left.
            tokio::time::sleep(Duration::from_millis(2)).await;
            return;
        }
        assert!(Instant::now() < deadline, "the breaker's open time ends: {app}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn post(addr: std::net::SocketAddr, path: &str, body: &'static [u8], key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{addr}{path}"));
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(body))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exactly_max_attempts_and_returns_the_last_answer() {
    let up = FaultUpstream::start().await;
    up.script("/api/flaky", [Action::status(503)]);
    let env = envelope(CONFIG, up.addr).await;
    let (status, headers, _) = send(get(env.addr, "/api/flaky")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the upstream's own last answer");
    assert_eq!(up.count("GET", "/api/flaky"), 3);
    let ids = up.request_ids("/api/flaky");
    assert!(ids.iter().all(|i| i == &ids[0]) && !ids[0].is_empty(), "one request id across retries: {ids:?}");
    assert_eq!(headers["x-request-id"], ids[0].as_str(), "and it is echoed");

    up.script("/api/recovers", [Action::status(502), Action::status(200)]);
    let (status, _, body) = send(get(env.addr, "/api/recovers")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"200 from upstream /api/recovers");
    assert_eq!(up.count("GET", "/api/recovers"), 2);

    // 501 and 505 are permanent: the same request would meet them again, so they are answered after one attempt.
    for status in [501u16, 505] {
        let path = format!("/api/permanent-{status}");
        up.script(&path, [Action::status(status)]);
        let (answered, _, _) = send(get(env.addr, &path)).await;
        assert_eq!(answered.as_u16(), status);
        assert_eq!(up.count("GET", &path), 1, "{status} is not retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_without_key_is_sent_once_and_with_key_replays_the_same_body() {
    let up = FaultUpstream::start().await;
    up.script("/api/orders", [Action::status(503)]);
    let env = envelope(CONFIG, up.addr).await;
    let (status, _, _) = send(post(env.addr, "/api/orders", b"{\"sku\":1}", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.count("POST", "/api/orders"), 1, "a POST without an idempotency key is never repeated");

    up.script("/api/keyed", [Action::status(503)]);
    send(post(env.addr, "/api/keyed", b"{\"sku\":2}", Some("order-7"))).await;
    assert_eq!(up.count("POST", "/api/keyed"), 3);
    let bodies = up.bodies("/api/keyed");
    assert!(bodies.iter().all(|b| &b[..] == b"{\"sku\":2}"), "identical body on every attempt: {bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_replay_limit_is_forwarded_once_and_whole() {
    let up = FaultUpstream::start().await;
    up.script("/api/upload", [Action::status(503)]);
    let env = envelope(CONFIG, up.addr).await;
    let big: &'static [u8] = &[b'x'; 200];
    send(post(env.addr, "/api/upload", big, Some("upload-1"))).await;
    assert_eq!(up.count("POST", "/api/upload"), 1, "not retried: the body is over the 64-byte replay limit");
    assert_eq!(up.bodies("/api/upload")[0].len(), 200, "but forwarded whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_too_long_is_not_waited_for() {
    let up = FaultUpstream::start().await;
    up.script("/api/throttled", [Action::with_header(429, "retry-after", "1"), Action::status(200)]);
    let env = envelope(CONFIG, up.addr).await;
    let started = Instant::now();
    let (status, _, _) = send(get(env.addr, "/api/throttled")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(950), "waited the server's 1 s: {:?}", started.elapsed());

    up.script("/api/busy", [Action::with_header(503, "retry-after", "30")]);
    let started = Instant::now();
    let (status, _, _) = send(get(env.addr, "/api/busy")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.count("GET", "/api/busy"), 1, "30 s is over the 2 s max delay: no retry");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504_and_the_upstream_sees_the_cancel() {
    let up = FaultUpstream::start().await;
    up.script("/slow/report", [Action::delayed(200, Duration::from_secs(3))]);
    let env = envelope(CONFIG, up.addr).await;
    let started = Instant::now();
    let (status, headers, body) = send(get(env.addr, "/slow/report")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2), "answered at the deadline, not after the upstream");
    assert_eq!(headers["content-type"], "application/problem+json");
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["outcome"], "timeout");
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.cancelled() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.cancelled(), 1, "the timed-out request was cancelled at the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_trips_fast_fails_probes_and_recovers() {
    let up = FaultUpstream::start().await;
    up.script("/api/down", [Action::status(500)]);
    let env = envelope(CONFIG, up.addr).await;
    // 4 requests x 3 attempts = 12 failed calls: the window of 10 at 50 % opens the breaker.
    for _ in 0..4 {
        send(get(env.addr, "/api/down")).await;
    }
    let hits = up.count("GET", "/api/down");
    assert!((10..=12).contains(&hits), "{hits}");
    let started = Instant::now();
    let (status, headers, body) = send(get(env.addr, "/api/down")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_millis(500), "fast fail");
    assert!(headers.contains_key("retry-after"));
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["outcome"], "circuit_open");
    assert_eq!(up.count("GET", "/api/down"), hits, "the upstream was not touched while open");

    // After the open duration, probes go through; healthy answers close the breaker.
    up.script("/api/down", [Action::status(200)]);
    open_time_over(&env).await;
    for _ in 0..3 {
        let (status, _, _) = send(get(env.addr, "/api/down")).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_or_replaced_and_every_log_line_is_one_json_object() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut req = get(env.addr, "/api/ids");
    req.headers_mut().insert("x-request-id", "client-42".parse().unwrap());
    req.headers_mut().insert("authorization", "Bearer top-secret-token".parse().unwrap());
    req.headers_mut().insert("cookie", "session=secret-session-cookie".parse().unwrap());
    let (_, headers, _) = send(req).await;
    assert_eq!(headers["x-request-id"], "client-42");

    for hostile in ["a\"b", "{\"injected\":true}", "x y", &"z".repeat(200)] {
        let mut req = get(env.addr, "/api/ids");
        req.headers_mut().insert("x-request-id", hostile.parse().unwrap());
        let (_, headers, _) = send(req).await;
        let echoed = headers["x-request-id"].to_str().unwrap();
        assert_ne!(echoed, hostile);
        assert_eq!(echoed.len(), 36, "replaced by a generated id");
    }
    let (status, _, _) = send(get(env.addr, "/nowhere")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let log = env.access_log_lines(6).await;
    assert_eq!(log.len(), 6, "one line per request");
    for line in &log {
        for field in
            ["request_id", "route", "method", "status", "upstream_status", "attempts", "duration_ms", "outcome"]
        {
            assert!(line.get(field).is_some(), "{field} in {line}");
        }
        assert!(line["request_id"].as_str().unwrap().len() <= 128);
    }
    assert_eq!(log[0]["request_id"], "client-42");
    let raw = env.log.lock().unwrap().join("\n");
    assert!(!raw.contains("top-secret-token") && !raw.contains("secret-session-cookie"), "secrets never logged");
    assert_eq!(log[5]["status"], 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_too() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let resp =
        tokio::time::timeout(Duration::from_secs(10), h2.request(get(env.addr, "/api/h2"))).await.unwrap().unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(up.count("GET", "/api/h2"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_exactly_the_configured_probes() {
    let up = FaultUpstream::start().await;
    up.script("/api/probe", [Action::status(500)]);
    let env = envelope(CONFIG, up.addr).await;
    for _ in 0..4 {
        send(get(env.addr, "/api/probe")).await;
    }
    assert_eq!(send(get(env.addr, "/api/probe")).await.0, StatusCode::SERVICE_UNAVAILABLE, "open");
    // Slow, healthy probes: while the 2 admitted probes are out, every other request is rejected at once.
    up.script("/api/probe", [Action::delayed(200, Duration::from_millis(250))]);
    open_time_over(&env).await;
    let before = up.count("GET", "/api/probe");
    let addr = env.addr;
    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(async move { send(get(addr, "/api/probe")).await.0 })).collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 2, "exactly half_open_calls = 2 probes admitted: {statuses:?}");
    assert_eq!(up.count("GET", "/api/probe") - before, 2, "and only they reached the upstream");
    assert_eq!(send(get(env.addr, "/api/probe")).await.0, StatusCode::OK, "two healthy probes closed the breaker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_path_templates_and_methods() {
    let up = FaultUpstream::start().await;
    let config = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{upstream}"]

[[route]]
name = "user-orders"
match = { path = "/users/{id}/orders", methods = ["GET"] }
upstream = "app"

[[route]]
name = "files"
match = { path = "/files/{*path}" }
upstream = "app"
"#;
    let env = envelope(config, up.addr).await;
    assert_eq!(send(get(env.addr, "/users/7/orders")).await.0, StatusCode::OK);
    assert_eq!(send(get(env.addr, "/users/7/profile")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(send(post(env.addr, "/users/7/orders", b"{}", None)).await.0, StatusCode::NOT_FOUND, "GET only");
    assert_eq!(send(get(env.addr, "/files/a/b/c.txt")).await.0, StatusCode::OK);
    assert_eq!(up.count("GET", "/users/7/orders"), 1);
    assert_eq!(up.count("GET", "/files/a/b/c.txt"), 1);
    let routes: Vec<_> = env.access_log_lines(4).await.iter().map(|l| l["route"].clone()).collect();
    assert_eq!(routes[0], "user-orders", "the route name, not the raw path, labels the request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_covers_a_stalled_response_body() {
    let up = FaultUpstream::start().await;
    up.script("/slow/body", [Action::StallBody(Duration::from_secs(5))]);
    let env = envelope(CONFIG, up.addr).await;
    let started = Instant::now();
    let resp = support::client().request(get(env.addr, "/slow/body")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the head arrived in time");
    let body = tokio::time::timeout(Duration::from_secs(3), http_body_util::BodyExt::collect(resp.into_body())).await;
    assert!(
        body.expect("cut off well before the upstream's 5 s stall").is_err(),
        "the body was cut off, not completed"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_continued_or_started_and_logged() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let mut req = get(env.addr, "/api/traced");
    req.headers_mut().insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
    send(req).await;
    send(get(env.addr, "/api/traced")).await;
    let seen = up.traceparents("/api/traced");
    assert!(seen[0].starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "same trace: {seen:?}");
    assert!(!seen[0].contains("00f067aa0ba902b7"), "the sidecar's own span is the upstream's parent");
    assert_eq!(seen[1].len(), 55, "a trace is started when none came in: {seen:?}");
    let log = env.access_log_lines(2).await;
    assert_eq!(log[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(log[1]["trace_id"].as_str().unwrap(), &seen[1][3..35]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_explained_to_the_client_in_stable_words_and_in_full_in_the_log() {
    // Nothing listens there: every attempt is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let env = envelope(CONFIG, closed).await;
    let (status, _, body) = send(get(env.addr, "/api/gone")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["detail"], "route `api`: the upstream could not be reached", "no OS error text, no address");
    assert_eq!(doc["status"], 502);
    let line = env.access_log_lines(1).await.remove(0);
    let error = line["error"].as_str().expect("the cause is logged");
    assert!(error.contains("refused"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_that_breaks_after_the_request_left_is_an_upstream_reset_not_a_connect_error() {
    let up = FaultUpstream::start().await;
    up.script("/api/reset", [Action::ResetAfterBody]);
    let env = envelope(CONFIG, up.addr).await;
    // A POST without a key: sent once (it left), answered 502 with its own outcome.
    let (status, _, body) = send(post(env.addr, "/api/reset", b"{}", None)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["outcome"], "upstream_reset");
    assert_eq!(up.count("POST", "/api/reset"), 1, "not retried: it may have been processed");
    // A GET is safe to send again: retried up to the route's attempts.
    let (status, _, _) = send(get(env.addr, "/api/reset")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(up.count("GET", "/api/reset"), 3);
    let log = env.access_log_lines(2).await;
    assert!(log.iter().all(|l| l["outcome"] == "upstream_reset"), "{log:?}");
    let metrics = String::from_utf8_lossy(&send(get(env.admin, "/metrics")).await.2).into_owned();
    assert!(metrics.lines().any(|l| l.contains("outcome=\"upstream_reset\"") && !l.ends_with(" 0")), "counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_upstreams_routes_state_their_quota_on_every_answer() {
    let up = FaultUpstream::start().await;
    let config = CONFIG.replace(
        "[[route]]\nname = \"slow\"",
        "[[upstream]]\nname = \"limited\"\nendpoints = [\"http://{upstream}\"]\n\
         rate_limit = { rate = 3, per = \"30s\" }\n\n\
         [[route]]\nname = \"quota\"\nmatch = { path_prefix = \"/quota\" }\nupstream = \"limited\"\n\n\
         [[route]]\nname = \"slow\"",
    );
    let env = envelope(&config, up.addr).await;
    for left in [2, 1, 0] {
        let (status, headers, _) = send(get(env.addr, "/quota/x")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["ratelimit-policy"], "\"limited\";q=3;w=30");
        let now = headers["ratelimit"].to_str().unwrap();
        assert!(now.starts_with(&format!("\"limited\";r={left};t=")), "{now}");
    }
    let (status, headers, _) = send(get(env.addr, "/quota/x")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the fourth is over the quota");
    assert_eq!(headers["ratelimit-policy"], "\"limited\";q=3;w=30");
    let now = headers["ratelimit"].to_str().unwrap();
    let reset: u64 = now.strip_prefix("\"limited\";r=0;t=").expect(now).parse().unwrap();
    assert!((29..=30).contains(&reset), "the whole quota back within the window: {now}");
    assert!(headers.contains_key("retry-after"));
    // Routes of upstreams without a limit say nothing.
    let (_, headers, _) = send(get(env.addr, "/api/plain")).await;
    assert!(!headers.contains_key("ratelimit") && !headers.contains_key("ratelimit-policy"));
}

fn get_as(addr: std::net::SocketAddr, path: &str, api_key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(format!("http://{addr}{path}"));
    if let Some(k) = api_key {
        b = b.header("x-api-key", k);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limits_keep_keys_apart_and_answer_429_with_the_quota() {
    let up = FaultUpstream::start().await;
    let config = CONFIG.replace(
        "[[route]]\nname = \"slow\"",
        "[[route]]\nname = \"keyed\"\nmatch = { path_prefix = \"/keyed\" }\nupstream = \"app\"\n\
         rate_limit = { rate = 2, per = \"60s\", key = \"header:x-api-key\", max_keys = 100 }\n\n\
         [[route]]\nname = \"tenants\"\nmatch = { path = \"/tenants/{tenant}/orders\" }\nupstream = \"app\"\n\
         rate_limit = { rate = 1, per = \"60s\", key = \"param:tenant\" }\n\n\
         [[route]]\nname = \"clients\"\nmatch = { path_prefix = \"/clients\" }\nupstream = \"app\"\n\
         rate_limit = { rate = 1, per = \"60s\", key = \"client\" }\n\n\
         [[route]]\nname = \"slow\"",
    );
    let env = envelope(&config, up.addr).await;
    for _ in 0..2 {
        assert_eq!(send(get_as(env.addr, "/keyed/x", Some("alice"))).await.0, StatusCode::OK);
    }
    let (status, headers, body) = send(get_as(env.addr, "/keyed/x", Some("alice"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "alice's third in a minute");
    assert!(String::from_utf8_lossy(&body).contains("route `keyed`: rate limit reached"));
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    // The wait for one more call (30 s), spread by up to 2 s (envelope_http::problem::RETRY_AFTER_SPREAD).
    assert!((29..=32).contains(&retry_after), "{retry_after}");
    assert_eq!(headers["ratelimit-policy"], "\"keyed\";q=2;w=60");
    assert!(headers["ratelimit"].to_str().unwrap().starts_with("\"keyed\";r=0;t="));
    assert_eq!(send(get_as(env.addr, "/keyed/x", Some("bob"))).await.0, StatusCode::OK, "bob has his own");
    // Requests without the header share one key.
    assert_eq!(send(get_as(env.addr, "/keyed/x", None)).await.0, StatusCode::OK);
    assert_eq!(send(get_as(env.addr, "/keyed/x", None)).await.0, StatusCode::OK);
    assert_eq!(send(get_as(env.addr, "/keyed/x", None)).await.0, StatusCode::TOO_MANY_REQUESTS);

    assert_eq!(send(get(env.addr, "/tenants/acme/orders")).await.0, StatusCode::OK);
    assert_eq!(send(get(env.addr, "/tenants/acme/orders")).await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(send(get(env.addr, "/tenants/globex/orders")).await.0, StatusCode::OK, "tenants apart");

    assert_eq!(send(get(env.addr, "/clients/a")).await.0, StatusCode::OK);
    assert_eq!(send(get(env.addr, "/clients/b")).await.0, StatusCode::TOO_MANY_REQUESTS, "one client address");
    // Nothing over a limit reached the upstream; no per-key label in the metrics.
    assert_eq!(up.count("GET", "/keyed/x"), 5);
    let (_, _, metrics) = send(get(env.admin, "/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(!metrics.contains("alice") && !metrics.contains("acme"), "keys never become labels");
    assert!(metrics.contains("envelope_rate_limited_total{upstream=\"keyed\",shadow=\"false\"} 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_limit_and_the_bulkheads_are_visible_as_gauges_and_on_the_admin_api() {
    let up = FaultUpstream::start().await;
    up.script("/api/x", [Action::delayed(200, Duration::from_millis(2))]);
    let config = CONFIG
        .replace(
            "name = \"inbound\"\nlisten = \"127.0.0.1:0\"",
            "name = \"inbound\"\nlisten = \"127.0.0.1:0\"\nadaptive_concurrency = true",
        )
        .replace(
            "half_open_calls = 2 }",
            "half_open_calls = 2 }\nbulkhead = { max_concurrent = 7, queue = 3, queue_timeout = \"10ms\" }",
        );
    let env = envelope(&config, up.addr).await;
    // Traffic until the adaptive limit has closed a window (10 samples per 100 ms window by default).
    let deadline = Instant::now() + Duration::from_secs(10);
    let listeners = loop {
        for _ in 0..20 {
            assert_eq!(send(get(env.addr, "/api/x")).await.0, StatusCode::OK);
        }
        let (_, _, body) = send(get(env.admin, "/api/v1/listeners")).await;
        let listeners: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if !listeners[0]["sampled_latency_ms"].is_null() {
            break listeners;
        }
        assert!(Instant::now() < deadline, "a window of the adaptive limit closes within 10 s: {listeners}");
    };
    assert_eq!(listeners[0]["listener"], "inbound");
    assert_eq!(listeners[0]["adaptive"], true);
    assert!(listeners[0]["limit"].as_u64().unwrap() >= 4, "{listeners}");
    let baseline = listeners[0]["baseline_latency_ms"].as_f64().unwrap();
    let sampled = listeners[0]["sampled_latency_ms"].as_f64().unwrap();
    assert!(baseline >= 2.0 && sampled >= 2.0, "the upstream's 2 ms is in both: {baseline} {sampled}");
    let (_, _, metrics) = send(get(env.admin, "/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "envelope_concurrency_limit{listener=\"inbound\"} ",
        "envelope_concurrency_baseline_latency_seconds{listener=\"inbound\"} ",
        "envelope_concurrency_sampled_latency_seconds{listener=\"inbound\"} ",
        "envelope_bulkhead_in_flight{upstream=\"app\"} 0",
        "envelope_bulkhead_queued{upstream=\"app\"} 0",
        "envelope_bulkhead_limit{upstream=\"app\"} 7",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // Every attempt's time to its upstream, per upstream: each of the requests above, at least its 2 ms.
    let count = |name: &str| -> f64 {
        let prefix = format!("{name}{{upstream=\"app\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let attempts = count("envelope_upstream_attempt_duration_seconds_count");
    assert!(attempts >= 20.0, "{attempts} attempts timed");
    assert!(count("envelope_upstream_attempt_duration_seconds_sum") >= attempts * 0.002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_list_only_what_happened() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    let scrape = || async {
        let (_, _, body) = send(get(env.admin, "/metrics")).await;
        String::from_utf8_lossy(&body).into_owned()
    };
    let before = scrape().await;
    assert!(!before.contains("envelope_requests_total{"), "no request series before any request");
    assert!(!before.contains("envelope_request_duration_seconds_count{"), "no histogram before any request");
    assert_eq!(send(get(env.addr, "/api/x")).await.0, StatusCode::OK);
    let after = scrape().await;
    let requests: Vec<&str> = after.lines().filter(|l| l.starts_with("envelope_requests_total{")).collect();
    assert_eq!(requests.len(), 1, "one series for the one (route, outcome, class) that happened: {requests:?}");
    assert!(
        requests[0].contains("route=\"api\"") && requests[0].contains("outcome=\"ok\"") && requests[0].ends_with(" 1")
    );
    assert!(after.contains("envelope_request_duration_seconds_count{route=\"api\"} 1"));
    let slow = |l: &&str| l.contains("route=\"slow\"") && !l.starts_with("envelope_slo_");
    assert_eq!(
        after.lines().filter(|l| l.starts_with("envelope_request")).filter(slow).count(),
        0,
        "no traffic, no series"
    );
}
