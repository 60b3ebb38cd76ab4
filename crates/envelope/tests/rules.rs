//! Generated Prometheus rules pass real promtool: `check rules`, and unit tests that feed synthetic series and
//! expect the burn-rate alerts to fire, to stay silent, and the absent-SLI and shared-state alerts to fire.

use std::process::Command;

const CONFIG: &str = r#"
[shared]
redis = "redis://127.0.0.1:6379"

[[listener]]
name = "in"
listen = "127.0.0.1:1"

[alerts]
runbook_base_url = "https://runbooks.example.com/envelope.md"

[[upstream]]
name = "app"
endpoints = ["http://127.0.0.1:2"]
breaker = { window = { count = 20 } }
bulkhead = { max_concurrent = 10 }

[[upstream]]
name = "replica"
endpoints = ["http://127.0.0.1:3"]

[[route]]
name = "api"
match = { path_prefix = "/api" }
upstream = "app"
fallback = { on = ["circuit_open"], upstream = "replica" }

[[route]]
name = "search"
match = { path_prefix = "/search" }
upstream = "app"
slo = { availability = 99.5, latency = [{ percentile = 95, under = "300ms" }, { percentile = 99, under = "1s" }] }
"#;

const TESTS: &str = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  # What breaks besides the SLO: retries, timeouts, the retry budget, the breaker, the bulkhead.
  - interval: 1m
    input_series:
      - series: 'envelope_requests_total{listener="in",route="api",outcome="ok",code="2xx"}'
        values: '0+100x30'
      - series: 'envelope_retries_total{route="api",outcome="upstream_5xx"}'
        values: '0+5x10 50+20x20'
      - series: 'envelope_timeouts_total{route="api"}'
        values: '0x10 0+10x20'
      - series: 'envelope_retries_given_up_total{route="api",reason="budget_exhausted"}'
        values: '0x20 1+1x10'
      - series: 'envelope_breaker_state{upstream="app",state="open"}'
        values: '0x10 1x20'
      - series: 'envelope_breaker_transitions_total{upstream="app",from="closed",to="open"}'
        values: '0x10 1x5 2x5 3x10'
      - series: 'envelope_bulkhead_rejections_total{upstream="app",waited="false"}'
        values: '0x10 0+5x20'
      - series: 'envelope_fallbacks_total{route="api",reason="circuit_open"}'
        values: '0x10 0+30x20'
    alert_rule_test:
      - eval_time: 9m
        alertname: EnvelopeRetryRatioHigh
        exp_alerts: []
      - eval_time: 27m
        alertname: EnvelopeRetryRatioHigh
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_route: api }
            exp_annotations:
              summary: "Route api retries more than 1 request in 10"
              runbook_url: "https://runbooks.example.com/envelope.md#enveloperetryratiohigh"
      - eval_time: 9m
        alertname: EnvelopeTimeoutsHigh
        exp_alerts: []
      - eval_time: 25m
        alertname: EnvelopeTimeoutsHigh
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_route: api }
            exp_annotations:
              summary: "Route api: more than 5 % of requests hit a timeout"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopetimeoutshigh"
      - eval_time: 19m
        alertname: EnvelopeRetryBudgetExhausted
        exp_alerts: []
      - eval_time: 25m
        alertname: EnvelopeRetryBudgetExhausted
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_route: api }
            exp_annotations:
              summary: "Route api ran out of retry budget: failures reach the clients unretried"
              runbook_url: "https://runbooks.example.com/envelope.md#enveloperetrybudgetexhausted"
      - eval_time: 10m
        alertname: EnvelopeBreakerOpen
        exp_alerts: []
      - eval_time: 13m
        alertname: EnvelopeBreakerOpen
        exp_alerts:
          - exp_labels: { severity: page, envelope_upstream: app }
            exp_annotations:
              summary: "The circuit breaker of upstream app is open: its calls fail fast"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopebreakeropen"
      - eval_time: 18m
        alertname: EnvelopeBreakerFlapping
        exp_alerts: []
      - eval_time: 25m
        alertname: EnvelopeBreakerFlapping
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_upstream: app }
            exp_annotations:
              summary: "The circuit breaker of upstream app opened 3 times or more in 30 minutes"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopebreakerflapping"
      - eval_time: 9m
        alertname: EnvelopeBulkheadExhausted
        exp_alerts: []
      - eval_time: 20m
        alertname: EnvelopeBulkheadExhausted
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_upstream: app }
            exp_annotations:
              summary: "The bulkhead of upstream app keeps refusing calls: it is full"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopebulkheadexhausted"
      - eval_time: 10m
        alertname: EnvelopeFallbacksInUse
        exp_alerts: []
      - eval_time: 20m
        alertname: EnvelopeFallbacksInUse
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_route: api }
            exp_annotations:
              summary: "Route api answers with its fallback: its upstream is failing"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopefallbacksinuse"
  # Distributed mode: one instance cannot reach Redis for two minutes; the ticket fires after a minute of it.
  - interval: 1m
    input_series:
      - series: 'envelope_shared_state_up{instance="a:9901"}'
        values: '1 1 0 0 0 1'
    alert_rule_test:
      - eval_time: 2m
        alertname: EnvelopeSharedStateDegraded
        exp_alerts: []
      - eval_time: 3m
        alertname: EnvelopeSharedStateDegraded
        exp_alerts:
          - exp_labels: { severity: ticket, instance: "a:9901" }
            exp_annotations:
              summary: "a:9901 cannot reach its shared state: its shared breakers and global limits decide alone"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopesharedstatedegraded"
      - eval_time: 5m
        alertname: EnvelopeSharedStateDegraded
        exp_alerts: []
  # Healthy for an hour, then a third of the calls fail: the page fires; before that, nothing does.
  - interval: 1m
    input_series:
      - series: 'envelope_requests_total{listener="in",route="api",outcome="ok",code="2xx"}'
        values: '0+100x120'
      - series: 'envelope_requests_total{listener="in",route="api",outcome="upstream_5xx",code="5xx"}'
        values: '0x60 50+50x60'
      - series: 'envelope_requests_total{listener="in",route="api",outcome="upstream_4xx",code="4xx"}'
        values: '0+30x120'
    alert_rule_test:
      - eval_time: 55m
        alertname: EnvelopeErrorBudgetBurnPage
        exp_alerts: []
      - eval_time: 55m
        alertname: EnvelopeErrorBudgetBurnTicket
        exp_alerts: []
      - eval_time: 100m
        alertname: EnvelopeErrorBudgetBurnPage
        exp_alerts:
          - exp_labels: { severity: page, envelope_route: api, envelope_slo: availability }
            exp_annotations:
              summary: "Route api is burning its error budget fast"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopeerrorbudgetburnpage"
  # Every call answers at once, but 40 % take longer than the default tier's 200 ms p95: the latency page fires.
  - interval: 1m
    input_series:
      - series: 'envelope_slo_slow_requests_total{route="api",under="0.2"}'
        values: '0+40x90'
      - series: 'envelope_requests_total{listener="in",route="api",outcome="ok",code="2xx"}'
        values: '0+100x90'
    alert_rule_test:
      - eval_time: 80m
        alertname: EnvelopeErrorBudgetBurnPage
        exp_alerts:
          - exp_labels: { severity: page, envelope_route: api, envelope_slo: latency, envelope_objective: p95_200ms }
            exp_annotations:
              summary: "Route api is burning its latency budget fast"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopeerrorbudgetburnpage"
  # A route's own SLO: 99.5 %, p95 under 300 ms and p99 under 1 s. 20 % slower than 1 s burns the p99's budget (1 %)
  # 20 times over: its page fires; the p95's (5 % allowed, burnt 4 times over) does not; 10 % errors against 0.5 %
  # page too.
  - interval: 1m
    input_series:
      - series: 'envelope_requests_total{listener="in",route="search",outcome="ok",code="2xx"}'
        values: '0+90x90'
      - series: 'envelope_requests_total{listener="in",route="search",outcome="upstream_5xx",code="5xx"}'
        values: '0+10x90'
      - series: 'envelope_slo_slow_requests_total{route="search",under="0.3"}'
        values: '0+20x90'
      - series: 'envelope_slo_slow_requests_total{route="search",under="1"}'
        values: '0+20x90'
    alert_rule_test:
      - eval_time: 80m
        alertname: EnvelopeErrorBudgetBurnPage
        exp_alerts:
          - exp_labels: { severity: page, envelope_route: search, envelope_slo: availability }
            exp_annotations:
              summary: "Route search is burning its error budget fast"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopeerrorbudgetburnpage"
          - exp_labels: { severity: page, envelope_route: search, envelope_slo: latency, envelope_objective: p99_1000ms }
            exp_annotations:
              summary: "Route search is burning its latency budget fast"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopeerrorbudgetburnpage"
  # 4xx answers and fallbacks' answers alone never spend the budget.
  - interval: 1m
    input_series:
      - series: 'envelope_requests_total{listener="in",route="api",outcome="upstream_4xx",code="4xx"}'
        values: '0+100x120'
      - series: 'envelope_requests_total{listener="in",route="api",outcome="fallback",code="2xx"}'
        values: '0+100x120'
    alert_rule_test:
      - eval_time: 100m
        alertname: EnvelopeErrorBudgetBurnPage
        exp_alerts: []
  # No metric at all: the SLI is missing.
  - interval: 1m
    input_series:
      - series: 'up{job="envelope"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 15m
        alertname: EnvelopeSLIMissing
        exp_alerts:
          - exp_labels: { severity: ticket, envelope_route: api, envelope_slo: availability, route: api }
            exp_annotations:
              summary: "No request metrics for route api: the SLO cannot be evaluated"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopeslimissing"
          - exp_labels: { severity: ticket, envelope_route: search, envelope_slo: availability, route: search }
            exp_annotations:
              summary: "No request metrics for route search: the SLO cannot be evaluated"
              runbook_url: "https://runbooks.example.com/envelope.md#envelopeslimissing"
"#;

#[test]
fn generated_rules_pass_promtool_check_and_unit_tests() {
    let dir = std::env::temp_dir().join(format!("envelope-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("envelope.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["generate", "rules", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("rules.yaml"), &out.stdout).unwrap();
    std::fs::write(dir.join("tests.yaml"), TESTS).unwrap();

    let check = Command::new("promtool").args(["check", "rules", "rules.yaml"]).current_dir(&dir).output();
    let check = check.expect("promtool is installed by scripts/test.sh (Debian's prometheus package)");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new("promtool").args(["test", "rules", "tests.yaml"]).current_dir(&dir).output().unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_generated_dashboard_has_the_panels_and_every_query_parses() {
    let dir = std::env::temp_dir().join(format!("envelope-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("envelope.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["generate", "dashboard", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dashboard: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for wanted in [
        "Request rate",
        "Latency percentiles",
        "Errors by outcome",
        "In flight and shed",
        "Circuit state",
        "Retries and retry budget",
        "Error budget remaining",
        "Business events",
    ] {
        assert!(titles.iter().any(|t| t.starts_with(wanted)), "{wanted} in {titles:?}");
    }
    // promtool has no offline query checker, but it parses every expression of a rules file: wrap each query in one.
    let mut rules = String::from("groups:\n- name: dashboard-queries\n  rules:\n");
    for (i, p) in panels.iter().enumerate() {
        for (j, t) in p["targets"].as_array().unwrap().iter().enumerate() {
            let expr = t["expr"].as_str().unwrap();
            rules += &format!("  - record: dashboard:q{i}_{j}\n    expr: {}\n", serde_json::to_string(expr).unwrap());
        }
    }
    std::fs::write(dir.join("queries.yaml"), rules).unwrap();
    let check = Command::new("promtool").args(["check", "rules", "queries.yaml"]).current_dir(&dir).output().unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
