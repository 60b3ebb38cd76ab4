//! https upstreams: TLS with rustls, trusting the upstream's `ca_file`; an untrusted certificate is a connect error;
//! `protocol = "http2"` speaks HTTP/2, by ALPN over TLS and with prior knowledge (h2c) on plain http.

mod support;

use http::StatusCode;
use support::{FaultUpstream, TempDir, envelope, get, send};

fn config(ca_file: Option<&str>) -> String {
    let ca = ca_file.map(|p| format!("ca_file = \"{p}\"\n")).unwrap_or_default();
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "egress"
listen = "127.0.0.1:0"

[[upstream]]
name = "payments-api"
endpoints = ["https://{{upstream}}"]
{ca}
[[route]]
name = "payments"
match = {{ path_prefix = "/payments" }}
strip_prefix = true
upstream = "payments-api"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_reached_over_tls_with_prefix_stripping() {
    let (up, pem) = FaultUpstream::start_tls().await;
    let dir = TempDir::new();
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let env = envelope(&config(Some(ca.to_str().unwrap())), up.addr).await;
    let (status, _, body) = send(get(env.addr, "/payments/v1/charges?limit=2")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(up.count("GET", "/v1/charges"), 1, "the prefix was stripped on the way out");
    // The headers the proxy sets travel over hyper-util's client too.
    let seen = up.headers("/v1/charges").pop().unwrap();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.get_all("x-request-id").iter().count(), 1);
    assert!(seen["traceparent"].to_str().unwrap().starts_with("00-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let (up, _) = FaultUpstream::start_tls().await;
    let env = envelope(&config(None), up.addr).await;
    let (status, _, body) = send(get(env.addr, "/payments/x")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("connect_error"));
    assert_eq!(up.count("GET", "/x"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_is_spoken_to_in_http2_over_tls_and_in_h2c() {
    let (tls, pem) = FaultUpstream::start_tls().await;
    let dir = TempDir::new();
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let h2 = config(Some(ca.to_str().unwrap())).replace("[[route]]", "protocol = \"http2\"\n\n[[route]]");
    let env = envelope(&h2, tls.addr).await;
    for _ in 0..3 {
        let (status, _, body) = send(get(env.addr, "/payments/v1/refunds")).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(tls.versions("/v1/refunds"), [http::Version::HTTP_2; 3], "h2, chosen by ALPN");
    let seen = tls.headers("/v1/refunds").pop().unwrap();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(!seen.contains_key("host"), "the authority travels as :authority");

    // Plain http with prior knowledge; an HTTP/1.1 upstream next to it is still spoken to in HTTP/1.1.
    let plain = FaultUpstream::start().await;
    let h2c = h2.replace("https://", "http://").replace(&format!("ca_file = \"{}\"\n", ca.display()), "");
    let env = envelope(&h2c, plain.addr).await;
    let (status, _, _) = send(get(env.addr, "/payments/v1/refunds")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plain.versions("/v1/refunds"), [http::Version::HTTP_2]);
    let h1 = envelope(&config(None).replace("https://", "http://"), plain.addr).await;
    let (status, _, _) = send(get(h1.addr, "/payments/v1/refunds")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plain.versions("/v1/refunds")[1], http::Version::HTTP_11);
}
