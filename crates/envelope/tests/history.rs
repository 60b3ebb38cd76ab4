//! The metrics history: per-minute rollups in SQLite that answer `/api/v1/history`, business counters, surviving a
//! restart and a crash, and falling back to memory (with a log line, failing no request) when the file is unusable.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use support::{Action, Envelope, FaultUpstream, TempDir, envelope, get, send};

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
name = "api"
match = { path_prefix = "/" }
upstream = "app"

[history]
flush_interval = "100ms"
{path}

[[counter]]
name = "orders"
match = { path_prefix = "/orders", methods = ["POST"] }

[[counter]]
name = "conflicts"
route = "api"
status = ["409"]
"#;

fn config(path: &str) -> String {
    CONFIG.replace("{path}", path)
}

fn post(addr: std::net::SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}")).body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

async fn history(env: &Envelope, query: &str) -> Value {
    let (status, _, body) = send(get(env.admin, &format!("/api/v1/history?{query}"))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn total(h: &Value, field: &str) -> u64 {
    h["points"].as_array().unwrap().iter().map(|p| p[field].as_u64().unwrap()).sum()
}

/// Polls the route's history until it holds `requests` requests (bounded: 10 s).
async fn wait_for(env: &Envelope, requests: u64) -> Value {
    for _ in 0..100 {
        let h = history(env, "route=api&minutes=10").await;
        if total(&h, "requests") >= requests {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the history never reached {requests} requests");
}

/// Sends the traffic every test here uses: 16 requests, 3 of them 503, 2 orders and 1 conflict.
async fn traffic(env: &Envelope, up: &FaultUpstream) {
    up.script("/fail", [Action::status(503)]);
    up.script("/orders", [Action::status(201), Action::status(201), Action::status(409)]);
    for _ in 0..10 {
        assert_eq!(send(get(env.addr, "/ok")).await.0, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(send(get(env.addr, "/fail")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    for expected in [StatusCode::CREATED, StatusCode::CREATED, StatusCode::CONFLICT] {
        assert_eq!(send(post(env.addr, "/orders")).await.0, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_answer_the_history_api_and_survive_a_restart_and_a_crash() {
    let up = FaultUpstream::start().await;
    let env = envelope(&config(""), up.addr).await;
    traffic(&env, &up).await;

    let h = wait_for(&env, 16).await;
    assert_eq!(h["route"], "api");
    assert_eq!(h["storage"], "file");
    assert_eq!(h["step_seconds"], 60);
    assert_eq!(total(&h, "requests"), 16);
    assert_eq!(total(&h, "errors"), 3, "the three 503s; 409 is the client's");
    let p = &h["points"].as_array().unwrap().last().unwrap();
    assert!(p["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    let outcomes: u64 = h["points"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["outcomes"].as_object().unwrap().values())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(outcomes, 16, "outcomes add up to the requests");
    // Counters: flushed together with the route.
    assert_eq!(total(&history(&env, "counter=orders&minutes=10").await, "count"), 2, "POST /orders answered 2xx");
    assert_eq!(total(&history(&env, "counter=conflicts&minutes=10").await, "count"), 1);
    assert_eq!(total(&history(&env, "upstream=app&minutes=10").await, "attempts"), 16);
    // And as metrics.
    let (_, _, metrics) = send(get(env.admin, "/metrics")).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(metrics.contains("envelope_business_events_total{counter=\"orders\"} 2"), "{metrics}");
    assert!(env.dir().join("envelope-history.db").exists(), "the default file sits next to the config");

    // A graceful restart keeps everything.
    let env = env.restart().await;
    let h = history(&env, "route=api&minutes=10").await;
    assert_eq!(total(&h, "requests"), 16, "{h}");
    assert_eq!(total(&history(&env, "counter=orders&days=1&step=hour").await, "count"), 2);

    // A crash loses at most the last flush interval: what was flushed before it is there afterwards.
    traffic(&env, &up).await;
    wait_for(&env, 32).await;
    let env = env.crash_and_restart().await;
    assert_eq!(total(&history(&env, "route=api&minutes=10").await, "requests"), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_file_degrades_to_memory_with_a_log_line_and_fails_no_request() {
    let up = FaultUpstream::start().await;
    let junk = TempDir::new();
    let file = junk.0.join("history.db");
    std::fs::write(&file, vec![0x42u8; 16 * 1024]).unwrap();
    let env = envelope(&config(&format!("path = {:?}", file.to_str().unwrap())), up.addr).await;
    traffic(&env, &up).await;
    let h = wait_for(&env, 16).await;
    assert_eq!(h["storage"], "memory");
    assert_eq!(total(&h, "requests"), 16);
    let errors = env.errors.lock().unwrap().join("\n");
    assert!(
        errors.contains("history") && errors.contains("history.db") && errors.contains("in memory"),
        "a clear log line: {errors}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), vec![0x42u8; 16 * 1024], "a file that is not ours is left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_history_queries_are_400_with_a_reason() {
    let up = FaultUpstream::start().await;
    let env = envelope(&config("path = \":memory:\""), up.addr).await;
    for query in ["", "route=api&upstream=app", "route=api&days=0", "route=api&step=week", "route=api&days=x"] {
        let (status, _, body) = send(get(env.admin, &format!("/api/v1/history?{query}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{query}: {v}");
    }
    let h = history(&env, "route=unknown&hours=2").await;
    assert_eq!(h["points"].as_array().unwrap().len(), 0);
    assert_eq!(h["storage"], "memory");
}
