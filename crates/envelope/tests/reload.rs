//! Hot reload: a valid config applies atomically and keeps the state of unchanged upstreams; an invalid one is
//! refused, counted, and the old config keeps serving; reloading under load fails no request.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{FaultUpstream, envelope_with_env, get, send};

fn config(extra_route: bool, timeout: &str) -> String {
    let mut c = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{{upstream}}"]
breaker = {{ window = {{ count = 10 }}, min_calls = 10, open_for = "30s" }}

[[route]]
name = "api"
match = {{ path_prefix = "/api" }}
upstream = "app"
timeout = "{timeout}"
"#
    );
    if extra_route {
        c += "\n[[route]]\nname = \"v2\"\nmatch = { path_prefix = \"/v2\" }\nupstream = \"app\"\n";
    }
    c
}

async fn wait_for(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn metric(admin: std::net::SocketAddr, needle: &str) -> f64 {
    let (_, _, body) = send(get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.contains(needle) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn force_open(admin: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{admin}/api/v1/breakers/app/force-open"))
        .header("authorization", "Bearer t0ken")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_reload_applies_and_keeps_breaker_state_an_invalid_one_is_refused() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(&config(false, "5s"), up.addr, &[("ENVELOPE_ADMIN_TOKEN", "t0ken")]).await;
    assert_eq!(send(get(env.addr, "/v2/x")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(send(force_open(env.admin)).await.0, StatusCode::OK);

    // File change: a new route appears; the unchanged upstream keeps its (forced open) breaker.
    env.rewrite_config(&config(true, "5s"), up.addr);
    assert!(wait_for(async || send(get(env.addr, "/v2/x")).await.0 != StatusCode::NOT_FOUND).await, "reload applied");
    let (status, _, body) = send(get(env.addr, "/v2/x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("circuit_open"), "breaker state survived the reload");
    assert_eq!(metric(env.admin, "envelope_config_reloads_total{result=\"ok\"}").await, 1.0);

    // An invalid file: refused, counted, and the running config keeps serving.
    env.rewrite_config("[[listener]\nthis is not toml", up.addr);
    assert!(wait_for(async || metric(env.admin, "result=\"rejected\"").await >= 1.0).await);
    assert_eq!(send(get(env.addr, "/v2/x")).await.0, StatusCode::SERVICE_UNAVAILABLE, "still the last good config");

    // SIGHUP reloads too; a listener change is refused.
    env.rewrite_config(&config(true, "5s").replace("name = \"inbound\"", "name = \"renamed\""), up.addr);
    env.signal("HUP");
    assert!(wait_for(async || metric(env.admin, "result=\"rejected\"").await >= 2.0).await);
    assert_eq!(send(get(env.addr, "/api/x")).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_fails_no_request() {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(&config(false, "5s"), up.addr, &[]).await;
    let addr = env.addr;
    let load: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut failures = 0;
                for _ in 0..100 {
                    if send(get(addr, "/api/load")).await.0 != StatusCode::OK {
                        failures += 1;
                    }
                }
                failures
            })
        })
        .collect();
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        env.rewrite_config(&config(i % 2 == 0, if i % 2 == 0 { "4s" } else { "5s" }), up.addr);
        env.signal("HUP");
    }
    let mut failures = 0;
    for l in load {
        failures += l.await.unwrap();
    }
    assert_eq!(failures, 0, "no request failed across reloads");
    assert!(metric(env.admin, "result=\"ok\"").await >= 3.0, "the reloads did happen");
    assert_eq!(up.count("GET", "/api/load"), 400);
}
