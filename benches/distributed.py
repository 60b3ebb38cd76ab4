#!/usr/bin/env python3
"""Distributed mode's cost: a shared breaker (synced through Redis) against a local one, interleaved, and Redis
operations per request.

Two `envelope run` processes of the same release binary with the same config but for `[shared]` and
`shared = true` on the upstream's breaker, in front of the same upstream (benches' hello-upstream), and a
redis-server, all on 127.0.0.1. Measured:

  added latency   p50 and p99 at 1 and at 32 connections (wrk --latency, -t1, pinned to CPU 0), each round running
                  both targets in a rotated order; reported as shared minus local per round (median, min-max)
  Redis ops       `INFO commandstats` (EVALSHA/EVAL calls) before and after a fixed-rate load of 1,000 requests/s
                  for --rate-seconds through the shared instance, and the same length of time idle: scripts per
                  100 requests, and per second whatever the traffic
  global limit    the same fixed-rate load through a third instance whose upstream has a global rate limit (far
                  above the load), then through a fourth with a limit of 1,100/s and `lease = 50` (a lease stands for
                  50 intervals of the limit, so it pays when the traffic is near the limit): Redis scripts per request

Usage: python3 benches/distributed.py [--rounds 10] [--seconds 3] [--rate-seconds 10]
Installs wrk and redis-server from Debian when missing. Every load run is bounded in time, on 127.0.0.1 only.
"""
import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM, REDIS = 18400, 18401
TARGETS = {"local": (18410, 18411), "shared": (18420, 18421), "global": (18430, 18431), "lease": (18440, 18441)}


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def install():
    missing = [p for p, b in [("wrk", "wrk"), ("redis-server", "redis-server")] if not shutil.which(b)]
    if missing:
        sh("apt-get update -qq")
        sh(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    sh("cargo build -q --release -p envelope -p envelope-benches --bin envelope --bin hello-upstream", cwd=ROOT)


def config(name):
    port, admin = TARGETS[name]
    shared = name != "local"
    breaker = 'window = { seconds = 30 }, min_calls = 20, failure_rate = 50, open_for = "30s"'
    limit = ""
    if name == "global":
        limit = 'rate_limit = { rate = 1000000, per = "1s", scope = "global" }\n'
    if name == "lease":
        # A lease stands for `lease` intervals of the limit: it pays when the traffic is near the limit.
        limit = 'rate_limit = { rate = 1100, per = "1s", scope = "global", lease = 50 }\n'
    return f"""
[admin]
listen = "127.0.0.1:{admin}"

[[listener]]
name = "bench"
listen = "127.0.0.1:{port}"
access_log = false
{f'''
[shared]
redis = "redis://127.0.0.1:{REDIS}"
key_prefix = "bench-{name}:"
''' if shared else ''}
[[upstream]]
name = "hello"
endpoints = ["http://127.0.0.1:{UPSTREAM}"]
breaker = {{ {breaker}{', shared = true' if shared else ''} }}
{limit}
[[route]]
name = "all"
match = {{ path_prefix = "/" }}
upstream = "hello"
"""


def wrk(port, connections, seconds):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30).stdout

    def pct(p):
        m = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]

    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    return pct(50), pct(99), errors


def redis_scripts():
    out = subprocess.run(["redis-cli", "-p", str(REDIS), "INFO", "commandstats"], capture_output=True, text=True).stdout
    return sum(int(m) for m in re.findall(r"cmdstat_(?:evalsha|eval):calls=(\d+)", out))


def fixed_rate(port, rate, seconds, threads=4):
    """Sends `rate` requests a second for `seconds` over keep-alive connections; returns (sent, failed)."""
    sent, failed = [0], [0]
    lock = threading.Lock()
    per_thread = rate / threads

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        start = time.perf_counter()
        n = 0
        while True:
            due = start + n / per_thread
            now = time.perf_counter()
            if now - start >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            with lock:
                sent[0] += 1
                failed[0] += r.status != 200
            n += 1

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sent[0], failed[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rate-seconds", type=int, default=10)
    ap.add_argument("--skip-latency", action="store_true", help="only the Redis operation counts")
    args = ap.parse_args()
    install()
    tmp = tempfile.mkdtemp()
    procs = []
    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(REDIS), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen([os.path.join(ROOT, "target/release/hello-upstream"), f"127.0.0.1:{UPSTREAM}"]))
        for name in TARGETS:
            path = os.path.join(tmp, f"{name}.toml")
            with open(path, "w") as f:
                f.write(config(name) + f'\n[history]\npath = "{tmp}/{name}.db"\n')
            procs.append(subprocess.Popen([os.path.join(ROOT, "target/release/envelope"), "run", "--config", path],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2)
        for name, (port, _) in TARGETS.items():
            wrk(port, 1, 1)  # warm up

        diffs = {(c, p): [] for c in (1, 32) for p in ("p50", "p99")}
        absolute = {(n, c, p): [] for n in ("local", "shared") for c in (1, 32) for p in ("p50", "p99")}
        errors = 0
        for r in range(0 if args.skip_latency else args.rounds):
            for c in (1, 32):
                order = ["local", "shared"] if r % 2 == 0 else ["shared", "local"]
                got = {}
                for name in order:
                    p50, p99, err = wrk(TARGETS[name][0], c, args.seconds)
                    errors += err
                    got[name] = {"p50": p50, "p99": p99}
                    absolute[(name, c, "p50")].append(p50)
                    absolute[(name, c, "p99")].append(p99)
                for p in ("p50", "p99"):
                    diffs[(c, p)].append(got["shared"][p] - got["local"][p])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

        before = redis_scripts()
        time.sleep(args.rate_seconds)
        idle = redis_scripts() - before
        before = redis_scripts()
        sent, failed = fixed_rate(TARGETS["shared"][0], 1000, args.rate_seconds)
        busy = redis_scripts() - before
        limits = {}
        for name in ("global", "lease"):
            before = redis_scripts()
            s, f = fixed_rate(TARGETS[name][0], 1000, args.rate_seconds)
            # Every instance's breaker syncs run meanwhile too: subtract them (the idle count).
            limits[name] = (s, f, redis_scripts() - before - idle)

        print("| connections | percentile | local (µs) | shared (µs) | shared − local per round (µs): median (min – max) |")
        print("|---|---|---|---|---|")
        for (c, p), d in (() if args.skip_latency else diffs.items()):
            print(f"| {c} | {p} | {statistics.median(absolute[('local', c, p)]):.0f} | "
                  f"{statistics.median(absolute[('shared', c, p)]):.0f} | "
                  f"{statistics.median(d):+.0f} ({min(d):+.0f} – {max(d):+.0f}) |")
        print(f"\nnon-2xx answers in the latency runs: {errors}")
        # Three instances sync a shared breaker (shared, global, lease): the loaded one's share is its own syncs.
        others = idle * 2 / 3
        mine = busy - others
        print(f"\nRedis scripts, shared breaker: {idle} in {args.rate_seconds} s idle ({idle / args.rate_seconds / 3:.1f}/s "
              f"per instance); {mine:.0f} by the loaded instance during {sent} requests at 1,000/s ({failed} failed): "
              f"{100 * mine / max(sent, 1):.2f} per 100 requests")
        for name, (s, f, ops) in limits.items():
            print(f"global limit ({name}): {ops} scripts for {s} requests ({f} failed): {ops / max(s, 1):.3f} per request")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
