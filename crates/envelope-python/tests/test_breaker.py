"""The circuit breaker through the Python package: the engine's state machine, for functions and coroutines."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import envelope
from envelope import CircuitBreaker, CircuitOpen, Rejected


class Down(Exception):
    pass


def down() -> None:
    raise Down("down")


def trip(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Down):
            breaker.call(down)


def wait_open_over(breaker: CircuitBreaker, bound: float = 5.0) -> None:
    """Waits (bounded) until the open duration has passed: the next call is a probe."""
    deadline = time.monotonic() + bound
    while (breaker.metrics()["remaining_open"] or 0) > 0:
        assert time.monotonic() < deadline, "the breaker stays open past its open duration"
        time.sleep(0.001)


def test_failures_open_the_breaker_and_calls_then_fail_fast_without_running() -> None:
    breaker = CircuitBreaker("db", window=4, min_calls=4, failure_rate=50, open_for=30)
    trip(breaker, 4)
    assert breaker.state == "open"
    calls = []
    with pytest.raises(CircuitOpen) as rejected:
        breaker.call(lambda: calls.append(1))
    assert calls == [], "an open breaker does not call"
    assert isinstance(rejected.value, Rejected)
    assert rejected.value.outcome == "circuit_open"
    assert rejected.value.state == "open"
    assert rejected.value.retry_after is not None and 29 < rejected.value.retry_after <= 30


def test_successes_keep_it_closed_and_the_window_counts_them() -> None:
    breaker = CircuitBreaker("db", window=10, min_calls=4, failure_rate=50)
    for _ in range(3):
        assert breaker.call(lambda x: x * 2, 21) == 42
    trip(breaker, 1)
    m = breaker.metrics()
    assert (m["calls"], m["failures"], m["failure_rate"]) == (4, 1, 25.0)
    assert breaker.state == "closed"


async def test_coroutines_are_guarded_the_same_way() -> None:
    breaker = CircuitBreaker("api", window=2, min_calls=2, failure_rate=50, open_for=30)

    @breaker
    async def fetch(fail: bool) -> str:
        await asyncio.sleep(0)
        if fail:
            raise ConnectionResetError("reset")
        return "ok"

    assert asyncio.iscoroutinefunction(fetch)
    assert await fetch(False) == "ok"
    with pytest.raises(ConnectionResetError):
        await fetch(True)
    assert breaker.state == "open", "1 of 2 failed: 50 % trips"
    with pytest.raises(CircuitOpen):
        await fetch(False)


def test_ignored_exceptions_and_cancellation_count_for_nothing() -> None:
    breaker = CircuitBreaker("db", window=2, min_calls=2, failure_rate=50, ignore=(KeyError,))
    for _ in range(5):
        with pytest.raises(KeyError):
            empty: dict[str, int] = {}
            breaker.call(lambda: empty["missing"])
    assert breaker.metrics()["calls"] == 0
    assert breaker.state == "closed"


async def test_a_cancelled_coroutine_is_not_recorded() -> None:
    breaker = CircuitBreaker("api", window=2, min_calls=1, failure_rate=50)
    started = asyncio.Event()

    @breaker
    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(hangs())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.metrics()["calls"] == 0
    assert breaker.state == "closed"


def test_exceptions_map_to_the_engines_outcomes() -> None:
    assert envelope.classify_exception(TimeoutError()) == "timeout"
    assert envelope.classify_exception(asyncio.TimeoutError()) == "timeout"
    assert envelope.classify_exception(ConnectionRefusedError()) == "connect_error"
    assert envelope.classify_exception(BrokenPipeError()) == "upstream_reset"
    assert envelope.classify_exception(ValueError()) == "failure"
    assert envelope.classify_exception(CircuitOpen("x")) == "circuit_open"
    import errno
    import socket

    assert envelope.classify_exception(socket.gaierror(-2, "Name or service not known")) == "connect_error"
    assert envelope.classify_exception(OSError(errno.EHOSTUNREACH, "No route to host")) == "connect_error"
    assert envelope.classify_exception(FileNotFoundError(errno.ENOENT, "x")) == "failure", "not the dependency"
    assert set(envelope.OUTCOMES) >= {"ok", "timeout", "connect_error", "circuit_open", "failure"}

    # Timeouts counted as such: a breaker tripping on slow dependencies sees `timeout`, a failure.
    breaker = CircuitBreaker("db", window=2, min_calls=2, failure_rate=100)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            breaker.call(lambda: (_ for _ in ()).throw(TimeoutError()))
    assert breaker.state == "open"


def test_half_open_admits_exactly_the_configured_probes_under_threads() -> None:
    for _ in range(20):
        breaker = CircuitBreaker("db", window=2, min_calls=2, failure_rate=50, open_for=0.001, half_open_calls=3)
        trip(breaker, 2)
        wait_open_over(breaker)
        threads = 16
        barrier = threading.Barrier(threads)
        release = threading.Event()
        entered = []
        lock = threading.Lock()
        results: list[str] = []

        def probe() -> None:
            with lock:
                entered.append(1)
            release.wait(5)

        def caller() -> None:
            barrier.wait(5)
            try:
                breaker.call(probe)
                outcome = "called"
            except CircuitOpen:
                outcome = "rejected"
            with lock:
                results.append(outcome)
                if len(results) == threads - 3:
                    release.set()

        pool = [threading.Thread(target=caller) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(10)
        assert len(entered) == 3, f"exactly 3 probes, got {len(entered)}"
        assert results.count("rejected") == threads - 3
        assert breaker.state == "closed", "three successful probes close it"


def test_operator_controls() -> None:
    breaker = CircuitBreaker("db")
    breaker.force_open()
    assert breaker.state == "forced_open"
    with pytest.raises(CircuitOpen) as rejected:
        breaker.call(lambda: None)
    assert rejected.value.state == "forced_open"
    breaker.reset()
    assert breaker.state == "closed"
    breaker.force_closed()
    trip(breaker, 50)
    assert breaker.state == "forced_closed"


def test_invalid_settings_are_refused_by_the_engine_with_the_reason() -> None:
    with pytest.raises(ValueError, match="minimum calls 11"):
        CircuitBreaker("db", window=10, min_calls=11)
    with pytest.raises(ValueError, match="open_for"):
        CircuitBreaker("db", open_for=-1)
    with pytest.raises(ValueError, match="not both"):
        CircuitBreaker("db", window=10, window_seconds=10)


def test_the_registry_shares_one_breaker_per_name_and_lists_them() -> None:
    a = envelope.breaker("registry-db", window=10, min_calls=5)
    b = envelope.breaker("registry-db")
    assert a is b, "one breaker per name"
    assert envelope.breakers()["registry-db"] is a
    a.force_open()
    assert envelope.breakers()["registry-db"].state == "forced_open"
    for name, found in envelope.breakers().items():
        found.reset()
        assert found.state == "closed", name


def test_state_changes_are_reported_to_a_callback() -> None:
    seen: list[tuple[str, str, str]] = []
    breaker = CircuitBreaker(
        "events-db", window=2, min_calls=2, failure_rate=50, open_for=0.001, half_open_calls=1,
        on_state_change=lambda name, old, new: seen.append((name, old, new)),
    )
    trip(breaker, 2)
    wait_open_over(breaker)
    breaker.call(lambda: None)
    assert seen == [
        ("events-db", "closed", "open"),
        ("events-db", "open", "half_open"),
        ("events-db", "half_open", "closed"),
    ]


def test_a_failing_callback_never_fails_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str, old: str, new: str) -> None:
        raise RuntimeError("callback bug")

    reported: list[BaseException | None] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: reported.append(u.exc_value))
    breaker = CircuitBreaker("events-db2", window=2, min_calls=2, failure_rate=50, on_state_change=broken)
    trip(breaker, 2)  # the calls raise their own error (Down), not the callback's
    assert breaker.state == "open"
    assert len(reported) == 1 and isinstance(reported[0], RuntimeError), "reported as unraisable"


async def test_half_open_admits_exactly_the_configured_probes_under_asyncio() -> None:
    """Sixteen coroutines reach a half-open breaker together, inside an envelope with retries (a rejected probe
    is not retried into the half-open state): exactly three run, the rest are refused, twenty times over."""
    from envelope import Envelope, Retry

    for _ in range(20):
        breaker = CircuitBreaker("db", window=2, min_calls=2, failure_rate=50, open_for=0.001, half_open_calls=3)
        trip(breaker, 2)
        wait_open_over(breaker)
        env = Envelope("db", breaker=breaker, retry=Retry(max_attempts=3, base=0.001, max_delay=0.002, budget=None))
        release = asyncio.Event()
        entered = 0

        async def probe() -> None:
            nonlocal entered
            entered += 1
            await release.wait()

        calls = [asyncio.create_task(env.call_async(probe)) for _ in range(16)]
        for _ in range(100):  # every caller has either entered or been refused
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert entered == 3, f"exactly 3 probes, got {entered}"
        assert sum(isinstance(r, CircuitOpen) for r in results) == 13
        assert breaker.state == "closed", "three successful probes close it"
