//! `envelope demo`: the sidecar in front of a built-in flaky service, under a bounded load, with a running
//! commentary of what the envelope does. Everything runs in this process on 127.0.0.1 and stops by itself.
//!
//! The flaky service goes through scripted incidents — healthy, an error burst, a latency spike, an outage,
//! recovery — while a load generator sends a fixed rate of requests through the sidecar. Each second the demo prints
//! what clients got (by outcome), how many requests reached the service, the retries spent and the breaker state,
//! read from the sidecar's own admin API. Half the requests go to a route with a fallback (a static answer), which
//! takes over while the service is failing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::control::server::Sidecar;
use crate::tools::verify::Probe;

/// One scripted phase of the flaky service.
#[derive(Debug, Clone, Copy)]
struct Phase {
    name: &'static str,
    seconds: u64,
    error_percent: u64,
    latency_ms: u64,
    down: bool,
}

const SCRIPT: [Phase; 5] = [
    Phase { name: "healthy", seconds: 4, error_percent: 1, latency_ms: 10, down: false },
    Phase { name: "error burst", seconds: 5, error_percent: 60, latency_ms: 10, down: false },
    Phase { name: "latency spike", seconds: 5, error_percent: 0, latency_ms: 700, down: false },
    Phase { name: "outage", seconds: 5, error_percent: 0, latency_ms: 0, down: true },
    Phase { name: "recovery", seconds: 6, error_percent: 0, latency_ms: 10, down: false },
];

/// Requests per second sent through the sidecar.
const RATE: u64 = 50;

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "demo"
listen = "127.0.0.1:0"
max_concurrent = 64
access_log = false

[[upstream]]
name = "flaky"
endpoints = ["http://{upstream}"]
bulkhead = { max_concurrent = 16, queue = 8, queue_timeout = "20ms" }
breaker = { window = { count = 20 }, min_calls = 10, failure_rate = 50, open_for = "2s", half_open_calls = 3 }

[[route]]
name = "prices"
match = { path_prefix = "/" }
upstream = "flaky"
timeout = "1s"
attempt_timeout = "300ms"
retry = { max_attempts = 3, base = "20ms", max_delay = "200ms", budget = { ratio = 0.2, min_per_second = 5 } }

[[route]]
name = "recommendations"
match = { path_prefix = "/recommendations" }
upstream = "flaky"
timeout = "1s"
attempt_timeout = "300ms"
retry = { max_attempts = 2, base = "20ms", max_delay = "200ms" }
fallback = { on = ["circuit_open", "retries_exhausted", "timeout", "bulkhead_full"], body = '{"items": ["bestsellers"]}', headers = { "content-type" = "application/json" } }

[history]
path = ":memory:"
flush_interval = "1s"

[[scenario]]
name = "prices stay available and fail fast"
route = "prices"
expect = { success_rate = 95, fast_fail_p99 = "50ms" }
window = "1m"
"#;

/// Runs the demo to completion (about 25 seconds), printing as it goes.
pub async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let phase = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let upstream = start_flaky(phase.clone(), hits.clone()).await?;
    let config = Config::parse("built-in demo config", &CONFIG.replace("{upstream}", &upstream.to_string()))?;
    let sidecar = Sidecar::start(config).await?;
    let proxy = sidecar.addrs()[0];
    let admin = sidecar.admin_addr();
    println!("envelope demo: sidecar on {proxy} (admin {admin}) in front of a flaky service on {upstream}");
    println!("{RATE} requests/s; the service goes through: {}", SCRIPT.map(|p| p.name).join(" -> "));
    println!("dashboard while it runs: http://{admin}/");
    println!();
    println!(
        "{:>4}  {:<14} {:>5} {:>5} {:>8} {:>8} {:>8} {:>5} {:>8} {:>9} {:>8}  breaker",
        "t", "phase", "sent", "ok", "5xx", "timeout", "open", "shed", "fallback", "svc hits", "retries"
    );

    let probe = Probe::new();
    let tally: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut totals: Vec<(Phase, BTreeMap<String, u64>, usize, u64)> = Vec::new();
    let mut second = 0u64;
    let mut last_retries = probe.metric(admin, "envelope_retries_total", "").await;
    for (i, p) in SCRIPT.iter().enumerate() {
        phase.store(i, Ordering::Relaxed);
        let hits_before = hits.load(Ordering::Relaxed);
        let retries_before = last_retries;
        let mut phase_tally = BTreeMap::new();
        for _ in 0..p.seconds {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let hits_at = hits.load(Ordering::Relaxed);
            let mut pending = Vec::new();
            for n in 0..RATE {
                tick.tick().await;
                let (probe, tally) = (probe.clone(), tally.clone());
                // Every other request asks for recommendations, whose route has a fallback.
                let path = if n % 2 == 0 { "/price" } else { "/recommendations" };
                pending.push(tokio::spawn(async move {
                    let req = Request::get(format!("http://{proxy}{path}")).body(Full::new(Bytes::new()));
                    let outcome = match req {
                        Ok(req) => probe.send(req).await.outcome,
                        Err(_) => "error".to_owned(),
                    };
                    *tally.lock().unwrap_or_else(|e| e.into_inner()).entry(outcome).or_default() += 1;
                }));
            }
            for t in pending {
                let _ = t.await;
            }
            second += 1;
            let this: BTreeMap<String, u64> = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
            for (k, v) in &this {
                *phase_tally.entry(k.clone()).or_default() += v;
            }
            let retries = probe.metric(admin, "envelope_retries_total", "").await;
            let state = breaker_state(&probe, admin).await;
            let n = |k: &str| this.get(k).copied().unwrap_or(0);
            println!(
                "{:>3}s  {:<14} {:>5} {:>5} {:>8} {:>8} {:>8} {:>5} {:>8} {:>9} {:>8}  {}",
                second,
                p.name,
                this.values().sum::<u64>(),
                n("ok"),
                n("upstream_5xx") + n("connect_error") + n("upstream_reset"),
                n("timeout"),
                n("circuit_open"),
                n("shed") + n("bulkhead_full"),
                n("fallback"),
                hits.load(Ordering::Relaxed) - hits_at,
                (retries - last_retries) as u64,
                state
            );
            last_retries = retries;
        }
        totals.push((
            *p,
            phase_tally,
            hits.load(Ordering::Relaxed) - hits_before,
            (last_retries - retries_before) as u64,
        ));
    }
    // The quality scenario, judged by the sidecar on the last minute of traffic (after one more history flush).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let scenarios = probe.get(admin, "/api/v1/scenarios").await.map(|(_, t)| t).unwrap_or_default();
    let scenarios: serde_json::Value = serde_json::from_str(&scenarios).unwrap_or_default();
    sidecar.shutdown().await;

    println!();
    println!("What the envelope did, per phase:");
    for (p, t, svc_hits, retries) in &totals {
        let sent: u64 = t.values().sum();
        let ok = t.get("ok").copied().unwrap_or(0);
        let open = t.get("circuit_open").copied().unwrap_or(0);
        let fallback = t.get("fallback").copied().unwrap_or(0);
        println!(
            "  {:<14} {:>4} requests, {:>3.0} % ok; the service saw {:>4} calls ({} retries); {:>4} fast-failed by the open breaker; {:>4} answered by the fallback",
            p.name,
            sent,
            ok as f64 * 100.0 / sent.max(1) as f64,
            svc_hits,
            retries,
            open,
            fallback
        );
    }
    println!();
    println!("During the outage the breaker kept the dead service from being called (fast 503s with Retry-After);");
    println!("half-open probes found it healthy again and traffic recovered without a flood of retries.");
    println!("Recommendations never failed: their route's fallback answered in the service's place, marked");
    println!("`Envelope-Fallback: <reason>` and counted in envelope_fallbacks_total.");
    println!();
    for s in scenarios.as_array().into_iter().flatten() {
        println!(
            "Quality scenario \"{}\" over the last minute: {}",
            s["name"].as_str().unwrap_or(""),
            s["verdict"].as_str().unwrap_or("")
        );
        for m in s["measures"].as_array().into_iter().flatten() {
            println!(
                "  {:<14} {:<12} measured {:<18} {}",
                m["measure"].as_str().unwrap_or(""),
                m["target"].as_str().unwrap_or(""),
                m["measured"].as_str().unwrap_or(""),
                m["verdict"].as_str().unwrap_or("")
            );
        }
        println!("  (the dashboard shows such promises live; `envelope verify` checks them in CI)");
    }
    Ok(())
}

async fn breaker_state(probe: &Probe, admin: SocketAddr) -> String {
    let text = probe.get(admin, "/api/v1/breakers").await.map(|(_, t)| t).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v[0]["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The flaky service: its behaviour follows the current phase.
async fn start_flaky(phase: Arc<AtomicUsize>, hits: Arc<AtomicUsize>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (phase, hits) = (phase.clone(), hits.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let p = SCRIPT[phase.load(Ordering::Relaxed).min(SCRIPT.len() - 1)];
                    hits.fetch_add(1, Ordering::Relaxed);
                    async move {
                        drop(req);
                        if p.down {
                            // The service is down: the connection is reset without an answer.
                            return Err(std::io::Error::other("down"));
                        }
                        tokio::time::sleep(Duration::from_millis(p.latency_ms)).await;
                        let status = if fastrand::u64(0..100) < p.error_percent {
                            StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            StatusCode::OK
                        };
                        let mut r = Response::new(Full::new(Bytes::from_static(b"{\"price\": 42}")));
                        *r.status_mut() = status;
                        Ok::<_, std::io::Error>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}
