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
    let config_path = dir.0.join("envelope.toml");
    std::fs::write(&config_path, CONFIG.replace("{upstream}", &up.addr.to_string())).unwrap();
    let rules = std::process::Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["generate", "rules", "--config", config_path.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::write(dir.0.join("rules.yaml"), &rules.stdout).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        dir.0.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: envelope\n    static_configs:\n      - targets: ['{}']\n",
            env.admin
        ),
    )
    .unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
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
