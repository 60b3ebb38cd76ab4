//! Happy-path overhead of each policy, a five-policy composite, open-breaker rejection, and two threads on one
//! breaker — for Envelope and for the Rust peers a user would pick instead — plus heap allocations per call.
//!
//! Every subject is a closure making one call that succeeds at once, driven in the same way (one poll with a
//! no-op waker inside a tokio runtime context), next to a no-op baseline in the same run. Results: criterion's
//! own output, and `target/envelope-bench/extra.json` (allocations per call, two-thread scaling), which
//! `benches/report.py` turns into the tables in BENCHMARKS.md.
#![allow(unsafe_code)] // the counting allocator below is the only unsafe code

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::{Future, ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::Criterion;
use envelope_core::Outcome;
use envelope_core::bulkhead::{Bulkhead, Config as BulkheadConfig};
use envelope_core::circuit_breaker::{CircuitBreaker, Config as BreakerConfig, State};
use envelope_core::rate_limit::{Config as RateConfig, RateLimiter};
use envelope_core::retry::{Config as RetryConfig, Retry};
use envelope_core::timeout::Timeout;
use envelope_core::{Envelope, EnvelopeLayer};
use tower_layer::Layer;
use tower_service::Service;

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const LONG: Duration = Duration::from_secs(3600);

/// Polls `f` once; every subject completes on its first poll.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a happy-path call must complete at once"),
    }
}

/// One tower call: readiness, then the call, both completing at once.
fn tower_call<S: Service<u64>>(svc: &mut S, req: u64) -> S::Response
where
    S::Error: std::fmt::Debug,
{
    match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("service not ready"),
    }
    now(svc.call(req)).expect("call succeeds")
}

fn ok_service() -> impl Service<
    u64,
    Response = u64,
    Error = envelope_core::BoxError,
    Future = std::future::Ready<Result<u64, envelope_core::BoxError>>,
> + Clone {
    tower::service_fn(|r: u64| ready(Ok::<_, envelope_core::BoxError>(r)))
}

type Call = Box<dyn FnMut()>;

/// A benchmarked subject: group (the policy), who, and one call.
struct Subject {
    group: &'static str,
    who: &'static str,
    call: Call,
}

fn subject(group: &'static str, who: &'static str, call: impl FnMut() + 'static) -> Subject {
    Subject { group, who, call: Box::new(call) }
}

fn envelope_breaker(name: &str) -> CircuitBreaker {
    CircuitBreaker::new(name.to_owned(), BreakerConfig::default())
}

/// The five-policy composite: timeout + retry + breaker + rate limit + bulkhead.
fn envelope_composite() -> Envelope {
    Envelope::builder()
        .retry(Retry::new("r", RetryConfig::default()))
        .circuit_breaker(envelope_breaker("b"))
        .rate_limiter(RateLimiter::new("l", RateConfig::per_second(1_000_000_000).build().unwrap()))
        .bulkhead(Bulkhead::new("bh", BulkheadConfig::builder().max_concurrent(1000).build().unwrap()))
        .attempt_timeout(LONG)
        .build()
}

#[derive(Clone)]
struct TowerAttempts(u32);

impl<Res, E> tower::retry::Policy<u64, Res, E> for TowerAttempts {
    type Future = std::future::Ready<()>;
    fn retry(&mut self, _req: &mut u64, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => None,
            Err(_) if self.0 > 1 => {
                self.0 -= 1;
                Some(ready(()))
            }
            Err(_) => None,
        }
    }
    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

/// The nested error type of tower-resilience's stack below its retry layer.
type StackError = tower_resilience::circuitbreaker::CircuitBreakerError<
    tower_resilience::ratelimiter::RateLimiterServiceError<
        tower_resilience::bulkhead::BulkheadServiceError<envelope_core::BoxError>,
    >,
>;

fn subjects() -> Vec<Subject> {
    use tower_resilience::bulkhead::BulkheadLayer;
    use tower_resilience::circuitbreaker::CircuitBreakerLayer;
    use tower_resilience::ratelimiter::RateLimiterLayer;
    use tower_resilience::retry::RetryLayer;
    use tower_resilience::timelimiter::TimeLimiterLayer;

    let mut s = Vec::new();
    s.push(subject("baseline", "no-op future", || {
        black_box(now(ready(black_box(1u64))));
    }));
    let mut plain = ok_service();
    s.push(subject("baseline", "no-op tower service", move || {
        black_box(tower_call(&mut plain, 1));
    }));

    // Retry (first attempt succeeds).
    let retry = Retry::new("r", RetryConfig::default());
    s.push(subject("retry", "envelope", move || {
        black_box(now(retry.call(|| ready(Ok::<u64, &str>(1)))).unwrap());
    }));
    let mut tr = RetryLayer::<u64, u64, envelope_core::BoxError>::builder().max_attempts(3).build().layer(ok_service());
    s.push(subject("retry", "tower-resilience", move || {
        black_box(tower_call(&mut tr, 1));
    }));
    let mut tw = tower::retry::RetryLayer::new(TowerAttempts(3)).layer(ok_service());
    s.push(subject("retry", "tower", move || {
        black_box(tower_call(&mut tw, 1));
    }));

    // Circuit breaker, closed, successful calls.
    let b = envelope_breaker("b");
    s.push(subject("circuit breaker", "envelope (async call)", move || {
        black_box(now(b.call(|| ready(Ok::<u64, &str>(1)))).unwrap());
    }));
    let b = envelope_breaker("b");
    s.push(subject("circuit breaker", "envelope (permit)", move || {
        b.try_acquire().unwrap().record(Outcome::Ok);
    }));
    let mut tcb = CircuitBreakerLayer::builder().build().unwrap().layer(ok_service());
    s.push(subject("circuit breaker", "tower-resilience", move || {
        black_box(tower_call(&mut tcb, 1));
    }));
    let fs = failsafe::Config::new().build();
    s.push(subject("circuit breaker", "failsafe", move || {
        black_box(failsafe::CircuitBreaker::call(&fs, || Ok::<u64, ()>(1)).unwrap());
    }));
    let rc = recloser::Recloser::custom().build();
    s.push(subject("circuit breaker", "recloser", move || {
        black_box(rc.call(|| Ok::<u64, ()>(1)).unwrap());
    }));

    // Timeout (the call finishes in time).
    let t = Timeout::new(LONG);
    s.push(subject("timeout", "envelope", move || {
        black_box(now(t.call(|| ready(Ok::<u64, &str>(1)))).unwrap());
    }));
    let mut tt = TimeLimiterLayer::builder().timeout_duration(LONG).build().layer(ok_service());
    s.push(subject("timeout", "tower-resilience", move || {
        black_box(tower_call(&mut tt, 1));
    }));
    let mut tto = tower::timeout::TimeoutLayer::new(LONG).layer(ok_service());
    s.push(subject("timeout", "tower", move || {
        black_box(tower_call(&mut tto, 1));
    }));

    // Bulkhead (free permits).
    let bh = Bulkhead::new("bh", BulkheadConfig::builder().max_concurrent(1000).build().unwrap());
    s.push(subject("bulkhead", "envelope", move || {
        black_box(now(bh.call(|| ready(Ok::<u64, &str>(1)))).unwrap());
    }));
    let mut tbh = BulkheadLayer::builder().max_concurrent_calls(1000).build().unwrap().layer(ok_service());
    s.push(subject("bulkhead", "tower-resilience", move || {
        black_box(tower_call(&mut tbh, 1));
    }));
    let mut tcl = tower::limit::ConcurrencyLimitLayer::new(1000).layer(ok_service());
    s.push(subject("bulkhead", "tower (ConcurrencyLimit)", move || {
        black_box(tower_call(&mut tcl, 1));
    }));

    // Rate limiter (far below the limit).
    let rl = RateLimiter::new("l", RateConfig::per_second(1_000_000_000).build().unwrap());
    s.push(subject("rate limiter", "envelope", move || {
        black_box(now(rl.call(|| ready(Ok::<u64, &str>(1)))).unwrap());
    }));
    let mut trl = RateLimiterLayer::builder()
        .limit_for_period(1_000_000_000)
        .refresh_period(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(ok_service());
    s.push(subject("rate limiter", "tower-resilience", move || {
        black_box(tower_call(&mut trl, 1));
    }));
    let mut twr = tower::limit::RateLimitLayer::new(1_000_000_000, Duration::from_secs(1)).layer(ok_service());
    s.push(subject("rate limiter", "tower (RateLimit)", move || {
        black_box(tower_call(&mut twr, 1));
    }));

    // Composite: timeout + retry + breaker + rate limit + bulkhead.
    let env = envelope_composite();
    s.push(subject("composite", "envelope (async call)", move || {
        black_box(now(env.call(|| ready(Ok::<u64, &str>(1)))).unwrap());
    }));
    let mut envl = EnvelopeLayer::new(envelope_composite()).layer(ok_service());
    s.push(subject("composite", "envelope (tower layer)", move || {
        black_box(tower_call(&mut envl, 1));
    }));
    let mut trs = tower::ServiceBuilder::new()
        .layer(TimeLimiterLayer::builder().timeout_duration(LONG).build())
        .layer(RetryLayer::<u64, u64, StackError>::builder().max_attempts(3).build())
        .layer(CircuitBreakerLayer::builder().build().unwrap())
        .layer(
            RateLimiterLayer::builder()
                .limit_for_period(1_000_000_000)
                .refresh_period(Duration::from_secs(1))
                .build()
                .unwrap(),
        )
        .layer(BulkheadLayer::builder().max_concurrent_calls(1000).build().unwrap())
        .service(ok_service());
    s.push(subject("composite", "tower-resilience", move || {
        black_box(tower_call(&mut trs, 1));
    }));

    // Open breaker: the cost of a rejection.
    let b = CircuitBreaker::new("open", BreakerConfig::builder().open_duration(LONG).build().unwrap());
    b.transition_to(State::Open);
    s.push(subject("open breaker rejection", "envelope", move || {
        black_box(b.try_acquire().is_err());
    }));
    let policy = failsafe::failure_policy::consecutive_failures(1, failsafe::backoff::constant(LONG));
    let fs = failsafe::Config::new().failure_policy(policy).build();
    let _ = failsafe::CircuitBreaker::call(&fs, || Err::<(), ()>(()));
    s.push(subject("open breaker rejection", "failsafe", move || {
        black_box(failsafe::CircuitBreaker::call(&fs, || Ok::<u64, ()>(1)).is_err());
    }));
    let rc = recloser::Recloser::custom().closed_len(1).open_wait(LONG).build();
    for _ in 0..2 {
        let _ = rc.call(|| Err::<(), ()>(()));
    }
    s.push(subject("open breaker rejection", "recloser", move || {
        black_box(rc.call(|| Ok::<u64, ()>(1)).is_err());
    }));
    s
}

/// Allocations per call, after a warm-up.
fn allocations_per_call(call: &mut Call) -> f64 {
    for _ in 0..2_000 {
        call();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    const N: usize = 10_000;
    for _ in 0..N {
        call();
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
}

/// Calls per second on one shared breaker with `threads` threads, each making `per_thread` successful calls.
fn breaker_throughput(make_call: &(dyn Fn() -> Box<dyn Fn() + Send> + Sync), threads: usize, per_thread: usize) -> f64 {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let call = make_call();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = std::time::Instant::now();
                for _ in 0..per_thread {
                    call();
                }
                start.elapsed()
            })
        })
        .collect();
    barrier.wait();
    let slowest = handles.into_iter().map(|h| h.join().unwrap()).max().unwrap();
    (threads * per_thread) as f64 / slowest.as_secs_f64()
}

fn scaling() -> Vec<(String, Vec<f64>)> {
    type Maker = Box<dyn Fn() -> Box<dyn Fn() + Send> + Sync>;
    let mut makers: Vec<(String, Maker)> = Vec::new();
    let b = envelope_breaker("shared");
    makers.push((
        "envelope".into(),
        Box::new(move || {
            let b = b.clone();
            Box::new(move || b.try_acquire().unwrap().record(Outcome::Ok))
        }),
    ));
    let fs = Arc::new(failsafe::Config::new().build());
    makers.push((
        "failsafe".into(),
        Box::new(move || {
            let fs = fs.clone();
            Box::new(move || {
                black_box(failsafe::CircuitBreaker::call(&*fs, || Ok::<u64, ()>(1)).unwrap());
            })
        }),
    ));
    let rc = Arc::new(recloser::Recloser::custom().build());
    makers.push((
        "recloser".into(),
        Box::new(move || {
            let rc = rc.clone();
            Box::new(move || {
                black_box(rc.call(|| Ok::<u64, ()>(1)).unwrap());
            })
        }),
    ));
    // Interleaved: 1 thread, 2 threads, for every subject, 7 rounds; ratios per round.
    let mut ratios: Vec<(String, Vec<f64>)> = makers.iter().map(|(n, _)| (n.clone(), Vec::new())).collect();
    for _ in 0..7 {
        for (i, (_, make)) in makers.iter().enumerate() {
            let one = breaker_throughput(make.as_ref(), 1, 20_000_000);
            let two = breaker_throughput(make.as_ref(), 2, 20_000_000);
            ratios[i].1.push(two / one);
        }
    }
    ratios
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let _guard = runtime.enter();
    let mut subjects = subjects();

    let mut extra = String::from("{\n  \"allocations_per_call\": {\n");
    let allocs: Vec<String> = subjects
        .iter_mut()
        .map(|s| format!("    \"{}/{}\": {}", s.group, s.who, allocations_per_call(&mut s.call)))
        .collect();
    extra += &allocs.join(",\n");
    extra += "\n  },\n  \"two_thread_scaling\": {\n";
    let scaling: Vec<String> = scaling()
        .into_iter()
        .map(|(who, r)| {
            format!("    \"{who}\": [{}]", r.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", "))
        })
        .collect();
    extra += &scaling.join(",\n");
    extra += "\n  }\n}\n";
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/envelope-bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("extra.json"), &extra).unwrap();
    println!("{extra}");

    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for s in subjects.iter_mut() {
        let mut group = c.benchmark_group(s.group);
        group.bench_function(s.who, |b| b.iter(&mut s.call));
        group.finish();
    }
    c.final_summary();
}
