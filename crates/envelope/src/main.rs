//! `envelope`: the sidecar binary. Parse the command line, load the config, run, exit code; everything else lives
//! in `envelope-sidecar`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use envelope_sidecar::config::Config;
use envelope_sidecar::{ConfigFile, Sidecar};

/// mimalloc rather than glibc's malloc: a request's allocations are freed in bursts under concurrency, which glibc
/// serves outside its per-thread cache (its consolidating slow path); mimalloc's free lists per page keep them
/// cheap. Measured in BENCHMARKS.md (2026-12-01): about 5 % less CPU per request, RSS +0.5 MiB. Only the binary
/// chooses an allocator; the library crates leave it to the program that uses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Envelope: resilience and observability in front of any HTTP service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve traffic through the policies of a config file.
    Run {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// See the envelope work: the sidecar in front of a built-in flaky service, under a bounded load (~25 s).
    Demo,
    /// Generate operator artifacts from a config file.
    Generate {
        /// What to generate: `rules` (Prometheus recording and alerting rules for every route's SLO) or
        /// `dashboard` (a Grafana dashboard).
        what: String,
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the config's quality scenarios against a running sidecar (inject each fault, drive a bounded load,
    /// measure) and print a PASS/FAIL table; exits 1 if any measure fails.
    Verify {
        /// The config file (TOML) the sidecar runs.
        #[arg(long, short)]
        config: PathBuf,
        /// The sidecar listener to send load to, when not the config's address (e.g. 127.0.0.1:8080).
        #[arg(long)]
        target: Option<std::net::SocketAddr>,
        /// The sidecar's admin listener, when not the config's `admin.listen`.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Run only the scenario of this name.
        #[arg(long)]
        scenario: Option<String>,
    },
    /// Validate a config file and print what it resolves to; binds nothing.
    Check {
        /// The config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let purge = StartupPurge::begin();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(envelope_sidecar::demo::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Generate { what, config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match what.as_str() {
                "rules" => {
                    print!("{}", envelope_sidecar::generate::prometheus_rules(&config));
                    ExitCode::SUCCESS
                }
                "dashboard" => {
                    print!("{}", envelope_sidecar::generate::grafana_dashboard(&config));
                    ExitCode::SUCCESS
                }
                other => {
                    eprintln!("error: cannot generate `{other}`; try `rules` or `dashboard`");
                    ExitCode::from(2)
                }
            }
        }
        Command::Verify { config, target, admin, scenario } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let token = std::env::var(&config.admin.token_env).ok().filter(|t| !t.is_empty());
            let target = envelope_sidecar::verify::Target { proxy: target, admin, token };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(envelope_sidecar::verify::run(&config, &target, scenario.as_deref())) {
                Ok(reports) => {
                    print!("{}", envelope_sidecar::verify::table(&reports));
                    if reports.iter().all(|r| r.passed()) {
                        println!("PASS: every scenario holds");
                        ExitCode::SUCCESS
                    } else {
                        println!("FAIL: some measures do not hold");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(3)
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", summary(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let (file, config) = match ConfigFile::load(config) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async {
                let sidecar = Sidecar::start(config).await?;
                for addr in sidecar.addrs() {
                    eprintln!("envelope: listening on {addr}");
                }
                eprintln!("envelope: admin on {}", sidecar.admin_addr());
                purge.end();
                sidecar.run(Some(file)).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// mimalloc's `purge_delay` option (its index in `mi_option_t`, the same in mimalloc 2 and 3) and mimalloc 3's default.
const PURGE_DELAY: i32 = 15;
const PURGE_DELAY_DEFAULT_MS: i64 = 1000;

/// Start-up memory handed back at once. Reading the config builds a parse tree of about 6.5 KiB a route (for a
/// config that keeps under 1 KiB of it) and frees it. mimalloc returns freed memory to the system only after its
/// purge delay, and only when it runs again then; a sidecar that goes idle right after start never does, and keeps
/// it: about 4 MiB of the idle RSS with 1,000 routes (BENCHMARKS.md, 2026-12-04). So the delay is 0 while the
/// sidecar starts, and mimalloc's default (1 s) again once it serves: the delay keeps the request path from
/// returning pages to the system and taking them back.
struct StartupPurge(bool);

impl StartupPurge {
    /// Purges at once from now on, if the option is the one expected (it has purge_delay's default).
    fn begin() -> StartupPurge {
        let known = mimalloc_option(PURGE_DELAY, None) == PURGE_DELAY_DEFAULT_MS;
        if known {
            mimalloc_option(PURGE_DELAY, Some(0));
        }
        StartupPurge(known)
    }

    /// Back to the default delay.
    fn end(self) {
        if self.0 {
            mimalloc_option(PURGE_DELAY, Some(PURGE_DELAY_DEFAULT_MS));
        }
    }
}

/// Reads mimalloc option `option`, after setting it to `set` if given.
#[allow(unsafe_code)]
fn mimalloc_option(option: i32, set: Option<i64>) -> i64 {
    // SAFETY: both functions take any option index and value at any time, from any thread (an unknown index is
    // ignored by `mi_option_set` and reads as 0).
    unsafe {
        if let Some(value) = set {
            libmimalloc_sys::mi_option_set(option, value as _);
        }
        libmimalloc_sys::mi_option_get(option) as i64
    }
}

/// The async runtime: one worker per CPU, or `ENVELOPE_WORKERS`. With one worker the sidecar runs on a
/// current-thread runtime: everything on the thread that serves, no cross-thread wake-ups.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    let workers = match std::env::var("ENVELOPE_WORKERS") {
        Ok(v) => Some(
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("ENVELOPE_WORKERS: invalid value `{v}`"))?,
        ),
        Err(_) => None,
    };
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// What a config resolves to, for `envelope check`.
fn summary(c: &Config) -> String {
    let mut out = format!(
        "config OK: {} listener(s), {} upstream(s), {} route(s)\n",
        c.listeners.len(),
        c.upstreams.len(),
        c.routes.len()
    );
    out += &format!("admin {}\n", c.admin.listen);
    for l in &c.listeners {
        out += &format!(
            "listener {} on {} (shedding {}, max body {} bytes)\n",
            l.name,
            l.listen,
            l.shedding.limit(),
            l.max_body_bytes
        );
    }
    for u in &c.upstreams {
        let endpoints: Vec<String> = u.endpoints.iter().map(|e| format!("{}://{}", e.scheme, e.authority)).collect();
        out += &format!(
            "upstream {} -> {} (breaker: {}, bulkhead: {}, rate limit: {})\n",
            u.name,
            endpoints.join(", "),
            if u.breaker.is_some() { "on" } else { "off" },
            u.bulkhead.as_ref().map_or("off".to_owned(), |b| format!(
                "{} + queue {}",
                b.max_concurrent(),
                b.max_queue()
            )),
            u.rate_limit.as_ref().map_or("off".to_owned(), |r| format!("{}/{:?}", r.rate(), r.period())),
        );
    }
    for r in &c.routes {
        out += &format!(
            "route {} {}{} -> {} (tier {:?}, timeout {:?}, retry {})\n",
            r.name,
            r.matcher.path_prefix,
            if r.strip_prefix { " (stripped)" } else { "" },
            c.upstreams[r.upstream].name,
            r.tier,
            r.timeout,
            r.retry.as_ref().map_or("off".to_owned(), |x| format!("{} attempts", x.max_attempts())),
        );
    }
    let h = &c.history;
    out += &format!(
        "history {} (retention {:?}, flush every {:?})\n",
        h.path.as_ref().map_or("in memory".to_owned(), |p| p.display().to_string()),
        h.retention,
        h.flush_interval
    );
    for k in &c.counters {
        out += &format!("counter {} (route {})\n", k.name, k.route.as_deref().unwrap_or("any"));
    }
    for s in &c.scenarios {
        out += &format!(
            "scenario {} on route {} ({} req/s for {:?}{})\n",
            s.name,
            s.route,
            s.rate,
            s.duration,
            s.fault.as_ref().map_or(String::new(), |f| format!(", fault on {}", f.upstream))
        );
    }
    if let Some(t) = &c.tracing {
        out += &format!("tracing: spans to {} as {}\n", t.otlp_endpoint, t.service_name);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_where_mimalloc_had_it() {
        // If a mimalloc upgrade moves the option, start-up purging turns itself off; this says so.
        assert_eq!(super::mimalloc_option(super::PURGE_DELAY, None), super::PURGE_DELAY_DEFAULT_MS);
    }
}
