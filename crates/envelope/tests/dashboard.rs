//! The dashboard page, driven in headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `scripts/test.sh` installs) through WebDriver: what the page shows is checked against the JSON API it is built
//! from, and a screenshot is saved to `target/dashboard.png`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{Action, Envelope, FaultUpstream, TempDir, envelope_with_env, get, send};
use tokio::process::{Child, Command};

const TOKEN: &str = "dash-token";

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"
access_log = false

[[upstream]]
name = "app"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 50 }, min_calls = 50, failure_rate = 50, open_for = "30s" }

[[upstream]]
name = "payments"
endpoints = ["http://{upstream}"]
breaker = { window = { count = 50 }, min_calls = 50, failure_rate = 50, open_for = "30s" }

[[route]]
name = "api"
match = { path_prefix = "/api" }
upstream = "app"

[[route]]
name = "payments"
match = { path_prefix = "/payments" }
upstream = "payments"
tier = "critical"

[history]
path = ":memory:"
flush_interval = "100ms"

[[scenario]]
name = "api stays up"
route = "api"
expect = { success_rate = 85 }
"#;

/// A WebDriver session on a chromedriver started for the test.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: TempDir,
}

async fn webdriver(method: http::Method, url: &str, body: Option<Value>) -> Value {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), support::client().request(req))
        .await
        .expect("chromedriver answers within 60 s")
        .expect("chromedriver is reachable");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)))
}

impl Browser {
    async fn start() -> Browser {
        for binary in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: run ./scripts/test.sh, which installs Debian's chromium and chromium-driver"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let req = Request::get(format!("{base}/status")).body(Full::new(Bytes::new())).unwrap();
                if let Ok(resp) = support::client().request(req).await {
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                    if v["value"]["ready"] == true {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "chromedriver ready within 20 s");
        let profile = TempDir::new();
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1700",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .chain([format!("--user-data-dir={}", profile.0.display())])
        .collect::<Vec<_>>();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let v = webdriver(http::Method::POST, &format!("{base}/session"), Some(caps)).await;
        let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_owned();
        Browser { driver, base, session, _profile: profile }
    }

    async fn go(&self, url: &str) {
        let v = webdriver(
            http::Method::POST,
            &format!("{}/session/{}/url", self.base, self.session),
            Some(json!({ "url": url })),
        )
        .await;
        assert!(v["value"].is_null(), "navigation failed: {v}");
    }

    /// Runs `script` in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        let url = format!("{}/session/{}/execute/sync", self.base, self.session);
        let v = webdriver(http::Method::POST, &url, Some(json!({ "script": script, "args": [] }))).await;
        v["value"].clone()
    }

    /// The text of the element with `data-testid` = `id`.
    async fn text(&self, id: &str) -> String {
        let v = self.eval(&format!("return document.querySelector('[data-testid=\"{id}\"]').textContent")).await;
        v.as_str().unwrap_or_default().to_owned()
    }

    async fn refreshes(&self) -> u64 {
        self.eval("return Number(document.body.dataset.refreshed || 0)").await.as_u64().unwrap_or(0)
    }

    /// Waits (up to 20 s) until the page has refreshed at least twice more, so it shows data fetched after now.
    async fn wait_for_fresh_data(&self) {
        let now = self.refreshes().await;
        let fresh = tokio::time::timeout(Duration::from_secs(20), async {
            while self.refreshes().await < now + 2 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(fresh.is_ok(), "the page refreshes by itself: {}", self.text("error").await);
    }

    async fn screenshot(&self, path: &std::path::Path) -> usize {
        let v = webdriver(http::Method::GET, &format!("{}/session/{}/screenshot", self.base, self.session), None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v["value"].as_str().unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::write(path, &png).unwrap();
        png.len()
    }

    async fn close(mut self) {
        webdriver(http::Method::DELETE, &format!("{}/session/{}", self.base, self.session), None).await;
        let _ = self.driver.kill().await;
    }
}

async fn api(admin: SocketAddr, path: &str) -> Value {
    let (_, _, body) = send(get(admin, path)).await;
    serde_json::from_slice(&body).unwrap()
}

/// Sums a field of every route's history over the last hour, as the page does.
async fn last_hour(env: &Envelope, field: &str) -> u64 {
    let mut sum = 0;
    for route in ["api", "payments"] {
        let h = api(env.admin, &format!("/api/v1/history?route={route}&minutes=60")).await;
        sum += h["points"].as_array().unwrap().iter().map(|p| p[field].as_u64().unwrap()).sum::<u64>();
    }
    sum
}

fn percent(x: f64, digits: usize) -> String {
    format!("{:.*} %", digits, x * 100.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_says_in_a_real_browser() {
    let up = FaultUpstream::start().await;
    up.script("/api/fail", [Action::status(500)]);
    let env = envelope_with_env(CONFIG, up.addr, &[("ENVELOPE_ADMIN_TOKEN", TOKEN)]).await;
    for _ in 0..30 {
        send(get(env.addr, "/api/ok")).await;
    }
    for _ in 0..4 {
        send(get(env.addr, "/api/fail")).await;
    }
    for _ in 0..6 {
        send(get(env.addr, "/payments/charge")).await;
    }
    // An operator forces the payments breaker open: the page must show it.
    let force = Request::post(format!("http://{}/api/v1/breakers/payments/force-open", env.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(force).await;
    for _ in 0..3 {
        send(get(env.addr, "/payments/charge")).await;
    }
    // Everything is in the history before the page is compared with it.
    tokio::time::timeout(Duration::from_secs(10), async {
        while last_hour(&env, "requests").await < 43 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the history holds the 43 requests within 10 s");

    let browser = Browser::start().await;
    browser.go(&format!("http://{}/dashboard?refresh=300", env.admin)).await;
    browser.wait_for_fresh_data().await;

    // Health cards against the history.
    assert_eq!(browser.text("ready").await, "ready");
    assert_eq!(browser.text("requests").await, last_hour(&env, "requests").await.to_string());
    assert_eq!(browser.text("requests").await, "43");
    assert_eq!(browser.text("errors").await, last_hour(&env, "errors").await.to_string());
    assert_eq!(browser.text("errors").await, "7", "the four 500s and the three rejections");
    assert_eq!(browser.text("rejected").await, "3", "three calls rejected by the forced-open breaker");
    assert_eq!(browser.text("open-breakers").await, "1");
    assert_eq!(
        browser.eval("return document.querySelectorAll('[data-testid=chart] polyline').length").await,
        json!(6),
        "three series per route"
    );

    // SLO rows against /api/v1/slo.
    let slo = api(env.admin, "/api/v1/slo").await;
    for s in slo.as_array().unwrap() {
        let route = s["route"].as_str().unwrap();
        let budget = browser
            .eval(&format!(
                "return document.querySelector('[data-testid=slo-row][data-route=\"{route}\"] [data-testid=budget]').textContent"
            ))
            .await;
        assert_eq!(budget, json!(percent(s["error_budget_remaining"].as_f64().unwrap(), 1)), "{route}");
    }

    // Breaker rows against /api/v1/breakers.
    let breakers = api(env.admin, "/api/v1/breakers").await;
    for b in breakers.as_array().unwrap() {
        let upstream = b["upstream"].as_str().unwrap();
        let state = browser
            .eval(&format!(
                "return document.querySelector('[data-testid=breaker-row][data-upstream=\"{upstream}\"] [data-testid=state]').textContent"
            ))
            .await;
        assert_eq!(state, b["state"], "{upstream}");
    }
    assert_eq!(breakers[1]["state"], "forced_open");
    // The transition is listed, as /api/v1/events has it.
    let events = api(env.admin, "/api/v1/events").await;
    let shown = browser
        .eval("return [...document.querySelectorAll('[data-testid=event-row]')].map(r => [...r.cells].slice(1).map(c => c.textContent).join(' '))")
        .await;
    assert_eq!(shown, json!(["payments closed forced_open"]), "{events}");

    // Scenario verdicts against /api/v1/scenarios.
    let scenarios = api(env.admin, "/api/v1/scenarios").await;
    let verdict = browser
        .eval("return document.querySelector('[data-testid=scenario-row] [data-testid=verdict]').textContent")
        .await;
    assert_eq!(verdict, scenarios[0]["measures"][0]["verdict"]);
    assert_eq!(verdict, json!("PASS"), "30 of 34 api requests served is 88 % >= 85 %: {scenarios}");

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard.png");
    let size = browser.screenshot(&shot).await;
    assert!(size > 20_000, "a rendered page, not a blank one ({size} bytes)");
    browser.close().await;
}
