//! Quality scenarios: `envelope verify` injects each scenario's fault through the running sidecar, drives a bounded
//! load, prints PASS/FAIL per measure and exits non-zero on a FAIL; the sidecar judges the same measures on live
//! traffic (`/api/v1/scenarios`); faults set through the admin API need the token and end by themselves.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use support::{Action, Envelope, FaultUpstream, envelope_with_env, get, send};

const TOKEN: &str = "s3cret-token";

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"
access_log = false

[[upstream]]
name = "flaky"
endpoints = ["http://{upstream}"]

[[upstream]]
name = "guarded"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 20 }, min_calls = 10, failure_rate = 50, open_for = "30s" }

[[route]]
name = "retrying"
match = { path_prefix = "/flaky" }
upstream = "flaky"
retry = { max_attempts = 4, base = "1ms", max_delay = "5ms", budget = { ratio = 1.0, min_per_second = 1000 } }

[[upstream]]
name = "guarded-retrying"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 20 }, min_calls = 10, failure_rate = 50, open_for = "30s" }

[[route]]
name = "protected"
match = { path_prefix = "/guarded" }
upstream = "guarded"

[[route]]
name = "protected-retrying"
match = { path_prefix = "/retried" }
upstream = "guarded-retrying"
retry = { max_attempts = 3, base = "100ms", max_delay = "100ms", jitter = "none", budget = { ratio = 1.0, min_per_second = 1000 } }

[history]
path = ":memory:"
flush_interval = "100ms"

[[counter]]
name = "conflicts"
status = ["409"]

[[scenario]]
name = "retries absorb a 20 % error rate"
route = "retrying"
request = { path = "/flaky/items" }
load = { rate = 100, duration = "2s" }
fault = { upstream = "flaky", abort_status = 503, abort_percent = 20 }
expect = { success_rate = 95, counters = { conflicts = 0 } }

[[scenario]]
name = "an outage fails fast"
route = "protected"
request = { path = "/guarded/items" }
load = { rate = 100, duration = "2s", concurrency = 32 }
fault = { upstream = "guarded", abort_status = 503 }
expect = { fast_fail_p99 = "100ms" }

[[scenario]]
name = "an outage fails fast with retries on"
route = "protected-retrying"
request = { path = "/retried/items" }
load = { rate = 100, duration = "2s", concurrency = 32 }
fault = { upstream = "guarded-retrying", abort_status = 503 }
expect = { fast_fail_p99 = "100ms" }

[[scenario]]
name = "promises more than it can keep"
route = "retrying"
request = { path = "/flaky/slow" }
load = { rate = 20, duration = "1s" }
fault = { upstream = "flaky", delay = "120ms" }
expect = { p99 = "50ms" }
"#;

async fn start() -> (FaultUpstream, Envelope) {
    let up = FaultUpstream::start().await;
    let env = envelope_with_env(CONFIG, up.addr, &[("ENVELOPE_ADMIN_TOKEN", TOKEN)]).await;
    (up, env)
}

/// Runs `envelope verify` against `env`; returns its exit code and standard output.
async fn verify(env: &Envelope, extra: &[&str], token: Option<&str>) -> (i32, String) {
    let config = env.dir().join("envelope.toml");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_envelope"));
    cmd.args(["verify", "--config", config.to_str().unwrap()])
        .args(["--target", &env.addr.to_string(), "--admin", &env.admin.to_string()])
        .args(extra)
        .env_remove("ENVELOPE_ADMIN_TOKEN")
        .kill_on_drop(true);
    if let Some(t) = token {
        cmd.env("ENVELOPE_ADMIN_TOKEN", t);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("verify ends").unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The table row of `measure` for the scenario named `scenario` (rows after the first of a scenario leave the
/// name out).
fn row<'a>(table: &'a str, scenario: &str, measure: &str) -> &'a str {
    let start = table.find(scenario).unwrap_or_else(|| panic!("no scenario `{scenario}` in\n{table}"));
    table[start..].lines().find(|l| l.contains(measure)).unwrap_or_else(|| panic!("no `{measure}` in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_prints_pass_and_fail_per_measure_and_exits_non_zero_on_fail() {
    let (up, env) = start().await;
    up.script("/flaky/slow", [Action::status(200)]);

    let (code, table) = verify(&env, &[], Some(TOKEN)).await;
    eprintln!("{table}");
    assert_eq!(code, 1, "one scenario fails:\n{table}");
    assert!(row(&table, "retries absorb", "success_rate").ends_with("PASS"), "{table}");
    assert!(row(&table, "retries absorb", "counter conflicts").ends_with("PASS"), "{table}");
    assert!(row(&table, "an outage fails fast", "fast_fail_p99").ends_with("PASS"), "{table}");
    // With retries on: the requests that waited through retries (100 ms apart) before the breaker opened are not
    // fast fails; the ones refused before any attempt are, and they are fast.
    assert!(row(&table, "fails fast with retries on", "fast_fail_p99").ends_with("PASS"), "{table}");
    let slow = row(&table, "promises more", "p99");
    assert!(slow.ends_with("FAIL") && slow.contains("< 50.0 ms"), "{table}");
    assert!(table.contains("FAIL: some measures do not hold"), "{table}");

    // The faults were injected by the sidecar: the aborted attempts never reached the upstream; the rest did.
    assert!(up.count("GET", "/guarded/items") == 0, "an injected abort is answered by the sidecar itself");
    assert!(up.count("GET", "/flaky/items") > 100, "the unfaulted 80 % reached the upstream");
    let (_, _, faults) = send(get(env.admin, "/api/v1/faults")).await;
    assert_eq!(serde_json::from_slice::<Value>(&faults).unwrap(), serde_json::json!([]), "faults are taken away");

    // One passing scenario alone: exit 0.
    let (code, table) = verify(&env, &["--scenario", "retries absorb a 20 % error rate"], Some(TOKEN)).await;
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("PASS: every scenario holds"), "{table}");

    // The same measures, judged by the sidecar on live traffic (the rollups of the last five minutes).
    let live = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (status, _, body) = send(get(env.admin, "/api/v1/scenarios")).await;
            assert_eq!(status, StatusCode::OK);
            let v: Value = serde_json::from_slice(&body).unwrap();
            if v[1]["requests"].as_u64().unwrap_or(0) >= 200 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("live verdicts within 10 s");
    assert_eq!(live.as_array().unwrap().len(), 4);
    assert_eq!(live[1]["name"], "an outage fails fast");
    assert_eq!(live[1]["measures"][0]["measure"], "fast_fail_p99");
    assert_eq!(live[1]["measures"][0]["verdict"], "PASS", "{live}");
    assert_eq!(live[2]["name"], "an outage fails fast with retries on");
    assert_eq!(live[2]["measures"][0]["verdict"], "PASS", "{live}");
    assert_eq!(live[3]["verdict"], "FAIL", "the slow route's p99 is over 50 ms on live traffic too: {live}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_without_a_reachable_sidecar_or_token_is_a_clear_error() {
    let (_up, env) = start().await;
    let (code, text) = verify(&env, &["--scenario", "an outage fails fast"], None).await;
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("ENVELOPE_ADMIN_TOKEN"), "{text}");
    let (code, text) = verify(&env, &["--scenario", "no such"], Some(TOKEN)).await;
    assert_eq!((code, text.contains("no scenario named `no such`")), (3, true), "{text}");
    let config = env.dir().join("envelope.toml");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["verify", "--config", config.to_str().unwrap(), "--admin", "127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the sidecar's admin at 127.0.0.1:9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_faults_need_the_token_validate_and_expire() {
    let (up, env) = start().await;
    let fault = |token: Option<&str>, body: &str| {
        let mut b = Request::post(format!("http://{}/api/v1/faults/flaky", env.admin));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    };
    let ok = r#"{"abort_status": 418, "duration_ms": 300}"#;
    assert_eq!(send(fault(None, ok)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(fault(Some("wrong"), ok)).await.0, StatusCode::UNAUTHORIZED);
    for bad in [
        r#"{"abort_status": 200, "duration_ms": 300}"#,
        r#"{"abort_status": 503, "abort_percent": 101, "duration_ms": 300}"#,
        r#"{"abort_status": 503, "duration_ms": 0}"#,
        r#"{"abort_status": 503, "duration_ms": 300, "extra": 1}"#,
        r#"{"abort_status": 503}"#,
        "not json",
    ] {
        let (status, _, body) = send(fault(Some(TOKEN), bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {}", String::from_utf8_lossy(&body));
    }
    let (status, _, body) = send(fault(Some(TOKEN), ok)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = send(get(env.addr, "/flaky/x")).await;
    assert_eq!(status.as_u16(), 418, "the injected status is answered");
    assert_eq!(up.count("GET", "/flaky/x"), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, _) = send(get(env.addr, "/flaky/x")).await;
    assert_eq!(status, StatusCode::OK, "the fault ended by itself");
    assert_eq!(up.count("GET", "/flaky/x"), 1);
    // DELETE takes a fault away at once.
    send(fault(Some(TOKEN), r#"{"abort_status": 503, "duration_ms": 60000}"#)).await;
    let delete = Request::delete(format!("http://{}/api/v1/faults/flaky", env.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(delete).await.0, StatusCode::NO_CONTENT);
    assert_eq!(send(get(env.addr, "/flaky/x")).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_by_an_injected_fault_report_their_attempts() {
    let up = FaultUpstream::start().await;
    let config = CONFIG.replace("access_log = false", "access_log = true");
    let env = envelope_with_env(&config, up.addr, &[("ENVELOPE_ADMIN_TOKEN", TOKEN)]).await;
    let fault = Request::post(format!("http://{}/api/v1/faults/flaky", env.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from_static(br#"{"abort_status": 503, "duration_ms": 60000}"#)))
        .unwrap();
    assert_eq!(send(fault).await.0, StatusCode::OK);
    let (status, _, body) = send(get(env.addr, "/flaky/x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["attempts"], 4, "every attempt the retry made, each answered by the fault: {doc}");
    assert_eq!(up.count("GET", "/flaky/x"), 0, "none reached the upstream");
    let log = env.access_log_lines(1).await;
    assert_eq!((log[0]["attempts"].as_u64(), log[0]["outcome"].as_str()), (Some(4), Some("upstream_5xx")));
    // Refused before any attempt: 0, in the document and the log.
    let guarded = Request::post(format!("http://{}/api/v1/faults/guarded", env.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from_static(br#"{"abort_status": 503, "duration_ms": 60000}"#)))
        .unwrap();
    assert_eq!(send(guarded).await.0, StatusCode::OK);
    for _ in 0..10 {
        send(get(env.addr, "/guarded/x")).await;
    }
    let (_, _, body) = send(get(env.addr, "/guarded/x")).await;
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((doc["outcome"].as_str(), doc["attempts"].as_u64()), (Some("circuit_open"), Some(0)), "{doc}");
    let log = env.access_log_lines(12).await;
    assert_eq!((log[11]["attempts"].as_u64(), log[11]["outcome"].as_str()), (Some(0), Some("circuit_open")));
}
