//! Distributed mode end to end: two and three `envelope run` processes sharing breakers through a real
//! `redis-server` on 127.0.0.1.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{Action, Envelope, FaultUpstream, Redis, admin_json, envelope, get, send};

fn config(redis: &Redis, breaker: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[shared]
redis = "{url}"
key_prefix = "shop:"
sync_interval = "100ms"

[[upstream]]
name = "app"
endpoints = ["http://{{upstream}}"]
breaker = {{ {breaker}, shared = true }}

[[route]]
name = "api"
match = {{ path_prefix = "/api" }}
upstream = "app"
"#,
        url = redis.url()
    )
}

/// Waits (bounded) until the instance's shared breakers follow the fleet.
async fn synced(e: &Envelope) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin_json(e.admin, "/api/v1/shared").await["synced"] != true {
        assert!(Instant::now() < deadline, "synced with Redis within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn breaker_state(e: &Envelope) -> String {
    admin_json(e.admin, "/api/v1/breakers").await[0]["state"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_through_one_instance_open_the_other_within_500ms_and_it_sends_nothing() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    up.script("/api/x", [Action::status(503)]);
    let breaker = r#"window = { seconds = 10 }, min_calls = 5, failure_rate = 50, open_for = "30s""#;
    let (a, b) = (envelope(&config(&redis, breaker), up.addr).await, envelope(&config(&redis, breaker), up.addr).await);
    synced(&a).await;
    synced(&b).await;
    for _ in 0..5 {
        assert_eq!(send(get(a.addr, "/api/x")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let failed = Instant::now();
    let sent = up.count("GET", "/api/x");
    while breaker_state(&b).await != "open" {
        assert!(failed.elapsed() < Duration::from_secs(2), "b follows within 2 s at most");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let opened = failed.elapsed();
    assert!(opened < Duration::from_millis(500), "b opened {opened:?} after a's failures");
    let (status, headers, _) = send(get(b.addr, "/api/x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"), "a fast fail from the open breaker");
    assert_eq!(up.count("GET", "/api/x"), sent, "b sent nothing upstream");
    let shared = admin_json(b.admin, "/api/v1/shared").await;
    assert_eq!(shared["breakers"], serde_json::json!(["app"]));
    let decided =
        || b.errors.lock().unwrap().iter().any(|l| l.contains("shared breaker `app`: closed -> open (decided by"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !decided() {
        assert!(Instant::now() < deadline, "b logs the fleet's transition, naming who decided");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Only keys under the prefix, each with a TTL.
    let keys = redis.cli(&["--scan"]);
    assert!(!keys.is_empty());
    for key in keys.lines() {
        assert!(key.starts_with("shop:{app}:"), "{key}");
        assert!(redis.cli(&["PTTL", key]).parse::<i64>().unwrap() > 0, "{key} has a TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_failures_through_each_of_two_instances_count_exactly_two_thousand() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    up.script("/api/x", [Action::status(503)]);
    let breaker = r#"window = { seconds = 60 }, min_calls = 100000, failure_rate = 50"#;
    let (a, b) = (envelope(&config(&redis, breaker), up.addr).await, envelope(&config(&redis, breaker), up.addr).await);
    synced(&a).await;
    synced(&b).await;
    // Both instances at once, 200 requests in flight on each at a time.
    for _ in 0..5 {
        let mut calls = Vec::new();
        for e in [&a, &b] {
            for _ in 0..200 {
                let addr = e.addr;
                calls.push(tokio::spawn(async move { send(get(addr, "/api/x")).await.0 }));
            }
        }
        for c in calls {
            // The fake upstream's 503, or, when its accept queue overflows under the burst, the sidecar's 502 for
            // a connect timeout: a failure either way, recorded once by the breaker.
            let status = c.await.unwrap();
            assert!(matches!(status.as_u16(), 502 | 503), "{status}");
        }
    }
    let count = |kind: &str| -> u64 {
        let fields = redis.cli(&["HGETALL", "shop:{app}:window"]);
        let lines: Vec<&str> = fields.lines().collect();
        lines.chunks(2).filter(|kv| kv[0].ends_with(kind)).map(|kv| kv[1].parse::<u64>().unwrap()).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(":c") < 2000 {
        assert!(Instant::now() < deadline, "both instances synced their counts within 5 s: {}", count(":c"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // a few more syncs: nothing is counted twice
    assert_eq!((count(":c"), count(":f")), (2000, 2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_send_exactly_the_configured_probes_each_time_the_fleet_half_opens() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    let breaker =
        r#"window = { seconds = 10 }, min_calls = 4, failure_rate = 50, open_for = "300ms", half_open_calls = 3"#;
    let fleet = [
        envelope(&config(&redis, breaker), up.addr).await,
        envelope(&config(&redis, breaker), up.addr).await,
        envelope(&config(&redis, breaker), up.addr).await,
    ];
    for e in &fleet {
        synced(e).await;
    }
    for round in 0..3 {
        // Trip the fleet through one instance.
        up.script("/api/x", [Action::status(503)]);
        for _ in 0..4 {
            send(get(fleet[round % 3].addr, "/api/x")).await;
        }
        for e in &fleet {
            let deadline = Instant::now() + Duration::from_secs(2);
            while breaker_state(e).await != "open" {
                assert!(Instant::now() < deadline, "round {round}: every instance opens");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // The dependency is back but slow (1 s an answer), so no probe's result is in while clients knock on
        // every instance for 700 ms after the open time: whatever reaches the upstream then is a probe.
        up.script("/api/x", [Action::delayed(200, Duration::from_secs(1))]);
        let before = up.count("GET", "/api/x");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let knocking = Instant::now();
        let mut knocks = Vec::new();
        while knocking.elapsed() < Duration::from_millis(700) {
            for e in &fleet {
                let addr = e.addr;
                knocks.push(tokio::spawn(async move { send(get(addr, "/api/x")).await.0 }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let probes = up.count("GET", "/api/x") - before;
        assert_eq!(probes, 3, "round {round}: exactly 3 probes from the whole fleet");
        for k in knocks {
            k.await.unwrap();
        }
        // The three probes answered 200: every instance closes.
        for e in &fleet {
            let deadline = Instant::now() + Duration::from_secs(5);
            while breaker_state(e).await != "closed" {
                assert!(Instant::now() < deadline, "round {round}: healthy probes close every instance");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_or_killed_mid_load_fails_and_delays_no_request_and_the_instance_resyncs_when_it_is_back() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    up.script("/api/x", [Action::status(200)]);
    let breaker = r#"window = { seconds = 10 }, min_calls = 5, failure_rate = 50, open_for = "30s""#;
    let a = envelope(&config(&redis, breaker), up.addr).await;
    synced(&a).await;
    let load = |n: usize| async move {
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let began = Instant::now();
            assert_eq!(send(get(a.addr, "/api/x")).await.0, StatusCode::OK, "no request fails because of Redis");
            slowest = slowest.max(began.elapsed());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        slowest
    };
    let calm = load(100).await;
    redis.signal("-STOP");
    let paused = Instant::now();
    let fallback = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(2);
        while admin_json(a.admin, "/api/v1/shared").await["synced"] != false {
            assert!(Instant::now() < deadline, "in fallback within 2 s of Redis pausing");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        paused.elapsed()
    });
    let during = load(150).await;
    let fell_back = fallback.await.unwrap();
    assert!(fell_back < Duration::from_secs(1), "fallback {fell_back:?} after Redis paused");
    let shared = admin_json(a.admin, "/api/v1/shared").await;
    assert_eq!(shared["synced"], false, "it says so on the admin API");
    assert!(shared["last_error"].is_string());
    let ready = send(get(a.admin, "/readyz")).await.0;
    assert_eq!(ready, StatusCode::OK, "readiness does not depend on Redis");
    redis.signal("-CONT");
    let back = Instant::now();
    synced(&a).await;
    let resync = back.elapsed();
    assert!(resync < Duration::from_secs(5), "resynced {resync:?} after Redis came back");
    assert!(paused.elapsed() > Duration::from_millis(700), "the load ran while Redis was paused");
    // A request never waits for Redis: the slowest one during the pause is nowhere near the pause itself, and
    // within the operation timeout's reach of the calm run's slowest.
    assert!(during < calm + Duration::from_millis(250), "slowest {during:?} during the pause, {calm:?} before");
    let (_, _, metrics) = send(get(a.admin, "/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("envelope_shared_state_up 1"), "{metrics}");
    assert!(metrics.contains("envelope_shared_state_degradations_total 1"));
    let said = a.errors.lock().unwrap().iter().filter(|l| l.contains("unreachable")).count();
    assert_eq!(said, 1, "said once in the log");

    // Killed mid-load, then restarted on the same port: no request fails, and the instance resyncs.
    let port = redis.port;
    let load_task = tokio::spawn(load(300));
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(redis);
    let deadline = Instant::now() + Duration::from_secs(2);
    while admin_json(a.admin, "/api/v1/shared").await["synced"] != false {
        assert!(Instant::now() < deadline, "in fallback within 2 s of Redis dying");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = Redis::start_on(port);
    let back = Instant::now();
    synced(&a).await;
    assert!(back.elapsed() < Duration::from_secs(5), "resynced {:?} after Redis restarted", back.elapsed());
    let slowest = load_task.await.unwrap();
    assert!(slowest < calm + Duration::from_millis(250), "slowest {slowest:?} while Redis died and came back");
    assert_eq!(redis.cli(&["EXISTS", "shop:{app}:state"]), "1", "the fleet's state is made again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_of_100_a_minute_admits_100_to_102_across_two_instances_sending_200_each() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    let breaker = r#"window = { seconds = 10 }, min_calls = 1000"#;
    // The exact mode is what is tested: a store slowed by the rest of the test run must not push a request onto
    // the local fallback (each instance's own 100), so the operation timeout is generous here.
    let limited = config(&redis, breaker)
        .replace("breaker = {", "rate_limit = { rate = 100, per = \"1m\", scope = \"global\" }\nbreaker = {")
        .replace("sync_interval = \"100ms\"", "sync_interval = \"100ms\"\nop_timeout = \"2s\"");
    let (a, b) = (envelope(&limited, up.addr).await, envelope(&limited, up.addr).await);
    let mut calls = Vec::new();
    for e in [&a, &b] {
        for _ in 0..200 {
            let addr = e.addr;
            calls.push(tokio::spawn(async move { send(get(addr, "/api/x")).await }));
        }
    }
    let (mut admitted, mut limited_answers) = (0, 0);
    for c in calls {
        let (status, headers, _) = c.await.unwrap();
        match status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited_answers += 1;
                assert!(headers.contains_key("retry-after"));
            }
            other => panic!("{other}"),
        }
    }
    assert!((100..=102).contains(&admitted), "admitted {admitted} across the two instances");
    assert_eq!(admitted + limited_answers, 400);
    assert_eq!(up.count("GET", "/api/x"), admitted);
    assert!(redis.cli(&["PTTL", "shop:{app}:limit"]).parse::<i64>().unwrap() > 0, "the limit's key expires");
}

fn post(addr: std::net::SocketAddr, path: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("authorization", "Bearer s3cret")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_force_open_on_one_instance_applies_to_all_and_a_reload_keeps_the_fleets_state() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    let breaker = r#"window = { seconds = 10 }, min_calls = 5, failure_rate = 50, open_for = "30s""#;
    let token = [("ENVELOPE_ADMIN_TOKEN", "s3cret")];
    let a = support::envelope_with_env(&config(&redis, breaker), up.addr, &token).await;
    let b = support::envelope_with_env(&config(&redis, breaker), up.addr, &token).await;
    synced(&a).await;
    synced(&b).await;
    assert_eq!(send(post(a.admin, "/api/v1/breakers/app/force-open")).await.0, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(2);
    while breaker_state(&b).await != "forced_open" {
        assert!(Instant::now() < deadline, "b is forced open by a's operator within 2 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(send(get(b.addr, "/api/x")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.count("GET", "/api/x"), 0);

    // A reload that changes something else keeps the shared breaker, its state and its place in the fleet.
    b.rewrite_config(&config(&redis, breaker).replace("name = \"api\"", "name = \"api\"\ntimeout = \"9s\""), up.addr);
    b.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.errors.lock().unwrap().iter().any(|l| l.contains("config reloaded")) {
        assert!(Instant::now() < deadline, "b reloads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(breaker_state(&b).await, "forced_open");
    assert_eq!(admin_json(b.admin, "/api/v1/shared").await["breakers"], serde_json::json!(["app"]));
    // The operator releases it on b: a follows.
    assert_eq!(send(post(b.admin, "/api/v1/breakers/app/reset")).await.0, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(2);
    while breaker_state(&a).await != "closed" {
        assert!(Instant::now() < deadline, "a follows b's reset within 2 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(send(get(a.addr, "/api/x")).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_per_key_limit_is_each_keys_for_the_whole_fleet() {
    let redis = Redis::start();
    let up = FaultUpstream::start().await;
    let breaker = r#"window = { seconds = 10 }, min_calls = 1000"#;
    let keyed =
        config(&redis, breaker).replace("sync_interval = \"100ms\"", "sync_interval = \"100ms\"\nop_timeout = \"2s\"");
    let keyed = keyed.replace(
        "match = { path_prefix = \"/api\" }\nupstream = \"app\"\n",
        "match = { path_prefix = \"/api\" }\nupstream = \"app\"\nrate_limit = { rate = 3, per = \"1m\", key = \"header:x-api-key\", scope = \"global\" }\n",
    );
    let (a, b) = (envelope(&keyed, up.addr).await, envelope(&keyed, up.addr).await);
    let ask = |addr, key: &'static str| async move {
        let req = http::Request::get(format!("http://{addr}/api/x"))
            .header("x-api-key", key)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        send(req).await.0
    };
    let mut admitted = std::collections::HashMap::new();
    for _ in 0..3 {
        for key in ["alice", "bob"] {
            for e in [&a, &b] {
                *admitted.entry(key).or_insert(0) += usize::from(ask(e.addr, key).await == StatusCode::OK);
            }
        }
    }
    assert_eq!((admitted["alice"], admitted["bob"]), (3, 3), "3 a minute per key, for the two instances together");
    assert!(redis.cli(&["EXISTS", "shop:{route:api:alice}:limit"]) == "1", "{}", redis.cli(&["--scan"]));
}
