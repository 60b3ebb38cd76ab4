#!/usr/bin/env python3
"""Turns one `cargo bench -p envelope-benches` run into the Markdown tables of BENCHMARKS.md.

Reads criterion's per-benchmark estimates (target/criterion/**/new/) and the bench's own
target/envelope-bench/extra.json (allocations per call, two-thread scaling). Prints Markdown.
"""
import json
import pathlib
import statistics
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target"
results = {}
for bench in (root / "criterion").glob("**/new/benchmark.json"):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())["median"]
    results[(meta["group_id"], meta["function_id"])] = (
        est["point_estimate"], est["confidence_interval"]["lower_bound"], est["confidence_interval"]["upper_bound"])
extra = json.loads((root / "envelope-bench" / "extra.json").read_text())
allocs = extra["allocations_per_call"]

order = ["baseline", "retry", "circuit breaker", "timeout", "bulkhead", "rate limiter", "composite",
         "open breaker rejection"]
peers = ["tower-resilience", "failsafe", "recloser"]


def fmt(ns):
    return f"{ns:.1f}" if ns < 1000 else f"{ns / 1000:.2f} µs"


print("| policy | subject | median ns/call (95 % CI) | vs tower-resilience | vs failsafe | vs recloser | allocs/call |")
print("|---|---|---|---|---|---|---|")
for group in order:
    rows = sorted((who, v) for (g, who), v in results.items() if g == group)
    ref = {p: results.get((group, p)) for p in peers}
    for who, (med, lo, hi) in rows:
        cells = []
        for p in peers:
            r = ref[p]
            cells.append("" if r is None or who.startswith(p) or not who.startswith("envelope")
                         else f"{med / r[0]:.2f}")
        a = allocs.get(f"{group}/{who}")
        print(f"| {group} | {who} | {fmt(med)} ({fmt(lo)}–{fmt(hi)}) | {' | '.join(cells)} | "
              f"{'' if a is None else f'{a:g}'} |")

print()
print("| two threads on one breaker | throughput ratio 2 threads / 1 thread: median (min–max of 7 rounds) |")
print("|---|---|")
for who, ratios in extra["two_thread_scaling"].items():
    print(f"| {who} | {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
if len(sys.argv) > 1:
    print(f"\n{sys.argv[1]}")
