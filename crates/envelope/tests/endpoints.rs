//! Several endpoints: a refused connection is retried on another endpoint even for a POST (nothing was sent), and
//! an endpoint that keeps refusing is taken out of rotation.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{FaultUpstream, envelope, get, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_fail_over_and_the_dead_endpoint_is_ejected() {
    let up = FaultUpstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed at once: refuses
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "app"
endpoints = ["http://{dead}", "http://{{upstream}}"]

[[route]]
name = "api"
match = {{ path_prefix = "/" }}
upstream = "app"
retry = {{ max_attempts = 3, base = "1ms", max_delay = "5ms" }}
"#
    );
    let env = envelope(&config, up.addr).await;
    let post = Request::post(format!("http://{}/orders", env.addr)).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
    let (status, _, _) = send(post).await;
    assert_eq!(status, StatusCode::OK, "a POST whose connection was refused is safe to send elsewhere");
    assert_eq!(up.count("POST", "/orders"), 1);

    for _ in 0..20 {
        assert_eq!(send(get(env.addr, "/items")).await.0, StatusCode::OK);
    }
    let (_, _, body) = send(get(env.admin, "/metrics")).await;
    let attempts: f64 = String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("envelope_upstream_attempts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // 21 requests; the dead endpoint costs one extra attempt each time it is tried, and it is ejected after 3 refusals.
    assert!(attempts <= 21.0 + 3.0, "attempts {attempts}");
    let (_, _, body) = send(get(env.admin, "/api/v1/upstreams")).await;
    let ups: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ups[0]["endpoints_healthy"], serde_json::json!([false, true]));
}
