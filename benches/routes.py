#!/usr/bin/env python3
"""The cost of many routes: one sidecar with 1 route against one with 1,000 prefix routes on the same upstream.

Measured, in one interleaved run on 127.0.0.1 (every process pinned to CPU 0, as benches/sidecar.py does):
  RSS idle           resident memory of each sidecar after start, before any traffic (MiB)
  /metrics           bytes and lines of the exposition before any traffic
  throughput         wrk -t1 -c32 requests/s through each, as a ratio of the 1,000-route sidecar to the 1-route one,
                     per round; the 1,000-route sidecar is asked for its first, middle and last route in turn
                     (matching must not depend on a route's position), rounds rotate the order
  RSS under load     after the rounds

Usage: python3 benches/routes.py [--rounds 6] [--seconds 3] [--routes 1000] [--out target/routes-bench.md]
Needs wrk (installed from Debian when missing) and the release build (built here). Bounded in time; loopback only.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sidecar import rss_mib, sh, wrk  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = 18200
ONE, MANY = 18201, 18202
ADMIN = {ONE: 18211, MANY: 18212}


def config(port, routes):
    text = f"""
[admin]
listen = "127.0.0.1:{ADMIN[port]}"

[[listener]]
name = "bench"
listen = "127.0.0.1:{port}"
access_log = false

[[upstream]]
name = "hello"
endpoints = ["http://127.0.0.1:{UPSTREAM}"]
breaker = {{ window = {{ count = 100 }}, min_calls = 20, failure_rate = 50, open_for = "30s" }}

[history]
path = ":memory:"
"""
    for i in range(routes):
        text += f"""
[[route]]
name = "r{i}"
match = {{ path_prefix = "/r{i}" }}
upstream = "hello"
retry = {{ max_attempts = 3, base = "25ms", max_delay = "250ms" }}
"""
    return text


def start(cmd, probe):
    proc = subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "ENVELOPE_WORKERS": "1"}, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(probe, timeout=1).read()
            return proc
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def wrk_path(port, path, seconds):
    """wrk against one path (benches/sidecar.py's wrk asks for `/`)."""
    import re
    cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout", "5s",
           f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    return rps, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--routes", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "routes-bench.md"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sh("apt-get update -qq && apt-get install -y -qq wrk")
    sh("cargo build -q --release -p envelope -p envelope-benches --bin envelope --bin hello-upstream", cwd=ROOT)
    binary = os.path.join(ROOT, "target/release/envelope")
    tmp = tempfile.mkdtemp(prefix="envelope-routes-")
    procs = []
    try:
        procs.append(start([os.path.join(ROOT, "target/release/hello-upstream"), f"127.0.0.1:{UPSTREAM}"],
                           f"http://127.0.0.1:{UPSTREAM}/"))
        files = {}
        for port, n in [(ONE, 1), (MANY, args.routes)]:
            files[port] = os.path.join(tmp, f"{n}.toml")
            with open(files[port], "w") as f:
                f.write(config(port, n))
        sidecars = {}
        for port in (ONE, MANY):
            sidecars[port] = start([binary, "run", "--config", files[port]], f"http://127.0.0.1:{ADMIN[port]}/healthz")
            procs.append(sidecars[port])
        time.sleep(1)
        idle = {port: rss_mib(p) for port, p in sidecars.items()}
        exposition = {}
        for port in (ONE, MANY):
            text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[port]}/metrics", timeout=5).read()
            exposition[port] = (len(text), text.count(b"\n"))
        last = args.routes - 1
        positions = {"first": "/r0/x", "middle": f"/r{args.routes // 2}/x", "last": f"/r{last}/x"}
        ratios = {k: [] for k in positions}
        errors = 0
        for rnd in range(args.rounds):
            for which, path in positions.items():
                runs = [(ONE, "/r0/x"), (MANY, path)]
                if rnd % 2:
                    runs.reverse()
                rps = {}
                for port, p in runs:
                    rps[port], e = wrk_path(port, p, args.seconds)
                    errors += e
                ratios[which].append(rps[MANY] / rps[ONE])
        loaded = {port: rss_mib(p) for port, p in sidecars.items()}
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    def stat(values):
        return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"

    lines = [
        f"1 route against {args.routes} prefix routes on one upstream (release build, ENVELOPE_WORKERS=1, "
        f"{args.rounds} rounds of wrk -t1 -c32 -d{args.seconds}s, order alternating)",
        "",
        "| measure | 1 route | %d routes |" % args.routes,
        "|---|---|---|",
        f"| RSS idle (MiB) | {idle[ONE]:.1f} | {idle[MANY]:.1f} |",
        f"| /metrics before traffic | {exposition[ONE][0] / 1000:.1f} KB, {exposition[ONE][1]} lines | "
        f"{exposition[MANY][0] / 1000:.1f} KB, {exposition[MANY][1]} lines |",
        f"| RSS after the rounds (MiB) | {loaded[ONE]:.1f} | {loaded[MANY]:.1f} |",
        "",
        "| route asked for | throughput, %d routes / 1 route, per round: median (min–max) |" % args.routes,
        "|---|---|",
    ]
    lines += [f"| {which} | {stat(values)} |" for which, values in ratios.items()]
    lines += ["", f"errors (non-2xx, socket): {errors}"]
    report = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
