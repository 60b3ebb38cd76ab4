//! Envelope's distributed mode over Redis: [`RedisStore`], the shared-breaker store of
//! [`envelope_core::distributed`], usable with or without the sidecar.
//!
//! Each step of the protocol is one Lua script, so it is atomic however many instances run it at once: `sync`
//! adds an instance's counts (once per sequence number) and reads the fleet's window, `transition` moves the
//! breaker only if it is still at the epoch the caller saw, `claim` hands out half-open probes. Time is Redis's
//! own (`TIME`), so the instances' clocks never need to agree.
//!
//! A shared rate limit is one key, `{prefix}{<name>}:limit`: its GCRA arrival time, in Redis's microseconds,
//! expiring when the limit is full again.
//!
//! # Keys
//! Per breaker, under the prefix (default `envelope:`), with the breaker's name as a hash tag so that the three
//! keys share one cluster slot: `{prefix}{<name>}:state` (a hash: state, epoch, deadline, probes, opens, who
//! decided), `{prefix}{<name>}:window` (a hash of one-second buckets of this epoch) and `{prefix}{<name>}:seq`
//! (each instance's last sequence number). Every write sets a TTL (the state and sequence keys an hour, the
//! window its length plus a minute), refreshed by every sync, so a breaker no instance uses any more leaves
//! nothing behind.
//!
//! # Connection
//! One multiplexed connection, made on first use and made again after an I/O error; never before: a sidecar
//! starts while Redis is down. Every operation's timeout is the caller's ([`envelope_core::distributed::Fleet`]
//! puts each one within its `op_timeout`).

use std::time::Duration;

use envelope_core::circuit_breaker::{Snapshot, State};
use envelope_core::distributed::{
    BoxFuture, BreakerStore, FleetView, LimitStore, StoreError, SyncRequest, TransitionRequest,
};
use redis::aio::MultiplexedConnection;
use redis::{Client, Script};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "envelope:";
/// How long the state and sequence keys live after the last sync.
const STATE_TTL: Duration = Duration::from_secs(3600);

/// The shared-breaker store in Redis (see the crate docs).
pub struct RedisStore {
    client: Backend,
    prefix: String,
    describe: String,
    conn: tokio::sync::Mutex<Option<Conn>>,
    sync: Script,
    transition: Script,
    claim: Script,
    take: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("at", &self.describe).field("prefix", &self.prefix).finish()
    }
}

/// One server, or a Redis Cluster reached through one of its nodes.
enum Backend {
    Single(Box<Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
    /// The master Sentinel names now, asked again whenever the connection breaks (a failover).
    Sentinel(Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
}

/// A connection of either kind (both multiplexed, cheap to clone).
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Creates the breaker's state if the store has none; then `epoch` and `state` hold its current values.
const ENSURE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'epoch', 1, 'until', 0, 'probes_left', 0,
    'pc', 0, 'pf', 0, 'ps', 0, 'opens', 0, 'by', '')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = tonumber(t[1])
local function view(made, window_c, window_f, window_s)
  local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'until', 'pc', 'pf', 'ps', 'probes_left', 'opens', 'by')
  return {tostring(made), h[1], h[2], h[3], tostring(now), tostring(window_c), tostring(window_f),
    tostring(window_s), h[4], h[5], h[6], h[7], h[8], h[9]}
end
"#;

/// KEYS: state, window, seq. ARGV: instance, seq, epoch, calls, failures, slow, probe calls, probe failures, probe
/// slow, window seconds, state TTL ms.
const SYNC: &str = r#"
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local state = redis.call('HGET', KEYS[1], 'state')
local seen = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local seq = tonumber(ARGV[2])
local ws = tonumber(ARGV[10])
if seq > seen then
  redis.call('HSET', KEYS[3], ARGV[1], seq)
  if tonumber(ARGV[3]) == epoch then
    if tonumber(ARGV[4]) > 0 then
      redis.call('HINCRBY', KEYS[2], sec .. ':c', ARGV[4])
      if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[2], sec .. ':f', ARGV[5]) end
      if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', KEYS[2], sec .. ':s', ARGV[6]) end
    end
    if state == 'half_open' and tonumber(ARGV[7]) > 0 then
      redis.call('HINCRBY', KEYS[1], 'pc', ARGV[7])
      redis.call('HINCRBY', KEYS[1], 'pf', ARGV[8])
      redis.call('HINCRBY', KEYS[1], 'ps', ARGV[9])
    end
  end
end
local c, f, s = 0, 0, 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local name = fields[i]
  local colon = string.find(name, ':', 1, true)
  local bucket = tonumber(string.sub(name, 1, colon - 1))
  if bucket + ws <= sec then
    redis.call('HDEL', KEYS[2], name)
  else
    local kind = string.sub(name, colon + 1)
    local v = tonumber(fields[i + 1])
    if kind == 'c' then c = c + v elseif kind == 'f' then f = f + v else s = s + v end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PEXPIRE', KEYS[3], ARGV[11])
if #fields > 0 then redis.call('PEXPIRE', KEYS[2], (ws + 60) * 1000) end
return view(0, c, f, s)
"#;

/// KEYS: state, window. ARGV: instance, from epoch ('' for any), to, duration ms ('' for none), probes, opens,
/// state TTL ms.
const TRANSITION: &str = r#"
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local made = 0
if ARGV[2] == '' or tonumber(ARGV[2]) == epoch then
  local to = ARGV[3]
  local deadline = 0
  if (to == 'open' or to == 'half_open') and ARGV[4] ~= '' then deadline = now + tonumber(ARGV[4]) end
  local probes = 0
  if to == 'half_open' then probes = tonumber(ARGV[5]) end
  redis.call('HSET', KEYS[1], 'state', to, 'epoch', epoch + 1, 'until', deadline, 'probes_left', probes,
    'pc', 0, 'pf', 0, 'ps', 0, 'opens', ARGV[6], 'by', ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  made = 1
end
return view(made, 0, 0, 0)
"#;

/// GCRA. KEYS: the limit's key. ARGV: interval µs, burst, cost. Returns 0 when admitted, else the wait in µs.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next = tat + interval * tonumber(ARGV[3])
local allow_at = next - interval * tonumber(ARGV[2])
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], next, 'PX', math.floor((next - now) / 1000) + 1)
return 0
"#;

/// KEYS: state. ARGV: epoch, want.
const CLAIM: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'probes_left')
if h[1] ~= 'half_open' or tonumber(h[2]) ~= tonumber(ARGV[1]) then return 0 end
local granted = math.min(tonumber(ARGV[2]), tonumber(h[3]))
if granted > 0 then redis.call('HINCRBY', KEYS[1], 'probes_left', -granted) end
return granted
"#;

impl RedisStore {
    /// A store at `url` (`redis://[user:password@]host:port/db`), its keys under `prefix`. Nothing is connected
    /// yet: the first operation connects.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = Client::open(url).map_err(|e| StoreError(format!("invalid Redis address: {e}")))?;
        Ok(Self::with_client(Backend::Single(Box::new(client)), prefix))
    }

    /// A store in the Redis Cluster that `url` (any of its nodes) belongs to; the cluster's other nodes are
    /// discovered from it. Each breaker's and limit's keys share one hash slot (their name is the hash tag), so
    /// every script runs on one node.
    pub fn cluster(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = redis::cluster::ClusterClient::new(vec![url])
            .map_err(|e| StoreError(format!("invalid Redis Cluster address: {e}")))?;
        let info = Client::open(url).map_err(|e| StoreError(format!("invalid Redis address: {e}")))?;
        let mut store = Self::with_client(Backend::Cluster(Box::new(client)), prefix);
        store.describe = format!("redis cluster via {}", info.get_connection_info().addr());
        Ok(store)
    }

    /// A store at the master that the Sentinel at `url` names for `service`; after a failover, the next
    /// operation asks the Sentinel again.
    pub fn sentinel(url: &str, service: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = redis::sentinel::SentinelClient::build(
            vec![url],
            service,
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|e| StoreError(format!("invalid Sentinel address: {e}")))?;
        let mut store = Self::with_client(Backend::Sentinel(Box::new(tokio::sync::Mutex::new(client))), prefix);
        store.describe = format!("redis master `{service}` via sentinel {url}");
        Ok(store)
    }

    /// Like [`RedisStore::new`] for a `rediss://` address whose server certificate is checked against `root_pem`
    /// (PEM certificates: a private CA, or the server's own) instead of the system's roots.
    pub fn with_root_ca(url: &str, prefix: &str, root_pem: Vec<u8>) -> Result<RedisStore, StoreError> {
        let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(root_pem) };
        let client =
            Client::build_with_tls(url, certs).map_err(|e| StoreError(format!("invalid Redis address or CA: {e}")))?;
        Ok(Self::with_client(Backend::Single(Box::new(client)), prefix))
    }

    fn with_client(client: Backend, prefix: &str) -> RedisStore {
        // A cluster store says which node it reached the cluster through (set by `cluster`).
        let describe = match &client {
            Backend::Single(c) => {
                let addr = c.get_connection_info().addr();
                let scheme = if matches!(addr, redis::ConnectionAddr::TcpTls { .. }) { "rediss" } else { "redis" };
                format!("{scheme}://{addr}")
            }
            Backend::Cluster(_) | Backend::Sentinel(_) => String::new(),
        };
        RedisStore {
            client,
            prefix: prefix.to_owned(),
            describe,
            conn: tokio::sync::Mutex::new(None),
            sync: Script::new(&format!("{ENSURE}{SYNC}")),
            transition: Script::new(&format!("{ENSURE}{TRANSITION}")),
            claim: Script::new(CLAIM),
            take: Script::new(TAKE),
        }
    }

    /// The key of `part` (`state`, `window`, `seq`) of breaker `name`.
    pub fn key(&self, name: &str, part: &str) -> String {
        format!("{}{{{}}}:{}", self.prefix, name, part)
    }

    /// The key of the shared rate limit `name`.
    pub fn limit_key(&self, name: &str) -> String {
        format!("{}{{{}}}:limit", self.prefix, name)
    }

    async fn connection(&self) -> Result<Conn, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &*slot {
            return Ok(conn.clone());
        }
        let conn = match &self.client {
            Backend::Single(c) => Conn::Single(c.get_multiplexed_async_connection().await.map_err(|e| self.failed(e))?),
            Backend::Cluster(c) => Conn::Cluster(c.get_async_connection().await.map_err(|e| self.failed(e))?),
            Backend::Sentinel(s) => {
                let master = s.lock().await.async_get_client().await.map_err(|e| self.failed(e))?;
                Conn::Single(master.get_multiplexed_async_connection().await.map_err(|e| self.failed(e))?)
            }
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one script, on the server or on the cluster node of its keys' slot.
    async fn invoke<T: redis::FromRedisValue>(&self, invocation: redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        let result = match self.connection().await? {
            Conn::Single(mut c) => invocation.invoke_async::<T>(&mut c).await,
            Conn::Cluster(mut c) => invocation.invoke_async::<T>(&mut c).await,
        };
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                self.forget(&e).await;
                Err(self.failed(e))
            }
        }
    }

    /// Forgets the connection after an error that may have broken it.
    async fn forget(&self, e: &redis::RedisError) {
        // A master demoted by a failover refuses writes (READONLY): ask the Sentinel again too.
        let demoted = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if demoted || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
            *self.conn.lock().await = None;
        }
    }

    fn failed(&self, e: redis::RedisError) -> StoreError {
        StoreError(format!("{}: {e}", self.describe))
    }

    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Vec<String>, StoreError> {
        self.invoke(invocation).await
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// The script's answer as a view: `(made, view)`.
fn parse(v: &[String]) -> Result<(bool, FleetView), StoreError> {
    let bad = || StoreError(format!("unexpected answer from the store's script: {v:?}"));
    if v.len() != 14 {
        return Err(bad());
    }
    let n = |i: usize| v[i].parse::<u64>().map_err(|_| bad());
    let n32 = |i: usize| n(i).map(|x| u32::try_from(x).unwrap_or(u32::MAX));
    let state = State::from_name(&v[1]).ok_or_else(bad)?;
    let (until, now) = (n(3)?, n(4)?);
    let remaining = match (state, until) {
        (State::HalfOpen, 0) => Duration::MAX,
        (_, 0) => Duration::ZERO,
        (_, until) => Duration::from_millis(until.saturating_sub(now)),
    };
    let view = FleetView {
        state,
        epoch: n(2)?,
        remaining,
        window: Snapshot { calls: n32(5)?, failures: n32(6)?, slow: n32(7)? },
        probes: Snapshot { calls: n32(8)?, failures: n32(9)?, slow: n32(10)? },
        probes_left: n32(11)?,
        opens: n32(12)?,
        decided_by: v[13].clone(),
    };
    Ok((v[0] == "1", view))
}

impl BreakerStore for RedisStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn sync<'a>(&'a self, req: SyncRequest<'a>) -> BoxFuture<'a, Result<FleetView, StoreError>> {
        Box::pin(async move {
            let (w, p) = (req.delta.window, req.delta.probes);
            let mut inv = self.sync.prepare_invoke();
            inv.key(self.key(req.breaker, "state"))
                .key(self.key(req.breaker, "window"))
                .key(self.key(req.breaker, "seq"));
            inv.arg(req.instance).arg(req.seq).arg(req.epoch);
            inv.arg(w.calls).arg(w.failures).arg(w.slow).arg(p.calls).arg(p.failures).arg(p.slow);
            inv.arg(req.window_secs).arg(millis(STATE_TTL));
            parse(&self.run(inv).await?).map(|(_, view)| view)
        })
    }

    fn transition<'a>(&'a self, req: TransitionRequest<'a>) -> BoxFuture<'a, Result<(bool, FleetView), StoreError>> {
        Box::pin(async move {
            let mut inv = self.transition.prepare_invoke();
            inv.key(self.key(req.breaker, "state")).key(self.key(req.breaker, "window"));
            inv.arg(req.instance);
            inv.arg(req.from_epoch.map(|e| e.to_string()).unwrap_or_default());
            inv.arg(req.to.as_str());
            inv.arg(if req.duration == Duration::MAX { String::new() } else { millis(req.duration) });
            inv.arg(req.probes).arg(req.opens).arg(millis(STATE_TTL));
            parse(&self.run(inv).await?)
        })
    }

    fn claim_probes<'a>(&'a self, breaker: &'a str, epoch: u64, want: u32) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let mut inv = self.claim.prepare_invoke();
            inv.key(self.key(breaker, "state")).arg(epoch).arg(want);
            self.invoke::<u32>(inv).await
        })
    }
}

impl LimitStore for RedisStore {
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        burst: u32,
        cost: u32,
    ) -> BoxFuture<'a, Result<Result<(), Duration>, StoreError>> {
        Box::pin(async move {
            let mut inv = self.take.prepare_invoke();
            inv.key(self.limit_key(key)).arg(interval.as_micros().max(1).to_string()).arg(burst).arg(cost);
            match self.invoke::<u64>(inv).await? {
                0 => Ok(Ok(())),
                wait => Ok(Err(Duration::from_micros(wait))),
            }
        })
    }
}
