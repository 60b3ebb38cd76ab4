"""The composite Envelope through the Python package: the engine's retry driver, breaker, limits and fallback,
for functions and coroutines."""

from __future__ import annotations

import asyncio

import pytest

from envelope import (
    BulkheadFull,
    CircuitBreaker,
    CircuitOpen,
    DeadlineExceeded,
    Envelope,
    RateLimited,
    Retry,
    resilient_call,
)

FAST = Retry(max_attempts=3, base=0.001, max_delay=0.002, budget=None)


class Flaky:
    """Fails with `error` the first `failures` times, then answers `ok`."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionResetError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("flaky")
        return "ok"


def test_a_flaky_function_is_retried_until_it_answers() -> None:
    flaky = Flaky(2)
    assert Envelope("db", retry=FAST).call(flaky) == "ok"
    assert flaky.calls == 3


def test_retries_stop_at_max_attempts_and_the_last_error_is_raised() -> None:
    flaky = Flaky(10)
    with pytest.raises(ConnectionResetError):
        resilient_call(flaky, policy=Envelope("db", retry=FAST))
    assert flaky.calls == 3


def test_only_the_outcomes_named_are_retried() -> None:
    flaky = Flaky(2, ValueError)
    with pytest.raises(ValueError):
        Envelope("db", retry=Retry(max_attempts=3, base=0.001, retry_on=("timeout",), budget=None)).call(flaky)
    assert flaky.calls == 1, "a failure is not in retry_on"


def test_the_budget_bounds_retries() -> None:
    # No reserve and no share of live calls: the budget refuses every retry.
    env = Envelope("db", retry=Retry(max_attempts=5, base=0.001, budget=(1.0, 0, 0.0)))
    flaky = Flaky(10)
    with pytest.raises(ConnectionResetError):
        env.call(flaky)
    assert flaky.calls == 1


async def test_a_coroutine_is_cancelled_at_its_attempt_timeout_and_retried() -> None:
    started = 0
    cancelled = 0

    async def hangs() -> str:
        nonlocal started, cancelled
        started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return "never"

    env = Envelope("api", attempt_timeout=0.01, retry=FAST)
    with pytest.raises(DeadlineExceeded):
        await env.call_async(hangs)
    assert (started, cancelled) == (3, 3), "each attempt cut off at its timeout, then retried"


async def test_the_deadline_bounds_the_whole_call() -> None:
    calls = 0

    @Envelope("api", deadline=0.05, retry=Retry(max_attempts=100, base=0.001, max_delay=0.002, budget=None))
    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(1)
        return "late"

    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(DeadlineExceeded):
        await slow()
    assert loop.time() - began < 0.9, "cut off at the deadline, not after the call"
    assert calls == 1, "no attempt starts that the deadline cannot finish"


def test_an_open_breaker_fails_fast_and_is_not_retried() -> None:
    breaker = CircuitBreaker("db", window=2, min_calls=2, failure_rate=50, open_for=30)
    env = Envelope("db", retry=FAST, breaker=breaker)
    flaky = Flaky(100)
    with pytest.raises(CircuitOpen):
        # Two failures open the breaker; the third attempt is refused by it, and that ends the call (a local
        # rejection is not retried), as in Rust.
        env.call(flaky)
    assert breaker.state == "open"
    assert flaky.calls == 2
    calls = flaky.calls
    with pytest.raises(CircuitOpen) as rejected:
        env.call(flaky)
    assert flaky.calls == calls, "nothing reaches the function while the breaker is open"
    assert rejected.value.retry_after is not None


async def test_fallback_answers_for_the_outcomes_it_covers_only() -> None:
    breaker = CircuitBreaker("llm", window=2, min_calls=2, failure_rate=50, open_for=30)
    breaker.force_open()
    env = Envelope("llm", breaker=breaker, fallback=lambda prompt: f"cached answer to {prompt}")

    @env
    async def complete(prompt: str) -> str:
        return f"fresh answer to {prompt}"

    assert await complete("hi") == "cached answer to hi"

    def bad_request(prompt: str) -> str:
        raise ValueError("the caller's own mistake")

    with pytest.raises(ValueError):
        Envelope("llm", fallback=lambda prompt: "cached", fallback_on=("circuit_open",)).call(bad_request, "x")


def test_a_full_bulkhead_and_a_rate_limit_reject_with_their_own_errors() -> None:
    env = Envelope("db", rate_limit=(1, 60.0, 1))
    assert env.call(lambda: 1) == 1
    with pytest.raises(RateLimited) as limited:
        env.call(lambda: 2)
    assert limited.value.retry_after is not None and limited.value.retry_after > 0
    assert limited.value.outcome == "local_rate_limited"

    env = Envelope("db", bulkhead=(1, 0, 0.0))

    def reenter() -> int:
        # A second call while the first holds the only permit.
        with pytest.raises(BulkheadFull):
            env.call(lambda: 0)
        return 1

    assert env.call(reenter) == 1


def test_invalid_settings_are_refused_by_the_engine() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        Envelope("db", retry=Retry(max_attempts=0))
    with pytest.raises(ValueError, match="bulkhead"):
        Envelope("db", bulkhead=(0, 0, 0.0))


async def test_a_coroutine_cancelled_from_outside_stays_cancelled_and_is_not_retried() -> None:
    started = 0
    running = asyncio.Event()

    @Envelope("api", attempt_timeout=30.0, retry=FAST)
    async def hangs() -> None:
        nonlocal started
        started += 1
        running.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(hangs())
    await running.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started == 1, "a cancellation is the caller's, not a timeout: no retry"
