//! Config errors name the file, line, column and field; valid configs resolve with documented defaults.

use std::time::Duration;

use envelope_sidecar::config::{Config, ConfigError, Tier};
use envelope_sidecar::envelope_http::envelope_core::shed::Limit;

const VALID: &str = r#"
[[listener]]
name = "inbound"
listen = "127.0.0.1:8080"

[[upstream]]
name = "app"
endpoints = ["http://127.0.0.1:8000"]
breaker = { window = { count = 50 }, min_calls = 10, failure_rate = 50, open_for = "10s" }
bulkhead = { max_concurrent = 20, queue = 5, queue_timeout = "50ms" }

[[route]]
name = "payments"
match = { path_prefix = "/payments", methods = ["get", "POST"] }
upstream = "app"
timeout = "2s"
retry = { max_attempts = 4, base = "50ms", max_delay = "1s" }

[[route]]
name = "reports"
match = { path_prefix = "/reports" }
upstream = "app"
"#;

fn error(text: &str) -> ConfigError {
    Config::parse("envelope.toml", text).expect_err("config must be rejected")
}

#[test]
fn a_valid_config_resolves_with_defaults() {
    let c = Config::parse("envelope.toml", VALID).unwrap();
    assert_eq!(c.listeners[0].shedding.limit(), &Limit::Fixed(1000));
    assert_eq!(c.routes[0].tier, Tier::Critical, "tier by path pattern");
    assert_eq!(c.routes[1].tier, Tier::NonCritical);
    assert_eq!(c.routes[1].timeout, Duration::from_secs(15), "documented default route timeout");
    assert_eq!(c.routes[0].retry.as_ref().unwrap().max_attempts(), 4);
    assert_eq!(c.routes[0].matcher.methods.as_ref().unwrap().len(), 2);
    assert_eq!(c.upstreams[0].bulkhead.as_ref().unwrap().max_queue(), 5);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
}

#[test]
fn unknown_keys_are_errors_with_position_and_path() {
    let e = error(&VALID.replace("timeout = \"2s\"", "timeout = \"2s\"\ntimeuot = \"3s\""));
    assert_eq!((e.line, e.column), (17, 1), "{e}");
    assert_eq!(e.field, "route[0].timeuot");
    assert!(e.message.contains("unknown field `timeuot`"), "{e}");
    assert!(e.to_string().starts_with("envelope.toml:17:1: `route[0].timeuot`: unknown field"), "{e}");
}

#[test]
fn bad_values_point_at_the_value() {
    let e = error(&VALID.replace("timeout = \"2s\"", "timeout = \"2 seconds\""));
    assert_eq!((e.line, e.column, e.field.as_str()), (16, 11, "route[0].timeout"), "{e}");
    assert!(e.message.contains("invalid duration"), "{e}");

    let e = error(&VALID.replace("failure_rate = 50", "failure_rate = 150"));
    assert_eq!(e.field, "upstream[0].breaker.failure_rate");
    assert_eq!(e.line, 9);

    let e = error(&VALID.replace("max_attempts = 4", "max_attempts = 0"));
    assert_eq!(e.field, "route[0].retry.max_attempts");
    assert!(e.message.contains("at least 1"), "{e}");
}

#[test]
fn references_and_cross_checks_are_located() {
    let e = error(&VALID.replace("upstream = \"app\"\ntimeout", "upstream = \"missing\"\ntimeout"));
    assert_eq!((e.line, e.field.as_str()), (15, "route[0].upstream"), "{e}");
    assert!(e.message.contains("no upstream named `missing`"));

    let e = error(&VALID.replace("min_calls = 10", "min_calls = 60"));
    assert_eq!(e.field, "upstream[0].breaker");
    assert!(e.message.contains("minimum calls 60"), "{e}");

    let e = error(&VALID.replace("http://127.0.0.1:8000", "ftp://127.0.0.1:8000"));
    assert_eq!(e.field, "upstream[0].endpoints[0]");

    let e = error(&VALID.replace("\"get\"", "\"G E T\""));
    assert_eq!(e.field, "route[0].match.methods[0]");

    let e = error(&format!("{VALID}\n[admin]\nlisten = \"0.0.0.0:9901\"\n"));
    assert_eq!(e.field, "admin.listen");
    assert!(e.message.contains("loopback"));
}

#[test]
fn syntax_errors_are_located() {
    let e = error("[[listener]\nname = 1");
    assert_eq!(e.line, 1);
    assert!(e.column > 0);
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let e = Config::load(std::path::Path::new("/nonexistent/envelope.toml")).unwrap_err();
    assert!(e.to_string().contains("cannot read the config file"), "{e}");
}

#[test]
fn environment_overrides_defaults_but_not_the_file() {
    let env = |name: &str| match name {
        "ENVELOPE_ROUTE_TIMEOUT" => Some("7s".to_owned()),
        "ENVELOPE_MAX_CONCURRENT" => Some("64".to_owned()),
        _ => None,
    };
    let c = Config::parse_with_env("envelope.toml", VALID, &env).unwrap();
    assert_eq!(c.routes[1].timeout, Duration::from_secs(7), "the default came from the environment");
    assert_eq!(c.routes[0].timeout, Duration::from_secs(2), "the file wins");
    assert_eq!(c.listeners[0].shedding.limit(), &Limit::Fixed(64));

    let bad = |name: &str| (name == "ENVELOPE_REPLAY_LIMIT").then(|| "lots".to_owned());
    let e = Config::parse_with_env("envelope.toml", VALID, &bad).unwrap_err();
    assert_eq!((e.file.as_str(), e.field.as_str()), ("environment", "ENVELOPE_REPLAY_LIMIT"));
}

#[test]
fn the_documented_example_is_valid() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md")).unwrap();
    let start = doc.find("```toml\n").expect("an example") + "```toml\n".len();
    let end = start + doc[start..].find("```").unwrap();
    let c = Config::parse("docs/configuration.md", &doc[start..end]).unwrap();
    assert_eq!(c.routes[0].name, "payments");
}

#[test]
fn path_templates() {
    use envelope_sidecar::config::{Segment, parse_template, template_matches};
    let t = parse_template("/users/{id}/orders").unwrap();
    assert_eq!(t, [Segment::Literal("users".into()), Segment::Any, Segment::Literal("orders".into())]);
    assert!(template_matches(&t, "/users/42/orders"));
    assert!(!template_matches(&t, "/users/42/orders/7"));
    assert!(!template_matches(&t, "/users//orders"));
    assert!(!template_matches(&t, "/users/42"));
    let rest = parse_template("/files/{*path}").unwrap();
    assert!(template_matches(&rest, "/files/a/b/c"));
    assert!(!template_matches(&rest, "/other/a"));
    for bad in ["users/{id}", "/a/{*rest}/b", "/a/b{id}", "/a/{}", "/a/{i-d}"] {
        assert!(parse_template(bad).is_err(), "{bad}");
    }
    let e = Config::parse("envelope.toml", &VALID.replace("path_prefix = \"/reports\"", "path = \"/reports/{x\""))
        .unwrap_err();
    assert_eq!(e.field, "route[1].match.path");
}

#[test]
fn history_and_counters_resolve_and_their_errors_are_located() {
    let c = Config::parse("/etc/envelope/envelope.toml", VALID).unwrap();
    assert_eq!(c.history.path.as_deref(), Some(std::path::Path::new("/etc/envelope/envelope-history.db")));
    assert_eq!(c.history.retention, Duration::from_secs(30 * 86_400));
    assert_eq!(c.history.flush_interval, Duration::from_secs(10));

    let text = format!(
        "{VALID}\n[history]\npath = \":memory:\"\nretention = \"7d\"\n\n[[counter]]\nname = \"orders\"\nroute = \"payments\"\nmatch = {{ path = \"/payments/{{id}}\", methods = [\"post\"] }}\nstatus = [\"2xx\", \"409\"]\n"
    );
    let c = Config::parse("envelope.toml", &text).unwrap();
    assert_eq!(c.history.path, None);
    assert_eq!(c.history.retention, Duration::from_secs(7 * 86_400));
    let orders = &c.counters[0];
    assert_eq!(orders.statuses, [(200, 299), (409, 409)]);
    let post = http::Method::POST;
    assert!(orders.counts(Some("payments"), "/payments/42", &post, 201));
    assert!(orders.counts(Some("payments"), "/payments/42", &post, 409));
    assert!(!orders.counts(Some("payments"), "/payments/42", &post, 500), "status");
    assert!(!orders.counts(Some("payments"), "/payments/42", &http::Method::GET, 200), "method");
    assert!(!orders.counts(Some("reports"), "/payments/42", &post, 200), "route");
    assert!(!orders.counts(Some("payments"), "/payments/42/x", &post, 200), "template");

    let e = error(&format!("{VALID}\n[[counter]]\nname = \"x\"\nstatus = [\"2xx\", \"600\"]\n"));
    assert_eq!((e.field.as_str(), e.line), ("counter[0].status[1]", VALID.lines().count() + 4), "{e}");
    let e = error(&format!("{VALID}\n[[counter]]\nname = \"x\"\nroute = \"nope\"\n"));
    assert_eq!(e.field, "counter[0].route", "{e}");
    assert!(e.message.contains("nope"));
    let e = error(&format!("{VALID}\n[history]\nretention = \"0s\"\n"));
    assert_eq!(e.field, "history.retention", "{e}");
}

#[test]
fn sizes_ports_and_durations_outside_their_documented_range_are_refused_where_they_are_written() {
    for (from, to, field, says) in [
        (
            "endpoints = [\"http://127.0.0.1:8000\"]",
            "endpoints = [\"http://127.0.0.1:99999\"]",
            "upstream[0].endpoints[0]",
            "port",
        ),
        (
            "endpoints = [\"http://127.0.0.1:8000\"]",
            "endpoints = [\"http://127.0.0.1:0\"]",
            "upstream[0].endpoints[0]",
            "port",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_header_bytes = 100",
            "listener[0].max_header_bytes",
            "8192 to",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_header_bytes = 2000000",
            "listener[0].max_header_bytes",
            "out of range",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_headers = 5000",
            "listener[0].max_headers",
            "1 to 1000",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_uri_bytes = 4000000",
            "listener[0].max_uri_bytes",
            "out of range",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_connections = 5000000",
            "listener[0].max_connections",
            "out of range",
        ),
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nmax_body_bytes = 18446744073709551615",
            "listener[0].max_body_bytes",
            "out of range",
        ),
        ("timeout = \"2s\"", "timeout = \"2s\"\nreplay_limit = 100000000000", "route[0].replay_limit", "out of range"),
        ("timeout = \"2s\"", "timeout = \"18446744073709551615s\"", "route[0].timeout", "maximum"),
    ] {
        let e = error(&VALID.replace(from, to));
        assert_eq!(e.field, field, "{e}");
        assert!(e.line > 0 && e.column > 0, "located: {e}");
        assert!(e.message.contains(says), "{e}");
    }
}

#[test]
fn an_endpoint_without_a_port_is_reached_on_its_schemes_port() {
    let c = Config::parse("envelope.toml", &VALID.replace("http://127.0.0.1:8000", "http://localhost")).unwrap();
    assert_eq!(c.upstreams[0].endpoints[0].connect_to, "localhost:80");
    assert_eq!(c.upstreams[0].endpoints[0].host, "localhost", "the Host header as written");
    let c = Config::parse("envelope.toml", &VALID.replace("http://127.0.0.1:8000", "https://example.test")).unwrap();
    assert_eq!(c.upstreams[0].endpoints[0].connect_to, "example.test:443");
}

#[test]
fn policies_are_the_engines_validated_configs_with_the_engines_defaults() {
    use envelope_sidecar::envelope_http::envelope_core::{circuit_breaker, retry};
    // What the file leaves out is the library's default: one set of defaults.
    let c = Config::parse(
        "envelope.toml",
        &VALID.replace(
            "breaker = { window = { count = 50 }, min_calls = 10, failure_rate = 50, open_for = \"10s\" }",
            "breaker = {}",
        ),
    )
    .unwrap();
    assert_eq!(c.upstreams[0].breaker.as_ref().unwrap().config, circuit_breaker::Config::default());
    let set = Config::parse("envelope.toml", VALID).unwrap();
    let b = &set.upstreams[0].breaker.as_ref().unwrap().config;
    assert_eq!(
        (b.window(), b.minimum_calls(), b.open_duration()),
        (circuit_breaker::Window::Count(50), 10, Duration::from_secs(10))
    );
    assert_eq!(b.half_open_calls(), circuit_breaker::DEFAULT_HALF_OPEN_CALLS, "unset: the library's default");
    let r = set.routes[0].retry.as_ref().unwrap();
    let budget = r.budget().expect("a route's retries draw from its budget").settings();
    assert_eq!(budget, (retry::DEFAULT_TTL, retry::DEFAULT_MIN_PER_SECOND, retry::DEFAULT_RETRY_RATIO));

    // Nothing is clamped: what the engine refuses, `check` refuses, at the field.
    let e = error(&VALID.replace("max_attempts = 4", "max_attempts = 101"));
    assert_eq!(e.field, "route[0].retry.max_attempts", "{e}");
    assert!(e.message.contains("between 1 and 100"), "{e}");
    let e = error(&VALID.replace("min_calls = 10", "min_calls = 51"));
    assert_eq!(e.field, "upstream[0].breaker", "{e}");
    let e = error(&VALID.replace(
        "bulkhead = { max_concurrent = 20, queue = 5, queue_timeout = \"50ms\" }",
        "rate_limit = { rate = 4000000000, per = \"1ms\" }",
    ));
    assert_eq!(e.field, "upstream[0].rate_limit", "{e}");
    assert!(e.message.contains("nanosecond"), "{e}");
}

#[test]
fn shared_breakers_need_a_store_a_time_window_and_the_normal_mode() {
    let shared = VALID.replace(
        r#"breaker = { window = { count = 50 }, min_calls = 10, failure_rate = 50, open_for = "10s" }"#,
        r#"breaker = { window = { seconds = 30 }, min_calls = 10, shared = true }"#,
    );
    let e = error(&shared);
    assert_eq!((e.line, e.field.as_str()), (9, "upstream[0].breaker.shared"));
    assert!(e.message.contains("[shared]"), "{e}");

    let with_store = format!("[shared]\nredis = \"redis://10.0.0.7:6379/2\"\n{shared}");
    let c = Config::parse("envelope.toml", &with_store).unwrap();
    let s = c.shared.as_ref().unwrap();
    assert_eq!(
        (s.redis.as_str(), s.key_prefix.as_str(), s.op_timeout, s.sync_interval),
        ("redis://10.0.0.7:6379/2", "envelope:", Duration::from_millis(50), Duration::from_millis(200))
    );
    assert!(c.upstreams[0].breaker.as_ref().unwrap().shared);

    let counted = with_store.replace("window = { seconds = 30 }", "window = { count = 30 }");
    let e = error(&counted);
    assert_eq!(e.field, "upstream[0].breaker.window");
    assert!(e.message.contains("time window"), "{e}");
    let metrics_only = with_store.replace("shared = true", "shared = true, mode = \"metrics_only\"");
    assert_eq!(error(&metrics_only).field, "upstream[0].breaker.mode");

    for bad in ["http://10.0.0.7:6379", "redis://", "redis://host/db", "redis://host:6379/0?x=1", "10.0.0.7"] {
        let e = error(&with_store.replace("redis://10.0.0.7:6379/2", bad));
        assert_eq!((e.line, e.field.as_str()), (2, "shared.redis"), "{bad}");
    }
    let e = error(&with_store.replace("[shared]\n", "[shared]\nkey_prefix = \"a b\"\n"));
    assert_eq!(e.field, "shared.key_prefix");
    let e = error(&with_store.replace("[shared]\n", "[shared]\nsync_interval = \"1ms\"\n"));
    assert_eq!(e.field, "shared.sync_interval");
}

#[test]
fn a_global_rate_limit_needs_the_shared_store() {
    let global = VALID.replace(
        r#"bulkhead = { max_concurrent = 20, queue = 5, queue_timeout = "50ms" }"#,
        r#"rate_limit = { rate = 100, per = "1m", scope = "global" }"#,
    );
    let e = error(&global);
    assert_eq!((e.line, e.field.as_str()), (10, "upstream[0].rate_limit.scope"));
    let c = Config::parse("envelope.toml", &format!("[shared]\nredis = \"redis://127.0.0.1:6379\"\n{global}")).unwrap();
    assert_eq!(c.upstreams[0].rate_limit_scope, envelope_sidecar::config::Scope::Global);
    assert!(error(&global.replace("\"global\"", "\"planet\"")).message.contains("unknown variant"));
    let with_store = format!("[shared]\nredis = \"redis://127.0.0.1:6379\"\n{global}");
    let leased =
        Config::parse("envelope.toml", &with_store.replace("scope = \"global\"", "scope = \"global\", lease = 10"));
    assert_eq!(leased.unwrap().upstreams[0].rate_limit_lease, 10);
    let e = error(&with_store.replace("scope = \"global\"", "scope = \"global\", lease = 500"));
    assert_eq!(e.field, "upstream[0].rate_limit.lease");
    let e = error(&with_store.replace("scope = \"global\"", "lease = 10"));
    assert!(e.message.contains("global limit"), "{e}");
}

#[test]
fn per_key_limits_name_a_header_a_template_parameter_or_the_client() {
    let with = |limit: &str, path: &str| {
        VALID.replace(
            "match = { path_prefix = \"/reports\" }",
            &format!("match = {{ {path} }}\nrate_limit = {{ rate = 10, {limit} }}"),
        )
    };
    let c = Config::parse("envelope.toml", &with("key = \"param:tenant\"", "path = \"/t/{tenant}/x\"")).unwrap();
    let limit = c.routes[1].rate_limit.as_ref().unwrap();
    assert_eq!(limit.key, envelope_sidecar::config::KeySource::Param(1));
    assert_eq!(limit.max_keys.get(), 10_000);
    let c = Config::parse("envelope.toml", &with("key = \"header:X-Api-Key\", max_keys = 50", "path_prefix = \"/r\""));
    let limit = c.unwrap().routes[1].rate_limit.clone().unwrap();
    assert_eq!(limit.key, envelope_sidecar::config::KeySource::Header(http::HeaderName::from_static("x-api-key")));
    assert_eq!(limit.max_keys.get(), 50);

    let e = error(&with("key = \"param:tenant\"", "path_prefix = \"/r\""));
    assert_eq!(e.field, "route[1].rate_limit.key");
    assert!(e.message.contains("{tenant}"), "{e}");
    assert_eq!(error(&with("key = \"cookie:x\"", "path_prefix = \"/r\"")).field, "route[1].rate_limit.key");
    assert_eq!(error(&with("key = \"header:bad name\"", "path_prefix = \"/r\"")).field, "route[1].rate_limit.key");
    assert_eq!(error(&with("max_keys = 0", "path_prefix = \"/r\"")).field, "route[1].rate_limit.max_keys");
    assert_eq!(error(&with("scope = \"global\"", "path_prefix = \"/r\"")).field, "route[1].rate_limit.scope");
}

#[test]
fn a_shared_stores_ca_file_is_for_tls_and_must_hold_certificates() {
    let dir = std::env::temp_dir().join(format!("envelope-shared-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("ca.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let shared = |url: &str, ca: &std::path::Path| {
        format!("[shared]\nredis = \"{url}\"\nca_file = \"{}\"\n{VALID}", ca.display())
    };
    assert_eq!(error(&shared("redis://127.0.0.1:6379", &not_pem)).field, "shared.ca_file");
    let e = error(&shared("rediss://127.0.0.1:6379", &not_pem));
    assert!(e.field == "shared.ca_file" && e.message.contains("no PEM certificate"), "{e}");
    assert_eq!(error(&shared("rediss://127.0.0.1:6379", &dir.join("missing.pem"))).field, "shared.ca_file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shared_cluster_is_plain_tcp() {
    let c = Config::parse(
        "envelope.toml",
        &format!("[shared]\nredis = \"redis://10.0.0.7:7000\"\ncluster = true\n{VALID}"),
    );
    assert!(c.unwrap().shared.unwrap().cluster);
    let e = error(&format!("[shared]\nredis = \"rediss://10.0.0.7:7000\"\ncluster = true\n{VALID}"));
    assert_eq!((e.line, e.field.as_str()), (3, "shared.cluster"));
}

#[test]
fn a_shared_sentinel_names_its_master_and_is_plain_tcp() {
    let c = Config::parse(
        "envelope.toml",
        &format!("[shared]\nredis = \"redis://10.0.0.7:26379\"\nsentinel = \"main\"\n{VALID}"),
    );
    assert_eq!(c.unwrap().shared.unwrap().sentinel.as_deref(), Some("main"));
    for bad in
        ["rediss://10.0.0.7:26379\"\nsentinel = \"main", "redis://10.0.0.7:26379\"\ncluster = true\nsentinel = \"main"]
    {
        let e = error(&format!("[shared]\nredis = \"{bad}\"\n{VALID}"));
        assert_eq!(e.field, "shared.sentinel", "{e}");
    }
}

#[test]
fn the_runbook_base_url_is_absolute() {
    let c = Config::parse("envelope.toml", VALID).unwrap();
    assert_eq!(c.alerts.runbook_base_url, "docs/runbook.md");
    let ok = format!("[alerts]\nrunbook_base_url = \"https://wiki.example.com/envelope\"\n{VALID}");
    assert_eq!(
        Config::parse("envelope.toml", &ok).unwrap().alerts.runbook_base_url,
        "https://wiki.example.com/envelope"
    );
    for bad in ["docs/runbook.md", "https://wiki.example.com/x#y", "ftp://wiki.example.com/"] {
        let e = error(&format!("[alerts]\nrunbook_base_url = \"{bad}\"\n{VALID}"));
        assert_eq!((e.line, e.field.as_str()), (2, "alerts.runbook_base_url"), "{bad}");
    }
}

#[test]
fn a_fallback_names_its_reasons_and_is_another_upstream_or_a_static_answer() {
    use envelope_sidecar::config::{FallbackAnswer, FallbackReason};
    let with = |fallback: &str| {
        VALID.replace("upstream = \"app\"\n\"#", "").replace(
            "match = { path_prefix = \"/reports\" }\nupstream = \"app\"",
            &format!(
                "match = {{ path_prefix = \"/reports\" }}\nupstream = \"app\"\nfallback = {fallback}\n\n\
                 [[upstream]]\nname = \"replica\"\nendpoints = [\"http://127.0.0.1:8001\"]"
            ),
        )
    };
    let c = Config::parse("envelope.toml", &with(r#"{ on = ["timeout", "circuit_open"], upstream = "replica" }"#));
    let f = c.unwrap().routes[1].fallback.clone().unwrap();
    assert_eq!(f.answer, FallbackAnswer::Upstream(1));
    assert!(f.covers(FallbackReason::Timeout) && f.covers(FallbackReason::CircuitOpen));
    assert!(!f.covers(FallbackReason::RetriesExhausted) && !f.covers(FallbackReason::Shed));
    let c = Config::parse("envelope.toml", &with(r#"{ on = ["shed"], body = "{}" }"#)).unwrap();
    let Some(FallbackAnswer::Static { status, headers, body }) = c.routes[1].fallback.clone().map(|f| f.answer) else {
        panic!("a static answer")
    };
    assert_eq!((status.as_u16(), &body[..]), (200, &b"{}"[..]));
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8", "a body has a media type by default");

    for (fallback, field, says) in [
        (r#"{ on = ["broken"], body = "x" }"#, "route[1].fallback.on[0]", "unknown reason"),
        (r#"{ on = [], body = "x" }"#, "route[1].fallback.on", "at least one"),
        (r#"{ on = ["timeout"], upstream = "nope" }"#, "route[1].fallback.upstream", "no upstream"),
        (r#"{ on = ["timeout"], upstream = "app" }"#, "route[1].fallback.upstream", "another upstream"),
        (r#"{ on = ["timeout"], upstream = "replica", status = 200 }"#, "route[1].fallback.upstream", "not both"),
        (r#"{ on = ["timeout"], status = 100 }"#, "route[1].fallback.status", "200 to 599"),
        (r#"{ on = ["timeout"], body = "a", body_file = "b" }"#, "route[1].fallback.body_file", "not both"),
        (r#"{ on = ["timeout"], body_file = "/nonexistent/x" }"#, "route[1].fallback.body_file", "cannot read"),
        (
            r#"{ on = ["timeout"], headers = { "content-length" = "3" } }"#,
            "route[1].fallback.headers.content-length",
            "framing",
        ),
        (r#"{ on = ["timeout"], headers = { "x" = "a\nb" } }"#, "route[1].fallback.headers.x", "not a valid"),
        (r#"{ on = ["timeout"], wat = 1 }"#, "route[1].fallback.wat", "unknown field"),
    ] {
        let e = error(&with(fallback));
        assert_eq!(e.field, field, "{fallback}: {e}");
        assert!(e.message.contains(says), "{fallback}: {e}");
        assert_eq!(e.line, 23, "{fallback}: {e}");
    }
}

#[test]
fn a_hedge_waits_a_duration_or_a_percentile() {
    use envelope_sidecar::config::{HedgeDelay, HedgeSpec};
    let with = |hedge: &str| {
        VALID.replace(
            "match = { path_prefix = \"/reports\" }",
            &format!("match = {{ path_prefix = \"/reports\" }}\nhedge = {hedge}"),
        )
    };
    let hedge = |text: &str| Config::parse("envelope.toml", &with(text)).unwrap().routes[1].hedge.clone().unwrap();
    assert_eq!(
        hedge(r#"{ delay = "50ms" }"#),
        HedgeSpec { delay: HedgeDelay::Fixed(Duration::from_millis(50)), max_extra: 1 }
    );
    assert_eq!(
        hedge(r#"{ delay = "p99.9", max_extra = 2 }"#),
        HedgeSpec { delay: HedgeDelay::Percentile(99.9), max_extra: 2 }
    );
    for (text, field, says) in [
        (r#"{ delay = "p100" }"#, "route[1].hedge.delay", "between 0 and 100"),
        (r#"{ delay = "p0" }"#, "route[1].hedge.delay", "between 0 and 100"),
        (r#"{ delay = "px" }"#, "route[1].hedge.delay", "percentile"),
        (r#"{ delay = "0ms" }"#, "route[1].hedge.delay", "more than 0"),
        (r#"{ delay = "soon" }"#, "route[1].hedge.delay", "a duration"),
        (r#"{ delay = "5ms", max_extra = 0 }"#, "route[1].hedge.max_extra", "out of range"),
        (r#"{ delay = "5ms", max_extra = 6 }"#, "route[1].hedge.max_extra", "out of range"),
        (r#"{ max_extra = 1 }"#, "route[1].hedge", "delay"),
    ] {
        let e = error(&with(text));
        assert_eq!(e.field, field, "{text}: {e}");
        assert!(e.message.contains(says), "{text}: {e}");
        assert_eq!(e.line, 22, "{text}: {e}");
    }
}

#[test]
fn a_route_may_say_all_its_requests_are_idempotent() {
    let c = Config::parse("envelope.toml", VALID).unwrap();
    assert!(c.routes.iter().all(|r| !r.idempotent), "off unless set");
    let with = |v: &str| {
        VALID.replace(
            "match = { path_prefix = \"/reports\" }",
            &format!("match = {{ path_prefix = \"/reports\" }}\nidempotent = {v}"),
        )
    };
    assert!(Config::parse("envelope.toml", &with("true")).unwrap().routes[1].idempotent);
    let e = error(&with("\"yes\""));
    assert_eq!((e.line, e.field.as_str()), (22, "route[1].idempotent"), "{e}");
}

#[test]
fn an_upstream_speaks_http1_unless_it_says_http2() {
    use envelope_sidecar::config::Protocol;
    let c = Config::parse("envelope.toml", VALID).unwrap();
    assert_eq!(c.upstreams[0].protocol, Protocol::Http1);
    let with = |p: &str| {
        VALID.replace(
            "endpoints = [\"http://127.0.0.1:8000\"]",
            &format!("endpoints = [\"http://127.0.0.1:8000\"]\nprotocol = \"{p}\""),
        )
    };
    assert_eq!(Config::parse("envelope.toml", &with("http2")).unwrap().upstreams[0].protocol, Protocol::Http2);
    let e = error(&with("http3"));
    assert_eq!((e.line, e.field.as_str()), (9, "upstream[0].protocol"), "{e}");
    assert!(e.message.contains("http1") && e.message.contains("http2"), "{e}");
}

#[test]
fn a_routes_slo_overrides_its_tiers_with_one_or_more_latency_objectives() {
    use envelope_sidecar::config::SloSpec;
    use envelope_sidecar::envelope_http::envelope_core::slo::LatencyObjective;
    let with = |slo: &str| {
        VALID.replace(
            "match = { path_prefix = \"/reports\" }",
            &format!("match = {{ path_prefix = \"/reports\" }}\nslo = {slo}"),
        )
    };
    let c = Config::parse("envelope.toml", VALID).unwrap();
    assert_eq!(c.routes[1].slo, SloSpec::of_tier(Tier::NonCritical), "the tier's by default");
    let slo = |text: &str| Config::parse("envelope.toml", &with(text)).unwrap().routes[1].slo.clone();
    let s = slo(r#"{ availability = 99.99 }"#);
    assert_eq!(s.availability, 0.9999);
    assert_eq!(s.latencies, SloSpec::of_tier(Tier::NonCritical).latencies, "latency stays the tier's");
    let s = slo(r#"{ availability = 99.95, latency = { percentile = 95, under = "300ms" } }"#);
    assert_eq!(s.latencies, [LatencyObjective { threshold: Duration::from_millis(300), percentile: 0.95 }]);
    let s = slo(r#"{ latency = [{ percentile = 95, under = "300ms" }, { percentile = 99.9, under = "2s" }] }"#);
    assert_eq!(s.latencies.len(), 2);
    assert_eq!(s.latencies[1], LatencyObjective { threshold: Duration::from_secs(2), percentile: 0.999 });
    assert_eq!(SloSpec::latency_name(&s.latencies[1]), "p99.9_2000ms");
    for (text, field, says) in [
        (r#"{ availability = 100 }"#, "route[1].slo.availability", "below 100"),
        (r#"{ availability = 0 }"#, "route[1].slo.availability", "above 0"),
        (r#"{ latency = { percentile = 95 } }"#, "route[1].slo.latency.under", "missing"),
        (r#"{ latency = { under = "1s" } }"#, "route[1].slo.latency.percentile", "missing"),
        (r#"{ latency = { percentile = 100, under = "1s" } }"#, "route[1].slo.latency.percentile", "below 100"),
        (r#"{ latency = { percentile = 95, under = "soon" } }"#, "route[1].slo.latency.under", ""),
        (r#"{ latency = { percentile = 95, under = "0ms" } }"#, "route[1].slo.latency.under", "more than 0"),
        (r#"{ latency = { percentile = 95, under = "1s", p = 1 } }"#, "route[1].slo.latency.p", "unknown field"),
        (r#"{ latency = [] }"#, "route[1].slo.latency", "1 to 4"),
        (r#"{ latency = [1] }"#, "route[1].slo.latency[0]", "table"),
        (r#"{ latency = "fast" }"#, "route[1].slo.latency", "table"),
        (r#"{ latencies = [] }"#, "route[1].slo.latencies", "unknown field"),
    ] {
        let e = error(&with(text));
        assert_eq!(e.field, field, "{text}: {e}");
        assert!(e.message.contains(says), "{text}: {e}");
        assert_eq!(e.line, 22, "{text}: {e}");
    }
}

#[test]
fn the_alerts_window_scale_is_for_drills_and_bounded() {
    let with = |n: u64| format!("{VALID}\n[alerts]\nwindow_scale = {n}\n");
    assert_eq!(Config::parse("envelope.toml", VALID).unwrap().alerts.window_scale, 1);
    assert_eq!(Config::parse("envelope.toml", &with(60)).unwrap().alerts.window_scale, 60);
    assert_eq!(error(&with(0)).field, "alerts.window_scale");
    assert_eq!(error(&with(301)).field, "alerts.window_scale");
}

#[test]
fn the_adaptive_limit_is_on_off_or_tuned() {
    use envelope_sidecar::envelope_http::envelope_core::shed::Limit;
    let with = |value: &str| {
        VALID.replace(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"127.0.0.1:8080\"\nadaptive_concurrency = {value}"),
        )
    };
    let limit =
        |value: &str| Config::parse("envelope.toml", &with(value)).unwrap().listeners[0].shedding.limit().clone();
    assert!(matches!(limit("false"), Limit::Fixed(_)));
    let Limit::Adaptive(defaults) = limit("true") else { panic!("adaptive") };
    assert_eq!(defaults.tolerance, 1.5);
    let Limit::Adaptive(tuned) = limit(
        r#"{ tolerance = 1.1, headroom = 1, min_limit = 2, max_limit = 64, initial_limit = 8, window = "50ms" }"#,
    ) else {
        panic!("adaptive")
    };
    assert_eq!((tuned.tolerance, tuned.min_limit, tuned.max_limit, tuned.initial_limit), (1.1, 2, 64, 8));
    assert_eq!(tuned.window, Duration::from_millis(50));
    assert_eq!((tuned.headroom, defaults.headroom), (Some(1.0), None));
    for (value, field, says) in [
        (r#"{ tolerance = 0.9 }"#, "listener[0].adaptive_concurrency", "tolerance"),
        (r#"{ tolerance = "tight" }"#, "listener[0].adaptive_concurrency.tolerance", "a number"),
        (r#"{ min_limit = 0 }"#, "listener[0].adaptive_concurrency.min_limit", "at least 1"),
        (r#"{ headroom = 0 }"#, "listener[0].adaptive_concurrency", "headroom"),
        (r#"{ headroom = "some" }"#, "listener[0].adaptive_concurrency.headroom", "a number"),
        (r#"{ min_limit = 50, max_limit = 10 }"#, "listener[0].adaptive_concurrency", "max_limit"),
        (r#"{ window = "soon" }"#, "listener[0].adaptive_concurrency.window", ""),
        (r#"{ gain = 2 }"#, "listener[0].adaptive_concurrency.gain", "unknown field"),
        ("3", "listener[0].adaptive_concurrency", "a table"),
    ] {
        let e = error(&with(value));
        assert_eq!(e.field, field, "{value}: {e}");
        assert!(e.message.contains(says), "{value}: {e}");
        assert_eq!(e.line, 5, "{value}: {e}");
    }
}
