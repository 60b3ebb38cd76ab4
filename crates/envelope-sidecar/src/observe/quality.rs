//! Quality scenarios: response measures judged against what was measured — by `envelope verify` on the load it
//! drives, and by the sidecar on live traffic over each scenario's window
//! (`/api/v1/scenarios`, the dashboard).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use envelope_core::Outcome;

use crate::config::{Expect, Scenario};

/// Whether a request was failed fast: rejected by the envelope before any attempt (open breaker, full bulkhead,
/// shed, rate limited), what `fast_fail_p99` measures on both sides. A request that first went through attempts
/// and waits (say, retries until the breaker opened) is not, whatever its outcome: its time is not the envelope's
/// rejection time.
pub(crate) fn is_fast_fail(outcome: Outcome, attempts: u32) -> bool {
    attempts == 0 && outcome.is_local_rejection()
}

/// What was measured for one scenario.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    /// Requests answered (or failed at the transport).
    pub requests: u64,
    /// Of those, served: not a 5xx, not a 429, not a transport failure.
    pub served: u64,
    /// 99th percentile latency of every request.
    pub p99: Option<Duration>,
    /// Requests the envelope rejected before any attempt (open breaker, full bulkhead, shed, rate limited).
    pub fast_failed: u64,
    /// 99th percentile latency of those.
    pub fast_fail_p99: Option<Duration>,
    /// Growth of each business counter.
    pub counters: BTreeMap<String, u64>,
}

/// How one measure came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The measure holds.
    Pass,
    /// It does not.
    Fail,
    /// Nothing to judge it on (no requests, or none rejected for a fast-fail measure).
    NoData,
}

impl Verdict {
    /// `PASS`, `FAIL` or `NO DATA`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::NoData => "NO DATA",
        }
    }
}

/// One measure of a scenario, judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    /// `success_rate`, `p99`, `fast_fail_p99` or `counter <name>`.
    pub measure: String,
    /// What the scenario promises, readable (`>= 95 %`).
    pub target: String,
    /// What was measured, readable.
    pub measured: String,
    /// The verdict.
    pub verdict: Verdict,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Judges every measure `expect` gives against `m`.
pub fn judge(expect: &Expect, m: &Measured) -> Vec<Judged> {
    let mut out = Vec::new();
    let latency = |out: &mut Vec<Judged>, name: &str, limit: Option<Duration>, value: Option<Duration>| {
        if let Some(limit) = limit {
            out.push(Judged {
                measure: name.to_owned(),
                target: format!("< {}", ms(limit)),
                measured: value.map_or_else(|| "-".to_owned(), ms),
                verdict: match value {
                    None => Verdict::NoData,
                    Some(v) if v < limit => Verdict::Pass,
                    Some(_) => Verdict::Fail,
                },
            });
        }
    };
    if let Some(min) = expect.success_rate {
        let rate = (m.requests > 0).then(|| m.served as f64 * 100.0 / m.requests as f64);
        out.push(Judged {
            measure: "success_rate".to_owned(),
            target: format!(">= {min} %"),
            measured: rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.2} % of {}", m.requests)),
            verdict: match rate {
                None => Verdict::NoData,
                Some(r) if r >= min => Verdict::Pass,
                Some(_) => Verdict::Fail,
            },
        });
    }
    latency(&mut out, "p99", expect.p99, m.p99.filter(|_| m.requests > 0));
    latency(&mut out, "fast_fail_p99", expect.fast_fail_p99, m.fast_fail_p99.filter(|_| m.fast_failed > 0));
    for (name, max) in &expect.counters {
        let grew = m.counters.get(name).copied();
        out.push(Judged {
            measure: format!("counter {name}"),
            target: format!("<= {max}"),
            measured: grew.map_or_else(|| "-".to_owned(), |g| g.to_string()),
            verdict: match grew {
                None => Verdict::NoData,
                Some(g) if g <= *max => Verdict::Pass,
                Some(_) => Verdict::Fail,
            },
        });
    }
    out
}

/// A scenario and its judged measures, as JSON for the admin API and the dashboard.
pub(crate) fn scenario_json(s: &Scenario, m: &Measured, judged: &[Judged]) -> Value {
    let overall = if judged.iter().any(|j| j.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if judged.iter().all(|j| j.verdict == Verdict::NoData) {
        Verdict::NoData
    } else {
        Verdict::Pass
    };
    json!({
        "name": s.name,
        "route": s.route,
        "window_seconds": s.window.as_secs(),
        "requests": m.requests,
        "verdict": overall.as_str(),
        "measures": judged.iter().map(|j| json!({
            "measure": j.measure,
            "target": j.target,
            "measured": j.measured,
            "verdict": j.verdict.as_str(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expect {
        Expect {
            success_rate: Some(95.0),
            p99: Some(Duration::from_millis(500)),
            fast_fail_p99: Some(Duration::from_millis(100)),
            counters: vec![("conflicts".to_owned(), 0)],
        }
    }

    #[test]
    fn each_measure_is_judged_at_its_boundary() {
        let mut m = Measured {
            requests: 100,
            served: 95,
            p99: Some(Duration::from_millis(499)),
            fast_failed: 3,
            fast_fail_p99: Some(Duration::from_millis(2)),
            counters: [("conflicts".to_owned(), 0)].into(),
        };
        let verdicts = |m: &Measured| judge(&expect(), m).iter().map(|j| j.verdict).collect::<Vec<_>>();
        assert_eq!(verdicts(&m), [Verdict::Pass; 4], "95 of 100 meets >= 95 %");
        m.served = 94;
        m.p99 = Some(Duration::from_millis(500));
        m.fast_fail_p99 = Some(Duration::from_millis(100));
        m.counters.insert("conflicts".to_owned(), 1);
        assert_eq!(verdicts(&m), [Verdict::Fail; 4], "94 %, p99 = limit, fast fail = limit, one conflict");
    }

    #[test]
    fn nothing_measured_is_no_data_not_a_pass() {
        let m = Measured::default();
        let j = judge(&expect(), &m);
        assert!(j.iter().all(|j| j.verdict == Verdict::NoData), "{j:?}");
        let busy_but_never_rejected =
            Measured { requests: 10, served: 10, p99: Some(Duration::from_millis(1)), ..Measured::default() };
        let j = judge(&expect(), &busy_but_never_rejected);
        assert_eq!(j[2].measure, "fast_fail_p99");
        assert_eq!(j[2].verdict, Verdict::NoData);
    }
}
