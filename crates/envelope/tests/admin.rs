//! The admin listener: metrics that add up, breaker control guarded by a token, health and readiness.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{Action, FaultUpstream, envelope_with_env, get, send};

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 10 }, min_calls = 10, failure_rate = 50, open_for = "30s" }

[[route]]
name = "api"
match = { path_prefix = "/api" }
upstream = "app"
retry = { max_attempts = 2, base = "1ms", max_delay = "10ms" }
"#;

/// Sums every sample of `family` (optionally filtered by a label substring) in an exposition text.
fn sum(text: &str, family: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && (l.as_bytes().get(family.len()) == Some(&b'{')) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn post(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{addr}{path}"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_counters_add_up_to_the_requests_sent() {
    let up = FaultUpstream::start().await;
    up.script("/api/mixed", [Action::status(200), Action::status(500), Action::status(404), Action::status(200)]);
    let env = envelope_with_env(CONFIG, up.addr, &[]).await;
    for _ in 0..7 {
        send(get(env.addr, "/api/mixed")).await;
    }
    send(get(env.addr, "/unrouted")).await;
    let (status, headers, body) = send(get(env.admin, "/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(sum(&text, "envelope_requests_total", "route=\"api\""), 7.0, "{text}");
    assert_eq!(sum(&text, "envelope_request_duration_seconds_count", "route=\"api\""), 7.0);
    assert_eq!(sum(&text, "envelope_unmatched_requests_total", ""), 1.0);
    assert_eq!(sum(&text, "envelope_upstream_attempts_total", ""), up.count("GET", "/api/mixed") as f64);
    assert_eq!(sum(&text, "envelope_requests_in_flight", ""), 0.0);
    assert_eq!(sum(&text, "envelope_breaker_state", "state=\"closed\""), 1.0);
    assert!(text.contains("# TYPE envelope_requests_total counter"), "Prometheus text names counters with _total");
    assert!(!text.contains("# EOF"));
    // OpenMetrics on request.
    let mut req = get(env.admin, "/metrics");
    req.headers_mut().insert("accept", "application/openmetrics-text; version=1.0.0".parse().unwrap());
    let (_, headers, body) = send(req).await;
    assert!(headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(String::from_utf8(body.to_vec()).unwrap().trim_end().ends_with("# EOF"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_buckets_carry_trace_ids_as_openmetrics_exemplars() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(CONFIG, up.addr, &[]).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = get(env.addr, "/api/traced");
    req.headers_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    assert_eq!(send(req).await.0, StatusCode::OK);

    let mut req = get(env.admin, "/metrics");
    req.headers_mut().insert("accept", "application/openmetrics-text; version=1.0.0".parse().unwrap());
    let text = String::from_utf8(send(req).await.2.to_vec()).unwrap();
    let exemplar = text
        .lines()
        .filter(|l| l.starts_with("envelope_request_duration_seconds_bucket{") && l.contains("route=\"api\""))
        .find(|l| l.contains(" # {"))
        .unwrap_or_else(|| panic!("no exemplar on the api route's buckets:\n{text}"));
    assert!(exemplar.contains(&format!("# {{trace_id=\"{trace}\"}}")), "{exemplar}");
    // Exemplars are OpenMetrics only: the Prometheus text exposition leaves them out.
    let plain = String::from_utf8(send(get(env.admin, "/metrics")).await.2.to_vec()).unwrap();
    assert!(plain.contains("envelope_request_duration_seconds_bucket{"), "{plain}");
    assert!(!plain.contains(trace), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_control_needs_post_and_the_token() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(CONFIG, up.addr, &[("ENVELOPE_ADMIN_TOKEN", "s3cret")]).await;
    let path = "/api/v1/breakers/app/force-open";
    assert_eq!(send(get(env.admin, path)).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(send(post(env.admin, path, None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(post(env.admin, path, Some("wrong"))).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(get(env.addr, "/api/x")).await.0, StatusCode::OK, "nothing changed so far");

    assert_eq!(send(post(env.admin, path, Some("s3cret"))).await.0, StatusCode::OK);
    let (status, _, body) = send(get(env.addr, "/api/x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("circuit_open"));
    let (_, _, body) = send(get(env.admin, "/api/v1/breakers")).await;
    let breakers: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(breakers[0]["state"], "forced_open");

    assert_eq!(send(post(env.admin, "/api/v1/breakers/app/reset", Some("s3cret"))).await.0, StatusCode::OK);
    assert_eq!(send(get(env.addr, "/api/x")).await.0, StatusCode::OK);
    assert_eq!(send(post(env.admin, "/api/v1/breakers/nope/reset", Some("s3cret"))).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_state_changes_are_refused() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(CONFIG, up.addr, &[]).await;
    assert_eq!(
        send(post(env.admin, "/api/v1/breakers/app/force-open", Some("anything"))).await.0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_config_and_routes_are_served() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(CONFIG, up.addr, &[]).await;
    assert_eq!(send(get(env.admin, "/healthz")).await.0, StatusCode::OK);
    assert_eq!(send(get(env.admin, "/readyz")).await.0, StatusCode::OK);
    let (_, _, body) = send(get(env.admin, "/api/v1/config")).await;
    let config: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(config["routes"][0]["name"], "api");
    assert_eq!(config["routes"][0]["retry"]["max_attempts"], 2);
    assert_eq!(config["routes"][0]["timeout_ms"], 15_000, "documented default");
    let (_, _, body) = send(get(env.admin, "/api/v1/upstreams")).await;
    let ups: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ups[0]["breaker_state"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_state_is_served_per_route() {
    let up = FaultUpstream::start().await;
    up.script("/api/slo", [Action::status(200), Action::status(200), Action::status(200), Action::status(503)]);
    let env = envelope_with_env(
        &CONFIG.replace("retry = { max_attempts = 2, base = \"1ms\", max_delay = \"10ms\" }", ""),
        up.addr,
        &[],
    )
    .await;
    for _ in 0..4 {
        send(get(env.addr, "/api/slo")).await;
    }
    let (_, _, body) = send(get(env.admin, "/api/v1/slo")).await;
    let slo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let api = &slo[0];
    assert_eq!(api["route"], "api");
    assert_eq!(api["objective"]["availability"], 0.999, "the default tier");
    assert_eq!(api["events"]["30d"]["total"], 4);
    assert_eq!(api["events"]["30d"]["errors"], 1, "one 503 of four");
    // 25 % errors against a 0.1 % allowance: a burn rate of 250, a page, and the budget overspent.
    let burn = api["burn_rates"]["5m"].as_f64().unwrap();
    assert!((burn - 250.0).abs() < 1e-6, "{burn}");
    assert_eq!(api["alert"], "page");
    assert!(api["error_budget_remaining"].as_f64().unwrap() < 0.0);
    let (_, _, body) = send(get(env.admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&body);
    let exported = sum(&text, "envelope_slo_burn_rate", "window=\"5m\"");
    assert!((exported - 250.0).abs() < 1e-6, "{exported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_transitions_are_listed_newest_first() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(CONFIG, up.addr, &[("ENVELOPE_ADMIN_TOKEN", "s3cret")]).await;
    let events = |v: serde_json::Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["from"].as_str().unwrap().to_owned(), e["to"].as_str().unwrap().to_owned()))
            .collect()
    };
    let (_, _, body) = send(get(env.admin, "/api/v1/events")).await;
    assert!(events(serde_json::from_slice(&body).unwrap()).is_empty());
    send(post(env.admin, "/api/v1/breakers/app/force-open", Some("s3cret"))).await;
    send(post(env.admin, "/api/v1/breakers/app/reset", Some("s3cret"))).await;
    let (_, _, body) = send(get(env.admin, "/api/v1/events")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        events(v.clone()),
        [("forced_open".to_owned(), "closed".to_owned()), ("closed".to_owned(), "forced_open".to_owned())]
    );
    assert_eq!(v[0]["upstream"], "app");
    assert!(v[0]["at_ms"].as_u64().unwrap() >= v[1]["at_ms"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_loopback_and_configured_host_names_are_answered() {
    let up = FaultUpstream::start().await;
    let config = CONFIG.replace(
        "listen = \"127.0.0.1:0\"\n\n[[listener]]",
        "listen = \"127.0.0.1:0\"\nallowed_hosts = [\"Admin.Internal\"]\n\n[[listener]]",
    );
    let env = envelope_with_env(&config, up.addr, &[("ENVELOPE_ADMIN_TOKEN", "s3cret")]).await;
    let port = env.admin.port();
    let with_host = |host: &str, path: &str| {
        Request::get(format!("http://{}{path}", env.admin)).header("host", host).body(Full::new(Bytes::new())).unwrap()
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".to_owned(),
        "dashboard.localhost".to_owned(),
        format!("[::1]:{port}"),
        "127.0.0.2".to_owned(),
        format!("admin.internal:{port}"),
    ] {
        for path in ["/api/v1/config", "/metrics", "/"] {
            assert_eq!(send(with_host(&host, path)).await.0, StatusCode::OK, "{host}{path}");
        }
    }
    // A page whose own name was pointed at 127.0.0.1 (DNS rebinding) is refused, for reads and for changes.
    for host in ["evil.example", "evil.example:9901", "localhost.evil.example", "127.0.0.1.evil.example", "[::2]"] {
        for path in ["/api/v1/config", "/metrics", "/healthz"] {
            assert_eq!(send(with_host(host, path)).await.0, StatusCode::MISDIRECTED_REQUEST, "{host}{path}");
        }
        let mut change = post(env.admin, "/api/v1/breakers/app/force-open", Some("s3cret"));
        change.headers_mut().insert("host", host.parse().unwrap());
        assert_eq!(send(change).await.0, StatusCode::MISDIRECTED_REQUEST, "{host}");
    }
    let breakers = send(get(env.admin, "/api/v1/breakers")).await.2;
    assert!(!String::from_utf8_lossy(&breakers).contains("forced_open"), "nothing was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_own_slo_with_two_latency_objectives_is_served_and_counted() {
    let up = FaultUpstream::start().await;
    up.script("/api/own", [Action::delayed(200, std::time::Duration::from_millis(150)), Action::status(200)]);
    let config = CONFIG.replace(
        "retry = { max_attempts = 2, base = \"1ms\", max_delay = \"10ms\" }",
        r#"slo = { availability = 99.95, latency = [{ percentile = 95, under = "100ms" }, { percentile = 99.9, under = "1500ms" }] }"#,
    );
    let env = envelope_with_env(&config, up.addr, &[]).await;
    for _ in 0..4 {
        send(get(env.addr, "/api/own")).await;
    }
    let (_, _, body) = send(get(env.admin, "/api/v1/slo")).await;
    let slo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let api = &slo[0];
    assert_eq!(api["objective"]["availability"], 0.9995, "the route's own, not its tier's");
    assert_eq!(api["objective"]["latency_threshold_ms"], 100);
    let latencies = api["latencies"].as_array().unwrap();
    assert_eq!(latencies.len(), 2);
    assert_eq!(
        (latencies[0]["objective"].as_str(), latencies[1]["objective"].as_str()),
        (Some("p95_100ms"), Some("p99.9_1500ms"))
    );
    assert_eq!(latencies[0]["slow"]["30d"], 1, "one request of four took 150 ms");
    assert_eq!(latencies[1]["slow"]["30d"], 0);
    // 1 slow of 4 against 5 % allowed: 25 % / 5 % = a burn rate of 5.
    assert!((latencies[0]["burn_rates"]["5m"].as_f64().unwrap() - 5.0).abs() < 1e-9, "{}", latencies[0]);
    let (_, _, body) = send(get(env.admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(sum(&text, "envelope_slo_slow_requests_total", "under=\"0.1\""), 1.0);
    assert_eq!(sum(&text, "envelope_slo_slow_requests_total", "under=\"1.5\""), 0.0, "no series before a slow request");
    assert!(!text.contains("under=\"1.5\""));
    assert!(
        (sum(&text, "envelope_slo_latency_budget_remaining", "objective=\"p95_100ms\"") - (1.0 - 5.0)).abs() < 1e-9
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_a_bounded_method_and_retries_by_what_they_retried() {
    let up = FaultUpstream::start().await;
    up.script("/api/m", [Action::status(503), Action::status(200)]);
    let env = envelope_with_env(CONFIG, up.addr, &[]).await;
    send(get(env.addr, "/api/m")).await;
    for method in ["POST", "PURGE", "BREW", "DELETE"] {
        let req = Request::builder().method(method).uri(format!("http://{}/api/x", env.addr));
        send(req.body(Full::new(Bytes::new())).unwrap()).await;
    }
    let (_, _, body) = send(get(env.admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(sum(&text, "envelope_requests_total", "method=\"GET\""), 1.0);
    assert_eq!(sum(&text, "envelope_requests_total", "method=\"POST\""), 1.0);
    assert_eq!(sum(&text, "envelope_requests_total", "method=\"DELETE\""), 1.0);
    assert_eq!(sum(&text, "envelope_requests_total", "method=\"other\""), 2.0, "extension methods share one value");
    assert!(!text.contains("PURGE") && !text.contains("BREW"), "no label value a client chose");
    assert_eq!(sum(&text, "envelope_retries_total", "outcome=\"upstream_5xx\""), 1.0, "the 503 was retried");
}
