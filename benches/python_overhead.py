#!/usr/bin/env python3
"""Per-call overhead of the Python package against the Python peers, interleaved in one run.

Measured on a trivial function (returns at once) and a trivial coroutine, per call, in nanoseconds:
  envelope          envelope.Envelope(retry + breaker + bulkhead + attempt timeout) around the call
  peers             pybreaker's CircuitBreaker and tenacity's @retry stacked (the teams' decorators), plus a
                    threading.Semaphore as the bulkhead (sync); for the coroutine, tenacity's AsyncRetrying with
                    aiobreaker, and asyncio.wait_for as the timeout; and the same with purgatory's breaker instead
                    of aiobreaker
  breaker alone     envelope.CircuitBreaker against pybreaker.CircuitBreaker (sync)
  open rejection    a call refused by an open breaker, exception raised and caught: envelope against pybreaker
  threads           calls per second through one breaker from 1 thread and from 8 threads (each thread a batch of
                    calls), envelope against pybreaker: whether eight threads scale or serialise

Each measurement is a batch of calls timed with time.perf_counter_ns; the batches of the compared variants
alternate (rounds), and the report gives, per variant, the median over rounds and the ratio envelope / peer per
round (median, min–max). Bounded: --rounds × --calls per variant. Run after building the extension in release mode:

  python3 -m venv /tmp/pybench && /tmp/pybench/bin/pip install maturin pybreaker tenacity aiobreaker purgatory
  (. /tmp/pybench/bin/activate && maturin develop --release -m crates/envelope-python/Cargo.toml)
  /tmp/pybench/bin/python benches/python_overhead.py --rounds 15 --calls 20000
"""
import argparse
import asyncio
import statistics
import threading
import time

import aiobreaker
import purgatory
import pybreaker
import tenacity

import envelope


def trivial():
    return 1


async def trivial_async():
    return 1


def time_sync(fn, calls):
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls


def time_async(fn, calls):
    async def run():
        start = time.perf_counter_ns()
        for _ in range(calls):
            await fn()
        return (time.perf_counter_ns() - start) / calls

    return asyncio.run(run())


def time_rejection(fn, exc, calls):
    start = time.perf_counter_ns()
    for _ in range(calls):
        try:
            fn()
        except exc:
            pass
    return (time.perf_counter_ns() - start) / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()

    # Sync composite.
    env = envelope.Envelope(
        "bench",
        retry=envelope.Retry(max_attempts=3),
        breaker=envelope.CircuitBreaker("bench", window=100, min_calls=20),
        bulkhead=(1000, 0, 0.0),
        attempt_timeout=5.0,
    )
    env_sync = env(trivial)
    pb = pybreaker.CircuitBreaker(fail_max=20, reset_timeout=30)
    sem = threading.BoundedSemaphore(1000)

    @tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_random_exponential(0.1, 2))
    @pb
    def peers_sync():
        with sem:
            return trivial()

    # Async composite.
    env_async = env(trivial_async)
    ab = aiobreaker.CircuitBreaker(fail_max=20)

    async def peers_async():
        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_random_exponential(0.1, 2)
        ):
            with attempt:
                return await ab.call_async(lambda: asyncio.wait_for(trivial_async(), 5.0))

    purgatory_breakers = purgatory.AsyncCircuitBreakerFactory(default_threshold=20, default_ttl=30)

    @purgatory_breakers("bench")
    async def purgatory_guarded():
        return await asyncio.wait_for(trivial_async(), 5.0)

    async def peers_async_purgatory():
        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_random_exponential(0.1, 2)
        ):
            with attempt:
                return await purgatory_guarded()

    # Breakers alone.
    eb = envelope.CircuitBreaker("alone", window=100, min_calls=20)
    eb_sync = eb(trivial)
    pb_alone = pybreaker.CircuitBreaker(fail_max=20, reset_timeout=30)
    pb_sync = pb_alone(trivial)

    # Open breakers.
    open_env = envelope.CircuitBreaker("open")
    open_env.force_open()
    open_env_call = open_env(trivial)
    open_pb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    open_pb.open()
    open_pb_call = open_pb(trivial)

    pairs = {
        "composite, function": (lambda: time_sync(env_sync, args.calls), lambda: time_sync(peers_sync, args.calls)),
        "composite, coroutine": (
            lambda: time_async(env_async, args.calls // 4),
            lambda: time_async(peers_async, args.calls // 4),
        ),
        "composite, coroutine (purgatory)": (
            lambda: time_async(env_async, args.calls // 4),
            lambda: time_async(peers_async_purgatory, args.calls // 4),
        ),
        "breaker alone, function": (lambda: time_sync(eb_sync, args.calls), lambda: time_sync(pb_sync, args.calls)),
        "open-breaker rejection": (
            lambda: time_rejection(open_env_call, envelope.CircuitOpen, args.calls),
            lambda: time_rejection(open_pb_call, pybreaker.CircuitBreakerError, args.calls),
        ),
    }
    results = {name: ([], []) for name in pairs}
    for r in range(args.rounds):
        for name, (ours, theirs) in pairs.items():
            first, second = (ours, theirs) if r % 2 == 0 else (theirs, ours)
            a = first()
            b = second()
            mine, peer = (a, b) if r % 2 == 0 else (b, a)
            results[name][0].append(mine)
            results[name][1].append(peer)
    threads = {1: ([], []), 8: ([], [])}
    for r in range(args.rounds):
        for n in threads:
            for k, call in enumerate((eb_sync, pb_sync) if r % 2 == 0 else (pb_sync, eb_sync)):
                mine = (k == 0) == (r % 2 == 0)
                threads[n][0 if mine else 1].append(rate(call, n, args.calls // n))

    print("| measure | envelope ns/call | peers ns/call | envelope / peers per round |")
    print("|---|---|---|---|")
    for name, (mine, peer) in results.items():
        ratios = [m / p for m, p in zip(mine, peer)]
        print(
            f"| {name} | {statistics.median(mine):.0f} ({min(mine):.0f}–{max(mine):.0f}) "
            f"| {statistics.median(peer):.0f} ({min(peer):.0f}–{max(peer):.0f}) "
            f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |"
        )
    print()
    print("| threads on one breaker | envelope calls/s | pybreaker calls/s |")
    print("|---|---|---|")
    for n, (mine, peer) in threads.items():
        print(f"| {n} | {statistics.median(mine):,.0f} | {statistics.median(peer):,.0f} |")


def rate(call, threads, calls):
    """Calls per second through `call` from `threads` threads, `calls` each."""
    barrier = threading.Barrier(threads + 1)

    def worker():
        barrier.wait()
        for _ in range(calls):
            call()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return threads * calls / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
