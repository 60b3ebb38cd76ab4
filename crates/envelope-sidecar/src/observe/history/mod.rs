//! Metrics history: per-minute rollups per route, upstream and business counter in an embedded SQLite file.
//!
//! The request path only adds to in-memory tallies ([`tally`]); one background task takes them every
//! `flush_interval` (and at each minute boundary) and adds them to the rows of the current minute in SQLite
//! ([`store`]), deleting rows older than the retention in the same transaction. A crash loses at most one flush
//! interval; a graceful shutdown flushes first. If the file cannot be opened (a directory that is not writable, a
//! file that is not a database) or a write fails (full disk), the history logs why once and carries on in memory:
//! requests never wait for, or fail because of, the history.

pub(crate) mod store;
pub(crate) mod tally;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envelope_core::Outcome;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use self::store::{Location, Store};
use self::tally::{RouteCounts, Tallies, UPSTREAM_COLUMNS, quantile};

/// The history of one sidecar.
#[derive(Debug)]
pub(crate) struct History {
    tallies: Arc<Tallies>,
    store: Mutex<Store>,
    /// Rows older than this many minutes are deleted (follows config reloads).
    retention_minutes: AtomicI64,
}

/// The current minute since the Unix epoch, by the wall clock.
fn minute_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| (d.as_secs() / 60) as i64)
}

impl History {
    /// Opens the history at `path` (`None`: in memory only), logging on standard error if it falls back to memory.
    pub(crate) fn open(path: Option<&std::path::Path>, retention: Duration, tallies: Arc<Tallies>) -> Arc<History> {
        let location = path.map_or(Location::Memory, |p| Location::File(p.to_owned()));
        let (store, problem) = Store::open(&location);
        if let Some(problem) = problem {
            eprintln!("envelope: history: {problem}; keeping the history in memory (it will not survive a restart)");
        }
        let history = History { tallies, store: Mutex::new(store), retention_minutes: AtomicI64::new(0) };
        history.set_retention(retention);
        Arc::new(history)
    }

    pub(crate) fn set_retention(&self, retention: Duration) {
        self.retention_minutes.store((retention.as_secs() / 60).max(1) as i64, Ordering::Relaxed);
    }

    /// Moves what the tallies counted into the rows of `minute` (blocking: SQLite).
    pub(crate) fn flush(&self, minute: i64) {
        let taken = self.tallies.take();
        let keep_from = minute - self.retention_minutes.load(Ordering::Relaxed);
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = store.write(minute, &taken, keep_from) {
            if let Location::File(path) = store.location() {
                eprintln!(
                    "envelope: history: cannot write {}: {e}; keeping the history in memory from now on",
                    path.display()
                );
                *store = Store::memory();
                if store.write(minute, &taken, keep_from).is_ok() {
                    return;
                }
            }
            // Memory itself failed (it does not, short of running out of it): try again at the next flush.
            self.tallies.give_back(&taken);
        }
    }

    /// Flushes every `interval` and at each minute boundary until `shutdown` turns true, then flushes once more.
    pub(crate) async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            let now = SystemTime::now();
            let into_minute = now
                .duration_since(UNIX_EPOCH)
                .map_or(Duration::ZERO, |d| d - Duration::from_secs(d.as_secs() / 60 * 60));
            let wait = interval.min(Duration::from_secs(60) - into_minute);
            // The counts belong to the minute the wait ends in (a wake-up at a boundary closes the minute before).
            let minute = minute_of(now + wait - Duration::from_millis(1));
            let stop = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            let minute = if stop { minute_of(SystemTime::now()) } else { minute };
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.flush(minute)).await;
            if stop {
                return;
            }
        }
    }

    /// Answers `/api/v1/history`: the series of one route, upstream or business counter over the last `span`,
    /// summed over `step` (each a whole number of minutes).
    pub(crate) fn query(&self, subject: &Subject, span: Duration, step: Duration) -> Result<Value, String> {
        let step_min = (step.as_secs() / 60).max(1) as i64;
        let now = minute_of(SystemTime::now());
        let from = (now - (span.as_secs() / 60) as i64 + 1).max(0);
        let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        let storage = match store.location() {
            Location::File(_) => "file",
            Location::Memory => "memory",
        };
        let fail = |e: rusqlite::Error| format!("history query failed: {e}");
        let (key, name, points): (&str, &str, Vec<Value>) = match subject {
            Subject::Route(name) => {
                let rows = store.route(name, from, step_min).map_err(fail)?;
                ("route", name, rows.iter().map(|(t, c)| route_point(*t, c)).collect())
            }
            Subject::Upstream(name) => {
                let rows = store.upstream(name, from, step_min).map_err(fail)?;
                let points = rows
                    .iter()
                    .map(|(t, v)| {
                        let mut p = Map::new();
                        p.insert("t".into(), json!(t * 60));
                        for (c, x) in UPSTREAM_COLUMNS.iter().zip(v) {
                            p.insert((*c).into(), json!(x));
                        }
                        Value::Object(p)
                    })
                    .collect();
                ("upstream", name, points)
            }
            Subject::Counter(name) => {
                let rows = store.counter(name, from, step_min).map_err(fail)?;
                ("counter", name, rows.iter().map(|(t, n)| json!({ "t": t * 60, "count": n })).collect())
            }
        };
        Ok(json!({
            key: name,
            "from": from * 60,
            "to": (now + 1) * 60,
            "step_seconds": step_min * 60,
            "storage": storage,
            "points": points,
        }))
    }
}

impl History {
    /// What live traffic did on a scenario's route over its window, from the rollups (which trail by at most one
    /// flush interval).
    pub(crate) fn measure(&self, s: &crate::config::Scenario) -> Result<crate::observe::quality::Measured, String> {
        let now = minute_of(SystemTime::now());
        let from = now - (s.window.as_secs() / 60).max(1) as i64 + 1;
        let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        let fail = |e: rusqlite::Error| format!("history query failed: {e}");
        let mut c = RouteCounts::default();
        for (_, minute) in store.route(&s.route, from, 1).map_err(fail)? {
            c.add(&minute);
        }
        let mut counters = std::collections::BTreeMap::new();
        for (name, _) in &s.expect.counters {
            let grew = store.counter(name, from, 1).map_err(fail)?.iter().map(|(_, n)| n).sum();
            counters.insert(name.clone(), grew);
        }
        let requests = c.requests();
        Ok(crate::observe::quality::Measured {
            requests,
            served: requests - c.errors(),
            p99: quantile(&c.buckets, 0.99).map(Duration::from_secs_f64),
            fast_failed: c.rejected.iter().sum(),
            fast_fail_p99: quantile(&c.rejected, 0.99).map(Duration::from_secs_f64),
            counters,
        })
    }
}

/// What a history query is about.
#[derive(Debug, Clone)]
pub(crate) enum Subject {
    Route(String),
    Upstream(String),
    Counter(String),
}

fn route_point(minute: i64, c: &RouteCounts) -> Value {
    let count = |o: Outcome| c.outcomes[o as usize];
    let errors = c.errors();
    let outcomes: Map<String, Value> =
        Outcome::ALL.iter().filter(|o| count(**o) > 0).map(|o| (o.as_str().to_owned(), json!(count(*o)))).collect();
    let requests = c.requests();
    let ms = |s: Option<f64>| s.map(|s| (s * 1e6).round() / 1e3);
    json!({
        "t": minute * 60,
        "requests": requests,
        "errors": errors,
        "shed": count(Outcome::Shed),
        "rejected": count(Outcome::CircuitOpen) + count(Outcome::BulkheadFull) + count(Outcome::LocalRateLimited),
        "outcomes": outcomes,
        "latency_ms": {
            "mean": (requests > 0).then(|| (c.duration_us as f64 / requests as f64).round() / 1e3),
            "p50": ms(quantile(&c.buckets, 0.5)),
            "p95": ms(quantile(&c.buckets, 0.95)),
            "p99": ms(quantile(&c.buckets, 0.99)),
            "fast_fail_p99": ms(quantile(&c.rejected, 0.99)),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_moves_the_history_to_memory_and_loses_nothing() {
        let dir = std::env::temp_dir().join(format!("envelope-full-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let tallies = Arc::new(Tallies::default());
        let history = History::open(Some(&dir.join("h.db")), Duration::from_secs(86_400), tallies.clone());
        let api = tallies.route("api");
        api.record(Outcome::Ok, 0.001, 1);
        history.flush(1000);
        // The disk fills up: SQLite answers SQLITE_FULL to the next write.
        {
            let store = history.store.lock().unwrap();
            let pages: u32 = store.page_count();
            store.cap_pages(pages);
        }
        for minute in 1001..1100 {
            for _ in 0..10 {
                api.record(Outcome::Ok, 0.001, 1);
            }
            tallies.counter(&format!("c{minute}")).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            history.flush(minute);
        }
        let store = history.store.lock().unwrap();
        assert_eq!(store.location(), &Location::Memory, "the history moved to memory");
        let in_memory: u64 = store.route("api", 0, 1).unwrap().iter().map(|(_, c)| c.requests()).sum();
        drop(store);
        // Nothing was lost: what the file took before it filled up, plus what memory took from the failed flush
        // on, is every request counted.
        let (file, _) = Store::open(&Location::File(dir.join("h.db")));
        let in_file: u64 = file.route("api", 0, 1).unwrap().iter().map(|(_, c)| c.requests()).sum();
        assert!(in_memory > 0 && in_file > 1, "both hold some: {in_file} + {in_memory}");
        assert_eq!(in_file + in_memory, 991);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
