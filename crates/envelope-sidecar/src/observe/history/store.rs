//! The SQLite side of the history: one row per minute and name in three tables, written by adding to the row of
//! the minute (a flush every few seconds adds to the same row), read back summed over steps.

use std::path::{Path, PathBuf};

use envelope_core::Outcome;
use rusqlite::{Connection, params_from_iter};

use super::tally::{BUCKETS, RouteCounts, Taken, UPSTREAM_COLUMNS};

/// Version of the schema below, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

/// Where the history is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    Memory,
}

pub(crate) struct Store {
    conn: Connection,
    location: Location,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("location", &self.location).finish_non_exhaustive()
    }
}

/// The counted columns of `route_minute`, in the order of [`RouteCounts::values`].
fn route_columns() -> Vec<String> {
    let outcomes = Outcome::ALL.iter().map(|o| format!("o_{}", o.as_str()));
    let buckets = (0..BUCKETS).map(|i| format!("b{i}"));
    let rejected = (0..BUCKETS).map(|i| format!("r{i}"));
    outcomes.chain(buckets).chain(rejected).chain(["duration_us".to_owned()]).collect()
}

/// The counted columns of `upstream_minute`.
fn upstream_columns() -> Vec<String> {
    UPSTREAM_COLUMNS.iter().map(|c| (*c).to_owned()).collect()
}

/// The counted column of `counter_minute`.
fn counter_columns() -> Vec<String> {
    vec!["count".to_owned()]
}

fn schema() -> String {
    let ints = |cols: &[String]| cols.iter().map(|c| format!("{c} INTEGER NOT NULL DEFAULT 0")).collect::<Vec<_>>();
    let upstream = upstream_columns();
    format!(
        "CREATE TABLE IF NOT EXISTS route_minute (minute INTEGER NOT NULL, name TEXT NOT NULL, {}, \
           PRIMARY KEY (minute, name)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS upstream_minute (minute INTEGER NOT NULL, name TEXT NOT NULL, {}, \
           PRIMARY KEY (minute, name)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS counter_minute (minute INTEGER NOT NULL, name TEXT NOT NULL, \
           count INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (minute, name)) WITHOUT ROWID;
         PRAGMA user_version = {SCHEMA_VERSION};",
        ints(&route_columns()).join(", "),
        ints(&upstream).join(", "),
    )
}

/// `INSERT … ON CONFLICT DO UPDATE` that adds `columns` to the row of (minute, name).
fn upsert(table: &str, columns: &[String]) -> String {
    let names = columns.join(", ");
    let values = (3..3 + columns.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let adds = columns.iter().map(|c| format!("{c} = {c} + excluded.{c}")).collect::<Vec<_>>().join(", ");
    format!(
        "INSERT INTO {table} (minute, name, {names}) VALUES (?1, ?2, {values}) \
         ON CONFLICT (minute, name) DO UPDATE SET {adds}"
    )
}

fn init(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the file was written by a newer envelope (schema {version}, this one knows {SCHEMA_VERSION})"
        )));
    }
    conn.execute_batch(&schema())?;
    // A file from an older envelope lacks the columns added since (schema 2: `o_fallback`): added, counting 0.
    for (table, columns) in [("route_minute", route_columns()), ("upstream_minute", upstream_columns())] {
        let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let have = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
        for c in columns.iter().filter(|c| !have.contains(c)) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0"))?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the history at `location`. A file that cannot be used is replaced by memory, and the
    /// reason is returned for the log.
    pub(crate) fn open(location: &Location) -> (Store, Option<String>) {
        if let Location::File(path) = location {
            match Store::open_file(path) {
                Ok(store) => return (store, None),
                Err(e) => {
                    let reason = format!("cannot use {}: {e}", path.display());
                    return (Store::memory(), Some(reason));
                }
            }
        }
        (Store::memory(), None)
    }

    fn open_file(path: &Path) -> rusqlite::Result<Store> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(1))?;
        // WAL: readers (the admin API) never wait for the writer; NORMAL: a power cut may lose the last flush,
        // never the file.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        init(&conn)?;
        Ok(Store { conn, location: Location::File(path.to_owned()) })
    }

    /// An in-memory history (always works).
    pub(crate) fn memory() -> Store {
        let conn = Connection::open_in_memory().expect("SQLite can always open an in-memory database");
        init(&conn).expect("the schema is valid");
        Store { conn, location: Location::Memory }
    }

    #[cfg(test)]
    pub(crate) fn page_count(&self) -> u32 {
        self.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap()
    }

    /// Caps the file at `pages` pages, so that the next writes fail as on a full disk (`SQLITE_FULL`).
    #[cfg(test)]
    pub(crate) fn cap_pages(&self, pages: u32) {
        self.conn.pragma_update(None, "max_page_count", pages).unwrap();
    }

    pub(crate) fn location(&self) -> &Location {
        &self.location
    }

    /// Adds `taken` to the rows of `minute` and deletes rows older than `keep_from` (a minute), in one
    /// transaction.
    pub(crate) fn write(&mut self, minute: i64, taken: &Taken, keep_from: i64) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        let routes = taken.routes.iter().map(|(name, c)| (name, c.values().collect::<Vec<_>>()));
        add_rows(&tx, "route_minute", &route_columns(), minute, routes)?;
        add_rows(
            &tx,
            "upstream_minute",
            &upstream_columns(),
            minute,
            taken.upstreams.iter().map(|(n, v)| (n, v.to_vec())),
        )?;
        add_rows(&tx, "counter_minute", &counter_columns(), minute, taken.counters.iter().map(|(n, v)| (n, vec![*v])))?;
        for table in ["route_minute", "upstream_minute", "counter_minute"] {
            tx.execute(&format!("DELETE FROM {table} WHERE minute < ?1"), [keep_from])?;
        }
        tx.commit()
    }

    /// A route's counts from minute `from` on, summed over steps of `step` minutes: (first minute of the step,
    /// counts), oldest first.
    pub(crate) fn route(&self, name: &str, from: i64, step: i64) -> rusqlite::Result<Vec<(i64, RouteCounts)>> {
        let rows = self.sums("route_minute", &route_columns(), name, from, step)?;
        Ok(rows.into_iter().map(|(t, v)| (t, RouteCounts::from_values(&v))).collect())
    }

    /// An upstream's counts ([`UPSTREAM_COLUMNS`]) from minute `from` on, summed over steps of `step` minutes.
    pub(crate) fn upstream(
        &self,
        name: &str,
        from: i64,
        step: i64,
    ) -> rusqlite::Result<Vec<(i64, [u64; UPSTREAM_COLUMNS.len()])>> {
        let rows = self.sums("upstream_minute", &upstream_columns(), name, from, step)?;
        Ok(rows.into_iter().map(|(t, v)| (t, std::array::from_fn(|i| v[i]))).collect())
    }

    /// A business counter from minute `from` on, summed over steps of `step` minutes.
    pub(crate) fn counter(&self, name: &str, from: i64, step: i64) -> rusqlite::Result<Vec<(i64, u64)>> {
        let rows = self.sums("counter_minute", &counter_columns(), name, from, step)?;
        Ok(rows.into_iter().map(|(t, v)| (t, v[0])).collect())
    }

    /// The rows of `name` in `table` from minute `from` on, each of `columns` summed over steps of `step`
    /// minutes: (first minute of the step, sums in column order), oldest first.
    fn sums(
        &self,
        table: &str,
        columns: &[String],
        name: &str,
        from: i64,
        step: i64,
    ) -> rusqlite::Result<Vec<(i64, Vec<u64>)>> {
        let sums = columns.iter().map(|c| format!("SUM({c})")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT (minute / ?3) * ?3 AS t, {sums} FROM {table} WHERE name = ?1 AND minute >= ?2 \
             GROUP BY t ORDER BY t"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params![name, from, step], |r| {
            let values =
                (0..columns.len()).map(|i| Ok(r.get::<_, i64>(1 + i)? as u64)).collect::<rusqlite::Result<_>>()?;
            Ok((r.get(0)?, values))
        })?;
        rows.collect()
    }
}

/// Adds each (name, values in `columns` order) to its row of `minute` in `table`.
fn add_rows<'a>(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    columns: &[String],
    minute: i64,
    rows: impl Iterator<Item = (&'a String, Vec<u64>)>,
) -> rusqlite::Result<()> {
    use rusqlite::types::Value;
    let mut stmt = tx.prepare_cached(&upsert(table, columns))?;
    for (name, values) in rows {
        let head = [Value::Integer(minute), Value::Text(name.clone())];
        stmt.execute(params_from_iter(head.into_iter().chain(values.into_iter().map(|v| Value::Integer(v as i64)))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tally::Tallies;
    use super::*;

    fn taken(requests: u64) -> Taken {
        let t = Tallies::default();
        let api = t.route("api");
        for _ in 0..requests {
            api.record(Outcome::Ok, 0.002, 1);
        }
        api.record(Outcome::Timeout, 2.0, 1);
        t.counter("orders").fetch_add(requests, std::sync::atomic::Ordering::Relaxed);
        t.upstream("db").count(super::super::tally::UpstreamEvent::Attempt);
        t.take()
    }

    #[test]
    fn flushes_add_to_the_minute_and_steps_sum_minutes() {
        let mut s = Store::memory();
        s.write(100, &taken(3), 0).unwrap();
        s.write(100, &taken(4), 0).unwrap();
        s.write(101, &taken(1), 0).unwrap();
        s.write(160, &taken(1), 0).unwrap();
        let minutes = s.route("api", 0, 1).unwrap();
        assert_eq!(minutes.iter().map(|(t, c)| (*t, c.requests())).collect::<Vec<_>>(), [(100, 9), (101, 2), (160, 2)]);
        assert_eq!(minutes[0].1.outcomes[Outcome::Timeout as usize], 2);
        assert_eq!(minutes[0].1.duration_us, 7 * 2_000 + 2 * 2_000_000);
        let hours = s.route("api", 0, 60).unwrap();
        assert_eq!(hours.iter().map(|(t, c)| (*t, c.requests())).collect::<Vec<_>>(), [(60, 11), (120, 2)]);
        assert_eq!(s.counter("orders", 0, 60).unwrap(), [(60, 8), (120, 1)]);
        assert_eq!(s.upstream("db", 101, 1).unwrap().len(), 2, "`from` leaves out older minutes");
        assert!(s.route("other", 0, 1).unwrap().is_empty());
    }

    #[test]
    fn retention_deletes_older_minutes() {
        let mut s = Store::memory();
        s.write(10, &taken(1), 0).unwrap();
        s.write(20, &taken(1), 15).unwrap();
        assert_eq!(s.route("api", 0, 1).unwrap().iter().map(|(t, _)| *t).collect::<Vec<_>>(), [20]);
        assert_eq!(s.counter("orders", 0, 1).unwrap().len(), 1);
    }

    #[test]
    fn a_file_survives_reopening_and_garbage_degrades_to_memory() {
        let dir = std::env::temp_dir().join(format!("envelope-store-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.db");
        let (mut s, problem) = Store::open(&Location::File(path.clone()));
        assert_eq!(problem, None);
        s.write(5, &taken(2), 0).unwrap();
        drop(s);
        let (s, problem) = Store::open(&Location::File(path.clone()));
        assert_eq!(problem, None);
        assert_eq!(s.route("api", 0, 1).unwrap()[0].1.requests(), 3);

        let bad = dir.join("bad.db");
        std::fs::write(&bad, vec![0x5a; 8192]).unwrap();
        let (mut s, problem) = Store::open(&Location::File(bad.clone()));
        assert_eq!(s.location(), &Location::Memory);
        assert!(problem.unwrap().contains("bad.db"));
        s.write(1, &taken(1), 0).unwrap();
        assert_eq!(std::fs::read(&bad).unwrap(), vec![0x5a; 8192], "a file that is not ours is left alone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_of_the_first_schema_gains_the_new_columns_and_keeps_its_rows() {
        let dir = std::env::temp_dir().join(format!("envelope-store-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.db");
        {
            // Schema 1: every column but `o_fallback`, one row in it.
            let conn = Connection::open(&path).unwrap();
            let old: Vec<_> = route_columns().into_iter().filter(|c| c != "o_fallback").collect();
            let ints = old.iter().map(|c| format!("{c} INTEGER NOT NULL DEFAULT 0")).collect::<Vec<_>>().join(", ");
            conn.execute_batch(&format!(
                "CREATE TABLE route_minute (minute INTEGER NOT NULL, name TEXT NOT NULL, {ints}, \
                 PRIMARY KEY (minute, name)) WITHOUT ROWID; \
                 INSERT INTO route_minute (minute, name, o_ok) VALUES (5, 'api', 4); PRAGMA user_version = 1;"
            ))
            .unwrap();
        }
        let (mut s, problem) = Store::open(&Location::File(path.clone()));
        assert_eq!(problem, None);
        s.write(5, &taken(2), 0).unwrap();
        let minute = &s.route("api", 0, 1).unwrap()[0].1;
        assert_eq!(minute.requests(), 7, "the old row's 4 and the new 3");
        assert_eq!(minute.outcomes[Outcome::Fallback as usize], 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
