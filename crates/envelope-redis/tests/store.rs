//! The Redis store against a real `redis-server` on 127.0.0.1, and the same scenarios against the in-memory store
//! (the reference semantics): both must give the same answers.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envelope_core::Outcome;
use envelope_core::circuit_breaker::{CircuitBreaker, Config, Delta, State};
use envelope_core::distributed::{BreakerStore, Fleet, FleetConfig, MemoryStore, SyncRequest};
use envelope_core::event::{Event, Listeners};
use envelope_redis::RedisStore;

const MS: Duration = Duration::from_millis(1);

/// A `redis-server` of the test's own, on a free port, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Redis::start_on(port)
    }

    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (the test command installs it: apt-get install redis-server)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start on port {port}");
            std::thread::sleep(10 * MS);
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(minimum_calls: u32, open: Duration) -> Config {
    Config::builder()
        .time_window(10)
        .minimum_calls(minimum_calls)
        .failure_rate_threshold(50.0)
        .open_duration(open)
        .half_open_calls(3)
        .max_half_open_wait(Some(Duration::from_secs(30)))
        .build()
        .unwrap()
}

struct Instance {
    fleet: Fleet,
    breaker: CircuitBreaker,
    seen: Arc<Mutex<Vec<String>>>,
}

fn instance(store: &Arc<dyn BreakerStore>, name: &str, breaker: &str, config: Config) -> Instance {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let mut fc = FleetConfig::new(name);
    fc.op_timeout = Duration::from_millis(200);
    fc.listeners = Listeners::new().with(move |e: &Event<'_>| {
        let line = match e {
            Event::FleetTransition { from, to, instance, .. } => format!("{from} -> {to} by {instance}"),
            Event::SharedStateDegraded { .. } => "degraded".to_owned(),
            Event::SharedStateRestored { .. } => "restored".to_owned(),
            _ => return,
        };
        log.lock().unwrap().push(line);
    });
    let fleet = Fleet::new(store.clone(), fc);
    let breaker = CircuitBreaker::linked(breaker, config, State::Closed);
    fleet.join(breaker.clone()).unwrap();
    Instance { fleet, breaker, seen }
}

fn fail(b: &CircuitBreaker, n: usize) {
    for _ in 0..n {
        b.try_acquire().expect("admitted").record(Outcome::Failure);
    }
}

/// Both stores, each scenario run against each.
fn stores(redis: &Redis) -> Vec<Arc<dyn BreakerStore>> {
    vec![Arc::new(MemoryStore::new()), Arc::new(RedisStore::new(&redis.url(), "envelope:").unwrap())]
}

#[tokio::test]
async fn a_trip_through_one_instance_opens_the_other_on_both_stores() {
    let redis = Redis::start();
    for store in stores(&redis) {
        let (a, b) = (
            instance(&store, "a", "trip", config(4, 60_000 * MS)),
            instance(&store, "b", "trip", config(4, 60_000 * MS)),
        );
        a.fleet.sync_once().await.unwrap();
        b.fleet.sync_once().await.unwrap();
        fail(&a.breaker, 4);
        a.fleet.sync_once().await.unwrap();
        b.fleet.sync_once().await.unwrap();
        assert_eq!(b.breaker.try_acquire().unwrap_err().state(), State::Open, "{}", store.describe());
        assert_eq!(*b.seen.lock().unwrap(), ["closed -> open by a"], "{}", store.describe());
    }
}

#[tokio::test]
async fn counts_from_two_instances_add_up_exactly_on_both_stores() {
    let redis = Redis::start();
    for store in stores(&redis) {
        let a = instance(&store, "a", "counts", config(100_000, 60_000 * MS));
        let b = instance(&store, "b", "counts", config(100_000, 60_000 * MS));
        a.fleet.sync_once().await.unwrap();
        b.fleet.sync_once().await.unwrap();
        // 1,000 concurrent failures through each, synced while they are being recorded.
        let (ab, bb) = (a.breaker.clone(), b.breaker.clone());
        let t1 = std::thread::spawn(move || fail(&ab, 1000));
        let t2 = std::thread::spawn(move || fail(&bb, 1000));
        while !(t1.is_finished() && t2.is_finished()) {
            a.fleet.sync_once().await.unwrap();
            b.fleet.sync_once().await.unwrap();
        }
        t1.join().unwrap();
        t2.join().unwrap();
        a.fleet.sync_once().await.unwrap();
        b.fleet.sync_once().await.unwrap();
        let look = SyncRequest {
            breaker: "counts",
            instance: "observer",
            seq: 1,
            epoch: 1,
            delta: Delta::default(),
            window_secs: 10,
        };
        let view = store.sync(look).await.unwrap();
        assert_eq!((view.window.calls, view.window.failures), (2000, 2000), "{}", store.describe());

        // Exactly: what a fleet sends once is counted once, a repeated (instance, seq) is not counted again.
        let mut delta = Delta::default();
        delta.window.calls = 5;
        let again = SyncRequest { seq: 2, delta, ..look };
        store.sync(again).await.unwrap();
        let after = store.sync(again).await.unwrap();
        assert_eq!(after.window.calls, view.window.calls + 5, "{}", store.describe());
    }
}

#[tokio::test]
async fn the_fleet_sends_exactly_the_configured_probes_on_both_stores() {
    let redis = Redis::start();
    for store in stores(&redis) {
        for round in 0..10 {
            let name = format!("probes-{round}");
            let fleet: Vec<Instance> =
                (0..3).map(|i| instance(&store, &format!("i{i}"), &name, config(4, 50 * MS))).collect();
            for i in &fleet {
                i.fleet.sync_once().await.unwrap();
            }
            fail(&fleet[0].breaker, 4);
            for i in &fleet {
                i.fleet.sync_once().await.unwrap();
                assert_eq!(i.breaker.state(), State::Open);
            }
            tokio::time::sleep(60 * MS).await;
            let mut probes = Vec::new();
            for tick in 0..6 {
                for k in 0..3 {
                    let i = &fleet[(k + round + tick) % 3];
                    i.fleet.sync_once().await.unwrap();
                    for _ in 0..5 {
                        if let Ok(p) = i.breaker.try_acquire_owned() {
                            probes.push(p);
                        }
                    }
                }
            }
            assert_eq!(probes.len(), 3, "{} round {round}: exactly 3 probes fleet-wide", store.describe());
            for p in probes {
                p.record(Outcome::Ok);
            }
            for _ in 0..2 {
                for i in &fleet {
                    i.fleet.sync_once().await.unwrap();
                }
            }
            for i in &fleet {
                assert_eq!(i.breaker.state(), State::Closed, "{} round {round}", store.describe());
            }
        }
    }
}

#[tokio::test]
async fn keys_stay_under_the_prefix_and_expire() {
    let redis = Redis::start();
    let store: Arc<dyn BreakerStore> = Arc::new(RedisStore::new(&redis.url(), "shop:").unwrap());
    let a = instance(&store, "a", "db", config(4, 60_000 * MS));
    a.fleet.sync_once().await.unwrap();
    fail(&a.breaker, 2);
    a.fleet.sync_once().await.unwrap();
    let keys = redis.cli(&["--scan"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 3, "state, window and sequence numbers: {keys:?}");
    for key in keys {
        assert!(key.starts_with("shop:{db}:"), "{key}");
        let ttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap();
        assert!(ttl > 0, "{key} has a TTL ({ttl})");
    }
}

#[tokio::test]
async fn a_paused_or_killed_redis_puts_breakers_on_their_own_and_they_follow_again_when_it_is_back() {
    let mut redis = Redis::start();
    let store: Arc<dyn BreakerStore> = Arc::new(RedisStore::new(&redis.url(), "envelope:").unwrap());
    let a = instance(&store, "a", "db", config(4, 60_000 * MS));
    a.fleet.sync_once().await.unwrap();
    assert!(a.fleet.status().synced);

    // Paused: the sync fails at its timeout, not later; calls are admitted as before.
    redis.signal("-STOP");
    let began = Instant::now();
    assert!(a.fleet.sync_once().await.is_err());
    assert!(began.elapsed() < Duration::from_secs(1), "bounded by the operation timeout");
    assert!(!a.fleet.status().synced);
    assert!(a.breaker.try_acquire().is_ok());
    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.fleet.sync_once().await.is_err() {
        assert!(Instant::now() < deadline, "resynced within 5 s of Redis coming back");
        tokio::time::sleep(50 * MS).await;
    }
    assert_eq!(*a.seen.lock().unwrap(), ["degraded", "restored"]);

    // Killed, then restarted on the same port: the connection is made again.
    let port = redis.port;
    drop(redis);
    assert!(a.fleet.sync_once().await.is_err());
    redis = Redis::start_on(port);
    let back = Instant::now();
    while a.fleet.sync_once().await.is_err() {
        assert!(back.elapsed() < Duration::from_secs(5), "resynced within 5 s of Redis coming back");
        tokio::time::sleep(50 * MS).await;
    }
    assert!(a.fleet.status().synced);
    assert_eq!(redis.cli(&["EXISTS", "envelope:{db}:state"]), "1", "the fleet's state is made again");
}

fn global(store: &Arc<MemoryOrRedis>, per_minute: u32) -> envelope_core::distributed::GlobalLimiter {
    let config = envelope_core::rate_limit::Config::per(per_minute, Duration::from_secs(60)).build().unwrap();
    let health = CircuitBreaker::new("store", Config::builder().count_window(3).minimum_calls(3).build().unwrap());
    envelope_core::distributed::GlobalLimiter::new(
        "app",
        "app",
        config,
        store.limits(),
        health,
        Duration::from_millis(200),
    )
}

/// A store as both seams.
enum MemoryOrRedis {
    Memory(Arc<MemoryStore>),
    Redis(Arc<RedisStore>),
}

impl MemoryOrRedis {
    fn limits(&self) -> Arc<dyn envelope_core::distributed::LimitStore> {
        match self {
            MemoryOrRedis::Memory(m) => m.clone(),
            MemoryOrRedis::Redis(r) => r.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_admits_its_rate_across_two_instances_on_both_stores() {
    let redis = Redis::start();
    let stores = [
        Arc::new(MemoryOrRedis::Memory(Arc::new(MemoryStore::new()))),
        Arc::new(MemoryOrRedis::Redis(Arc::new(RedisStore::new(&redis.url(), "envelope:").unwrap()))),
    ];
    for store in stores {
        // 100 a minute (bursts of 100), two instances sending 200 each at once.
        let (a, b) = (global(&store, 100), global(&store, 100));
        let mut calls = Vec::new();
        for limiter in [a.clone(), b.clone()] {
            for _ in 0..200 {
                let l = limiter.clone();
                calls.push(tokio::spawn(async move { l.acquire().await.is_ok() }));
            }
        }
        let mut admitted = 0;
        for c in calls {
            admitted += usize::from(c.await.unwrap());
        }
        assert!((100..=102).contains(&admitted), "admitted {admitted} across the fleet");
        let refused = a.acquire().await.unwrap_err();
        assert!(refused.retry_after() > Duration::ZERO && refused.retry_after() <= Duration::from_secs(1));
    }
}

#[tokio::test]
async fn with_the_store_unreachable_each_instance_limits_alone() {
    let store = Arc::new(MemoryStore::new());
    let both = Arc::new(MemoryOrRedis::Memory(store.clone()));
    let (a, b) = (global(&both, 10), global(&both, 10));
    store.set_down(true);
    let mut admitted = 0;
    for _ in 0..20 {
        admitted += usize::from(a.acquire().await.is_ok()) + usize::from(b.acquire().await.is_ok());
    }
    assert_eq!(admitted, 20, "each instance's own limit of 10: never a failure because of the store");
}

/// Counts the store's rate-limit operations.
struct Counting {
    inner: Arc<dyn envelope_core::distributed::LimitStore>,
    calls: std::sync::atomic::AtomicUsize,
}

impl envelope_core::distributed::LimitStore for Counting {
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        burst: u32,
        cost: u32,
    ) -> envelope_core::distributed::BoxFuture<'a, Result<Result<(), Duration>, envelope_core::distributed::StoreError>>
    {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.take(key, interval, burst, cost)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_asks_the_store_once_per_lease_and_never_admits_over_the_limit() {
    let redis = Redis::start();
    let stores: [Arc<dyn envelope_core::distributed::LimitStore>; 2] =
        [Arc::new(MemoryStore::new()), Arc::new(RedisStore::new(&redis.url(), "lease:").unwrap())];
    for inner in stores {
        let counting = Arc::new(Counting { inner, calls: Default::default() });
        let limiter = |n: u32| {
            let config = envelope_core::rate_limit::Config::per(100, Duration::from_secs(60)).build().unwrap();
            let health =
                CircuitBreaker::new("store", Config::builder().count_window(3).minimum_calls(3).build().unwrap());
            envelope_core::distributed::GlobalLimiter::new(
                "app",
                "app",
                config,
                counting.clone(),
                health,
                Duration::from_millis(200),
            )
            .with_lease(n)
        };
        let (a, b) = (limiter(10), limiter(10));
        let mut admitted = 0;
        for _ in 0..200 {
            admitted += usize::from(a.acquire().await.is_ok()) + usize::from(b.acquire().await.is_ok());
        }
        // Never over the limit; under it by at most a lease less one per instance.
        assert!((100 - 2 * 9..=102).contains(&admitted), "admitted {admitted}");
        let asked = counting.calls.load(std::sync::atomic::Ordering::Relaxed);
        // Store operations: about one per lease while the bucket lasts (then one per refused call).
        let while_admitting = asked - (400 - admitted);
        assert!(while_admitting <= 100 / 10 + 4, "{while_admitting} operations for {admitted} admitted calls");
    }
}

#[tokio::test]
async fn per_key_global_limits_are_independent_and_shared_by_the_fleet_on_both_stores() {
    let redis = Redis::start();
    let stores: [Arc<dyn envelope_core::distributed::LimitStore>; 2] =
        [Arc::new(MemoryStore::new()), Arc::new(RedisStore::new(&redis.url(), "keys:").unwrap())];
    for store in stores {
        let limiter = || {
            let config = envelope_core::rate_limit::Config::per(5, Duration::from_secs(60)).build().unwrap();
            let health =
                CircuitBreaker::new("store", Config::builder().count_window(3).minimum_calls(3).build().unwrap());
            envelope_core::distributed::GlobalKeyedLimiter::new(
                "api",
                "api",
                config,
                store.clone(),
                health,
                Duration::from_millis(200),
                std::num::NonZeroUsize::new(100).unwrap(),
            )
        };
        let (a, b) = (limiter(), limiter());
        let mut admitted = std::collections::HashMap::new();
        for _ in 0..10 {
            for key in ["alice", "bob"] {
                for l in [&a, &b] {
                    *admitted.entry(key).or_insert(0) += usize::from(l.acquire(key).await.is_ok());
                }
            }
        }
        // Each key has its own 5 a minute, for the whole fleet: 20 asks each, 5 admitted each.
        assert_eq!(admitted["alice"], 5);
        assert_eq!(admitted["bob"], 5);
        assert!(a.local().is_empty(), "the local fallback was not needed");
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_is_used_and_a_wrong_ca_is_refused() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("envelope-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--tls-cert-file", crt.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap()])
        .args(["--tls-ca-cert-file", crt.to_str().unwrap(), "--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("rediss://127.0.0.1:{port}/0");
    let store: Arc<dyn BreakerStore> =
        Arc::new(RedisStore::with_root_ca(&url, "tls:", cert.cert.pem().into_bytes()).unwrap());
    assert!(store.describe().starts_with("rediss://"), "{}", store.describe());
    let a = instance(&store, "a", "db", config(4, 60_000 * MS));
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.fleet.sync_once().await.is_err() {
        assert!(Instant::now() < deadline, "synced over TLS");
        tokio::time::sleep(50 * MS).await;
    }
    // Another CA: the handshake fails, so the store is unreachable (and the breaker decides alone).
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let wrong: Arc<dyn BreakerStore> =
        Arc::new(RedisStore::with_root_ca(&url, "tls:", other.cert.pem().into_bytes()).unwrap());
    let b = instance(&wrong, "b", "db", config(4, 60_000 * MS));
    assert!(b.fleet.sync_once().await.is_err());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three `redis-server`s in cluster mode on free ports, made one cluster by `redis-cli --cluster create`.
struct Cluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("envelope-redis-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> =
            (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        let nodes = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{port}.conf")])
                    .current_dir(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let cluster = Cluster { nodes, ports, dir };
        let cli = |port: u16, args: &[&str]| {
            let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.ports.iter().any(|p| cli(*p, &["PING"]).trim() != "PONG") {
            assert!(Instant::now() < deadline, "cluster nodes start");
            std::thread::sleep(10 * MS);
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        while !cluster.ports.iter().all(|p| cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "the cluster is ready");
            std::thread::sleep(20 * MS);
        }
        cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_breakers_and_limits_of_many_slots() {
    let cluster = Cluster::start();
    let url = format!("redis://127.0.0.1:{}/", cluster.ports[0]);
    let store = Arc::new(RedisStore::cluster(&url, "envelope:").unwrap());
    let breakers: Arc<dyn BreakerStore> = store.clone();
    // Breakers whose keys land on different nodes: each trips through one instance and opens the other.
    for name in ["payments", "inventory", "search", "users", "orders"] {
        let (a, b) = (
            instance(&breakers, "a", name, config(4, 60_000 * MS)),
            instance(&breakers, "b", name, config(4, 60_000 * MS)),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.fleet.sync_once().await.is_err() {
            assert!(Instant::now() < deadline, "reached the cluster");
            tokio::time::sleep(50 * MS).await;
        }
        b.fleet.sync_once().await.unwrap();
        fail(&a.breaker, 4);
        a.fleet.sync_once().await.unwrap();
        b.fleet.sync_once().await.unwrap();
        assert_eq!(b.breaker.state(), State::Open, "{name}");
    }
    // A global limit on the cluster.
    let config = envelope_core::rate_limit::Config::per(5, Duration::from_secs(60)).build().unwrap();
    let health = CircuitBreaker::new("store", Config::builder().count_window(3).minimum_calls(3).build().unwrap());
    let limiter =
        envelope_core::distributed::GlobalLimiter::new("api", "api", config, store, health, Duration::from_millis(500));
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += usize::from(limiter.acquire().await.is_ok());
    }
    assert_eq!(admitted, 5);
    let local = limiter.local().metrics();
    assert_eq!((local.allowed, local.limited), (0, 0), "the cluster decided every call, not the local fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_the_store_follows_the_master_across_a_failover() {
    let (master, replica) = (Redis::start(), Redis::start());
    assert_eq!(replica.cli(&["REPLICAOF", "127.0.0.1", &master.port.to_string()]), "OK");
    let dir = std::env::temp_dir().join(format!("envelope-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds main 1000\nsentinel failover-timeout main 5000\n",
            master.port
        ),
    )
    .unwrap();
    let mut sentinel = Command::new("redis-server")
        .args([conf.to_str().unwrap(), "--sentinel"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ask_sentinel = |args: &[&str]| {
        let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ask_sentinel(&["SENTINEL", "get-master-addr-by-name", "main"]).contains(&master.port.to_string()) {
        assert!(Instant::now() < deadline, "the sentinel knows the master");
        std::thread::sleep(20 * MS);
    }
    let store: Arc<dyn BreakerStore> =
        Arc::new(RedisStore::sentinel(&format!("redis://127.0.0.1:{port}/"), "main", "envelope:").unwrap());
    let a = instance(&store, "a", "db", config(100_000, 60_000 * MS));
    while a.fleet.sync_once().await.is_err() {
        assert!(Instant::now() < deadline, "synced through the sentinel");
        tokio::time::sleep(50 * MS).await;
    }
    assert_eq!(master.cli(&["EXISTS", "envelope:{db}:state"]), "1", "written to the master");

    // Failover: the replica becomes the master; the store finds it through the sentinel.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ask_sentinel(&["SENTINEL", "failover", "main"]).contains("OK") {
        assert!(Instant::now() < deadline, "the sentinel starts a failover (it needs to see the replica first)");
        tokio::time::sleep(200 * MS).await;
    }
    while !ask_sentinel(&["SENTINEL", "get-master-addr-by-name", "main"]).contains(&replica.port.to_string()) {
        assert!(Instant::now() < deadline, "the replica is promoted");
        tokio::time::sleep(50 * MS).await;
    }
    // Outcomes synced after the failover land in the new master's window (a sync cut by the failover loses its
    // counts, so one is recorded before each try).
    loop {
        fail(&a.breaker, 1);
        if a.fleet.sync_once().await.is_ok() && replica.cli(&["EXISTS", "envelope:{db}:window"]) == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "synced with the new master");
        tokio::time::sleep(50 * MS).await;
    }
    assert_eq!(replica.cli(&["ROLE"]).lines().next(), Some("master"));
    let _ = sentinel.kill();
    let _ = sentinel.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
