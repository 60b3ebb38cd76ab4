//! A real Prometheus (Debian's package) on 127.0.0.1 scrapes the sidecar and evaluates the generated rules; its HTTP
//! API then answers with a recorded SLO series.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{FaultUpstream, TempDir, envelope, get, send};

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
match = { path_prefix = "/api" }
upstream = "app"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_sidecar_and_records_the_slo() {
    let up = FaultUpstream::start().await;
    let env = envelope(CONFIG, up.addr).await;
    for _ in 0..20 {
        send(get(env.addr, "/api/x")).await;
    }

    let dir = TempDir::new();
    let (mut prometheus, port) = prometheus(&CONFIG.replace("{upstream}", &up.addr.to_string()), env.admin, &dir).await;

    // Within a bounded wait: the scrape sees the request counter and the rule records the SLI.
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = "slo:sli_error:ratio_rate5m{envelope_route=\"api\",envelope_slo=\"availability\"}";
    let mut answer = serde_json::Value::Null;
    while Instant::now() < deadline {
        let url = format!(
            "/api/v1/query?query={}",
            query.replace('{', "%7B").replace('}', "%7D").replace('"', "%22").replace('=', "%3D").replace(':', "%3A")
        );
        if let Ok(Ok(resp)) = tokio::time::timeout(
            Duration::from_secs(2),
            support::client().request(get(format!("127.0.0.1:{port}").parse().unwrap(), &url)),
        )
        .await
        {
            let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            answer = serde_json::from_slice(&body).unwrap_or_default();
            if answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break;
            }
        }
        // Keep traffic flowing so that rate() has two samples to work with.
        send(get(env.addr, "/api/x")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let result = &answer["data"]["result"][0];
    assert_eq!(result["metric"]["envelope_slo"], "availability", "{answer}");
    assert_eq!(result["value"][1], "0", "no errors: the recorded error ratio is zero ({answer})");
    let _ = prometheus.kill().await;
}

/// Starts Prometheus on the rules `envelope generate rules` makes for `config`, scraping `admin` every second.
async fn prometheus(config: &str, admin: std::net::SocketAddr, dir: &TempDir) -> (tokio::process::Child, u16) {
    let config_path = dir.0.join("envelope.toml");
    std::fs::write(&config_path, config).unwrap();
    let rules = std::process::Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["generate", "rules", "--config", config_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(rules.status.success(), "{}", String::from_utf8_lossy(&rules.stderr));
    std::fs::write(dir.0.join("rules.yaml"), &rules.stdout).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        dir.0.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: envelope\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new("prometheus")
        .args([
            "--config.file=prometheus.yml",
            &format!("--web.listen-address=127.0.0.1:{port}"),
            "--storage.tsdb.path=data",
        ])
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed by scripts/test.sh (Debian's prometheus package)");
    (child, port)
}

/// The states of the alerts named `name` Prometheus has now (`firing`, `pending`), with their labels.
async fn alerts(port: u16, name: &str) -> Vec<serde_json::Value> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let Ok(Ok(resp)) =
        tokio::time::timeout(Duration::from_secs(2), support::client().request(get(addr, "/api/v1/alerts"))).await
    else {
        return Vec::new();
    };
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    answer["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == name)
        .cloned()
        .collect()
}

/// A drill: with the burn windows scaled down 60 times (`[alerts] window_scale`), a real Prometheus pages within
/// seconds of an outage and the page clears within a minute of recovery. The route's own SLO (99 %) is the one
/// judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_down_burn_windows_let_a_drill_see_a_page_fire_and_clear() {
    let up = FaultUpstream::start().await;
    // The upstream has a breaker, and a second route answers from a fallback while it is open: the alerts beyond
    // burn rate are scaled too, and seen to fire in the same drill.
    let config = CONFIG.replace(
        "endpoints = [\"http://{upstream}\"]",
        "endpoints = [\"http://{upstream}\"]\nbreaker = { window = { count = 20 }, min_calls = 10, failure_rate = 50, open_for = \"1s\" }",
    ) + "slo = { availability = 99, latency = [{ percentile = 90, under = \"2s\" }] }\n\n\
        [[route]]\nname = \"rec\"\nmatch = { path_prefix = \"/rec\" }\nupstream = \"app\"\n\
        fallback = { on = [\"circuit_open\", \"retries_exhausted\"], body = \"[]\" }\n\n\
        [alerts]\nwindow_scale = 60\n";
    let env = envelope(&config, up.addr).await;
    let dir = TempDir::new();
    let (mut prom, port) = prometheus(&config.replace("{upstream}", &up.addr.to_string()), env.admin, &dir).await;
    // Steady traffic, 20 requests a second, for as long as the drill lasts.
    let addr = env.addr;
    let traffic = tokio::spawn(async move {
        loop {
            send(get(addr, "/api/drill")).await;
            send(get(addr, "/rec/drill")).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let page = |alerts: &[serde_json::Value]| {
        alerts.iter().any(|a| {
            a["state"] == "firing"
                && a["labels"]["envelope_slo"] == "availability"
                && a["labels"]["envelope_route"] == "api"
        })
    };
    // Healthy for a few seconds: no page.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!page(&alerts(port, "EnvelopeErrorBudgetBurnPage").await));
    // The outage: every request fails. The page fires within seconds.
    up.script("/api/drill", [support::Action::status(503)]);
    up.script("/rec/drill", [support::Action::status(503)]);
    let outage = Instant::now();
    let firing = |alerts: &[serde_json::Value]| alerts.iter().any(|a| a["state"] == "firing");
    let (mut paged, mut breaker, mut fallback) = (None, None, None);
    while paged.is_none() || breaker.is_none() || fallback.is_none() {
        if paged.is_none() && page(&alerts(port, "EnvelopeErrorBudgetBurnPage").await) {
            paged = Some(outage.elapsed());
        }
        if breaker.is_none() && firing(&alerts(port, "EnvelopeBreakerOpen").await) {
            breaker = Some(outage.elapsed());
        }
        if fallback.is_none() && firing(&alerts(port, "EnvelopeFallbacksInUse").await) {
            fallback = Some(outage.elapsed());
        }
        assert!(
            outage.elapsed() < Duration::from_secs(60),
            "the page, the breaker and the fallback alerts fire within a minute: {paged:?} {breaker:?} {fallback:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let fired_after = paged.unwrap_or_default();
    // Recovery: it clears once the short windows are clean.
    up.script("/api/drill", [support::Action::status(200)]);
    up.script("/rec/drill", [support::Action::status(200)]);
    let recovery = Instant::now();
    loop {
        if !page(&alerts(port, "EnvelopeErrorBudgetBurnPage").await) {
            break;
        }
        assert!(recovery.elapsed() < Duration::from_secs(90), "the page clears within 90 s of recovery");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "drill: paged {fired_after:?} after the outage (breaker alert {breaker:?}, fallback alert {fallback:?}), cleared {:?} after recovery",
        recovery.elapsed()
    );
    traffic.abort();
    let _ = prom.kill().await;
}

/// The alerts beyond burn rate, each seen firing in a real Prometheus during a scaled-down drill: retries taking a
/// large share of a route's attempts and running out of budget, timeouts, a bulkhead refusing calls, and a breaker
/// that keeps re-opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_sees_every_alert_beyond_burn_rate_fire() {
    let up = FaultUpstream::start().await;
    up.script("/retry/x", [support::Action::status(503)]);
    up.script("/slow/x", [support::Action::delayed(200, Duration::from_millis(300))]);
    up.script("/brk/x", [support::Action::status(503)]);
    // The admin and listener of CONFIG, then three upstreams and their routes.
    let head = &CONFIG[..CONFIG.find("[[upstream]]").unwrap()];
    let config = head.to_owned()
        + r#"[[upstream]]
name = "flaky"
endpoints = ["http://{upstream}"]

[[upstream]]
name = "narrow"
endpoints = ["http://{upstream}"]
bulkhead = { max_concurrent = 1 }

[[upstream]]
name = "down"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 20 }, min_calls = 4, failure_rate = 50, open_for = "1s" }

[[route]]
name = "retrying"
match = { path_prefix = "/retry" }
upstream = "flaky"
retry = { max_attempts = 3, base = "1ms", max_delay = "2ms" }

[[route]]
name = "slow"
match = { path_prefix = "/slow" }
upstream = "narrow"
timeout = "100ms"

[[route]]
name = "brk"
match = { path_prefix = "/brk" }
upstream = "down"

[alerts]
window_scale = 60
"#;
    let env = envelope(&config, up.addr).await;
    let dir = TempDir::new();
    let (mut prom, port) = prometheus(&config.replace("{upstream}", &up.addr.to_string()), env.admin, &dir).await;
    // Traffic on every route, two clients at a time (so the bulkhead of one has a call to refuse), for as long as
    // the drill lasts.
    let addr = env.addr;
    let traffic: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                loop {
                    for path in ["/retry/x", "/slow/x", "/brk/x"] {
                        send(get(addr, path)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let started = Instant::now();
    let expected = [
        ("EnvelopeRetryRatioHigh", "envelope_route", "retrying"),
        ("EnvelopeRetryBudgetExhausted", "envelope_route", "retrying"),
        ("EnvelopeTimeoutsHigh", "envelope_route", "slow"),
        ("EnvelopeBulkheadExhausted", "envelope_upstream", "narrow"),
        ("EnvelopeBreakerOpen", "envelope_upstream", "down"),
        ("EnvelopeBreakerFlapping", "envelope_upstream", "down"),
    ];
    let mut fired: Vec<Option<Duration>> = vec![None; expected.len()];
    while fired.iter().any(Option::is_none) {
        for (i, (name, label, value)) in expected.iter().enumerate() {
            if fired[i].is_none()
                && alerts(port, name).await.iter().any(|a| a["state"] == "firing" && a["labels"][label] == *value)
            {
                fired[i] = Some(started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_secs(90) {
            let (_, _, metrics) = send(get(env.admin, "/metrics")).await;
            let metrics = String::from_utf8_lossy(&metrics);
            let counters = metrics.lines().filter(|l| {
                ["envelope_requests_total", "envelope_retries", "envelope_timeouts", "envelope_bulkhead_rejections"]
                    .iter()
                    .any(|m| l.starts_with(m))
            });
            panic!(
                "every alert fires within 90 s: {:?}; {:?}",
                expected.iter().zip(&fired).map(|((n, _, _), f)| (n, f)).collect::<Vec<_>>(),
                counters.collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nothing fires for a route or upstream it does not concern.
    for (name, label, value) in expected {
        let wrong: Vec<_> = alerts(port, name).await.into_iter().filter(|a| a["labels"][label] != value).collect();
        assert!(wrong.is_empty(), "{name} fired elsewhere: {wrong:?}");
    }
    eprintln!(
        "drill: {:?}",
        expected.iter().zip(&fired).map(|((n, _, _), f)| (n, f.unwrap_or_default())).collect::<Vec<_>>()
    );
    for t in traffic {
        t.abort();
    }
    let _ = prom.kill().await;
}
