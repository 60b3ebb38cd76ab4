//! `envelope verify`: runs each quality scenario of a config against a running sidecar — injects the scenario's
//! fault through the sidecar's admin API, drives a bounded load at the scenario's route, measures what the clients
//! saw, takes the fault away — and judges the response measures. Meant for CI: the table says PASS or FAIL per
//! measure and the exit status says whether every scenario passed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use envelope_core::Outcome;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{Config, Scenario};
use crate::observe::quality::{Judged, Measured, Verdict, is_fast_fail, judge};

/// The longest `envelope verify` waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than the load a fault is set for: it ends by itself even if `verify` is killed.
const FAULT_GRACE: Duration = Duration::from_secs(10);

/// A small HTTP/1.1 client for talking to a sidecar: its listeners and its admin API.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    client: Client<HttpConnector, Full<Bytes>>,
}

/// How one request ended, as a client sees it.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// The status, or `None` if the request failed at the transport (or timed out).
    pub(crate) status: Option<u16>,
    /// `fallback` for a fallback's answer (it says so in a header); `ok` for a 2xx; the `outcome` of a problem
    /// document; else `status_<code>`, or `error`.
    pub(crate) outcome: String,
    /// The attempts the envelope made, as its problem document says (`None` for any other answer).
    pub(crate) attempts: Option<u32>,
    pub(crate) latency: Duration,
}

impl Probe {
    pub(crate) fn new() -> Probe {
        Probe { client: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// Sends `req` and reads the whole answer (within [`ANSWER_TIMEOUT`]).
    pub(crate) async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let start = Instant::now();
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            let resp = self.client.request(req).await.ok()?;
            let status = resp.status();
            let problem = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == "application/problem+json");
            let fallback = resp.headers().contains_key(crate::data::proxy::FALLBACK_HEADER);
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            let doc = problem.then(|| serde_json::from_slice::<serde_json::Value>(&body).ok()).flatten();
            let attempts = doc.as_ref().and_then(|d| d["attempts"].as_u64()).map(|n| n as u32);
            let outcome = if fallback {
                Outcome::Fallback.as_str().to_owned()
            } else if status.is_success() {
                "ok".to_owned()
            } else if let Some(o) = doc.as_ref().and_then(|v| v["outcome"].as_str().map(str::to_owned)) {
                o
            } else {
                format!("status_{}", status.as_u16())
            };
            Some((status.as_u16(), outcome, attempts))
        })
        .await
        .ok()
        .flatten();
        let latency = start.elapsed();
        match answer {
            Some((status, outcome, attempts)) => Answer { status: Some(status), outcome, attempts, latency },
            None => Answer { status: None, outcome: "error".to_owned(), attempts: None, latency },
        }
    }

    /// `GET http://addr/path`: status and body text.
    pub(crate) async fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        let req =
            Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        self.text(req).await
    }

    async fn text(&self, req: Request<Full<Bytes>>) -> Result<(u16, String), String> {
        let uri = req.uri().clone();
        let resp = tokio::time::timeout(ANSWER_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("{uri}: no answer within {ANSWER_TIMEOUT:?}"))?
            .map_err(|e| format!("{uri}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("{uri}: {e}"))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The sum of the samples of `family` whose labels contain `filter`, from the admin's `/metrics`.
    pub(crate) async fn metric(&self, admin: SocketAddr, family: &str, filter: &str) -> f64 {
        let Ok((_, text)) = self.get(admin, "/metrics").await else { return 0.0 };
        text.lines()
            .filter(|l| l.strip_prefix(family).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
            .filter(|l| l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Where the sidecar runs, when the config's addresses are not the ones to use (e.g. port 0).
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The listener to send the load to (default: the listen address of the scenario's route's listener).
    pub proxy: Option<SocketAddr>,
    /// The admin listener (default: `admin.listen`).
    pub admin: Option<SocketAddr>,
    /// The admin bearer token, needed for scenarios that inject a fault.
    pub token: Option<String>,
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// Requests sent.
    pub sent: u64,
    /// Requests not sent because `concurrency` requests were still in flight.
    pub skipped: u64,
    /// What was measured.
    pub measured: Measured,
    /// Each measure, judged.
    pub judged: Vec<Judged>,
}

impl Report {
    /// Every measure passed. A measure without data fails here: the scenario's stimulus was meant to produce it.
    pub fn passed(&self) -> bool {
        self.judged.iter().all(|j| j.verdict == Verdict::Pass)
    }
}

fn usable(addr: SocketAddr, what: &str) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err(format!("the config's {what} listens on port 0: give its real address"));
    }
    Ok(addr)
}

/// Runs the scenarios of `config` (only the one named `only`, if given) one after the other.
pub async fn run(config: &Config, target: &Target, only: Option<&str>) -> Result<Vec<Report>, String> {
    let scenarios: Vec<&Scenario> = config.scenarios.iter().filter(|s| only.is_none_or(|o| o == s.name)).collect();
    if scenarios.is_empty() {
        return Err(match only {
            Some(name) => format!("no scenario named `{name}`"),
            None => "the config declares no scenario".to_owned(),
        });
    }
    let admin = match target.admin {
        Some(a) => a,
        None => usable(config.admin.listen, "admin listener")?,
    };
    let probe = Probe::new();
    match probe.get(admin, "/healthz").await {
        Ok((200, _)) => {}
        Ok((status, _)) => return Err(format!("the sidecar's admin at {admin} answered /healthz with {status}")),
        Err(e) => return Err(format!("cannot reach the sidecar's admin at {admin}: {e}")),
    }
    let mut reports = Vec::new();
    for s in scenarios {
        let route = config.routes.iter().find(|r| r.name == s.route).ok_or("validated")?;
        let proxy = match target.proxy {
            Some(p) => p,
            None => usable(config.listeners[route.listener].listen, "listener")?,
        };
        reports.push(run_one(&probe, s, proxy, admin, target.token.as_deref()).await?);
    }
    Ok(reports)
}

async fn run_one(
    probe: &Probe,
    s: &Scenario,
    proxy: SocketAddr,
    admin: SocketAddr,
    token: Option<&str>,
) -> Result<Report, String> {
    let counter = |name: &str| format!("counter=\"{name}\"");
    let mut before = BTreeMap::new();
    for (name, _) in &s.expect.counters {
        before.insert(name.clone(), probe.metric(admin, "envelope_business_events_total", &counter(name)).await);
    }
    if let Some(f) = &s.fault {
        let token = token.ok_or_else(|| {
            format!("scenario `{}` injects a fault: the admin token is needed (ENVELOPE_ADMIN_TOKEN)", s.name)
        })?;
        let body = json!({
            "abort_status": f.abort_status,
            "abort_percent": f.abort_percent,
            "delay_ms": f.delay.map(|d| d.as_millis() as u64),
            "delay_percent": f.delay_percent,
            "duration_ms": (s.duration + FAULT_GRACE).as_millis() as u64,
        });
        let req = Request::post(format!("http://{admin}/api/v1/faults/{}", f.upstream))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        match probe.text(req).await? {
            (200, _) => {}
            (status, text) => return Err(format!("injecting the fault of `{}` failed: {status} {text}", s.name)),
        }
    }

    let (answers, sent, skipped) = drive(probe, s, proxy).await;

    if let (Some(f), Some(token)) = (&s.fault, token) {
        let req = Request::delete(format!("http://{admin}/api/v1/faults/{}", f.upstream))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        probe.text(req).await?;
    }
    let mut counters = BTreeMap::new();
    for (name, was) in before {
        let now = probe.metric(admin, "envelope_business_events_total", &counter(&name)).await;
        counters.insert(name, (now - was).max(0.0) as u64);
    }
    let measured = measure(&answers, counters);
    let judged = judge(&s.expect, &measured);
    Ok(Report { name: s.name.clone(), sent, skipped, measured, judged })
}

/// Sends `rate` requests per second for `duration`, never more than `concurrency` at a time; waits for them all.
async fn drive(probe: &Probe, s: &Scenario, proxy: SocketAddr) -> (Vec<Answer>, u64, u64) {
    let total = (f64::from(s.rate) * s.duration.as_secs_f64()).round() as u64;
    let answers = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let permits = Arc::new(Semaphore::new(s.concurrency as usize));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(s.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut sent, mut skipped) = (0, 0);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        sent += 1;
        let req = Request::builder()
            .method(s.method.clone())
            .uri(format!("http://{proxy}{}", s.path))
            .body(Full::new(Bytes::new()))
            .expect("method and path were validated");
        let (probe, answers) = (probe.clone(), answers.clone());
        tasks.spawn(async move {
            let answer = probe.send(req).await;
            answers.lock().unwrap_or_else(PoisonError::into_inner).push(answer);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(PoisonError::into_inner));
    (answers, sent, skipped)
}

/// The 99th percentile (nearest rank) of `latencies`.
fn p99(mut latencies: Vec<Duration>) -> Option<Duration> {
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_unstable();
    let rank = ((latencies.len() as f64) * 0.99).ceil() as usize;
    latencies.get(rank.saturating_sub(1)).copied()
}

fn measure(answers: &[Answer], counters: BTreeMap<String, u64>) -> Measured {
    let served = |a: &Answer| a.status.is_some_and(|s| s < 500 && s != 429);
    // Refused before any attempt, as the envelope's own answer says.
    let fast_fail =
        |a: &Answer| a.attempts.is_some_and(|n| Outcome::from_name(&a.outcome).is_some_and(|o| is_fast_fail(o, n)));
    Measured {
        requests: answers.len() as u64,
        served: answers.iter().filter(|a| served(a)).count() as u64,
        p99: p99(answers.iter().map(|a| a.latency).collect()),
        fast_failed: answers.iter().filter(|a| fast_fail(a)).count() as u64,
        fast_fail_p99: p99(answers.iter().filter(|a| fast_fail(a)).map(|a| a.latency).collect()),
        counters,
    }
}

/// The PASS/FAIL table `envelope verify` prints.
pub fn table(reports: &[Report]) -> String {
    let mut rows =
        vec![["scenario".to_owned(), "measure".into(), "target".into(), "measured".into(), "verdict".into()]];
    for r in reports {
        for (i, j) in r.judged.iter().enumerate() {
            let verdict = if j.verdict == Verdict::NoData { "FAIL (no data)" } else { j.verdict.as_str() };
            let name = if i == 0 { r.name.clone() } else { String::new() };
            rows.push([name, j.measure.clone(), j.target.clone(), j.measured.clone(), verdict.to_owned()]);
        }
    }
    let widths: Vec<usize> = (0..5).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for r in reports {
        out.push_str(&format!(
            "{}: {} requests sent, {} skipped (concurrency limit), {} fast-failed\n",
            r.name, r.sent, r.skipped, r.measured.fast_failed
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_nearest_rank() {
        assert_eq!(p99(vec![]), None);
        let ms = |n| Duration::from_millis(n);
        assert_eq!(p99((1..=100).map(ms).collect()), Some(ms(99)));
        assert_eq!(p99((1..=10).map(ms).collect()), Some(ms(10)));
        assert_eq!(p99(vec![ms(5)]), Some(ms(5)));
    }

    #[test]
    fn served_and_fast_failed_are_told_apart() {
        let a = |status: Option<u16>, outcome: &str, attempts: Option<u32>, ms: u64| Answer {
            status,
            outcome: outcome.to_owned(),
            attempts,
            latency: Duration::from_millis(ms),
        };
        let answers = [
            a(Some(200), "ok", None, 10),
            a(Some(404), "status_404", None, 10),
            a(Some(503), "circuit_open", Some(0), 1),
            a(Some(429), "shed", Some(0), 2),
            a(Some(502), "connect_error", Some(3), 30),
            a(None, "error", None, 30_000),
            // Retried until the breaker opened: refused, but not fast.
            a(Some(503), "circuit_open", Some(2), 400),
        ];
        let m = measure(&answers, BTreeMap::new());
        assert_eq!((m.requests, m.served, m.fast_failed), (7, 2, 2));
        assert_eq!(m.fast_fail_p99, Some(Duration::from_millis(2)));
        assert_eq!(m.p99, Some(Duration::from_secs(30)));
        let unknown = [a(Some(503), "circuit_open", None, 1)];
        assert_eq!(measure(&unknown, BTreeMap::new()).fast_failed, 0, "without the attempts, not known to be fast");
    }
}
