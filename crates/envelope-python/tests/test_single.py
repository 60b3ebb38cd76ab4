"""Each policy alone, as a decorator."""

from __future__ import annotations

import asyncio

import pytest

import envelope
from envelope import BulkheadFull, DeadlineExceeded, RateLimited


def test_retry_alone() -> None:
    calls = 0

    @envelope.retry(4, base=0.001, max_delay=0.002, budget=None)
    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TimeoutError("slow")
        return "ok"

    assert flaky() == "ok"
    assert calls == 4


async def test_timeout_alone_cancels_the_coroutine() -> None:
    cancelled = False

    @envelope.timeout(0.01)
    async def hangs() -> None:
        nonlocal cancelled
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    with pytest.raises(DeadlineExceeded):
        await hangs()
    assert cancelled


async def test_bulkhead_alone_refuses_a_coroutine_over_its_limit() -> None:
    gate = asyncio.Event()

    @envelope.bulkhead(1)
    async def busy() -> str:
        await gate.wait()
        return "done"

    first = asyncio.create_task(busy())
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFull):
        await busy()
    gate.set()
    assert await first == "done"


def test_rate_limit_alone() -> None:
    @envelope.rate_limit(2, 60.0)
    def ping() -> int:
        return 1

    assert ping() + ping() == 2
    with pytest.raises(RateLimited):
        ping()


def test_fallback_alone_and_stacked_decorators() -> None:
    calls = 0

    @envelope.fallback(lambda: "cached")
    @envelope.retry(2, base=0.001, max_delay=0.002, budget=None)
    def down() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionResetError("down")

    assert down() == "cached", "retries exhausted, then the fallback answers"
    assert calls == 2

    @envelope.fallback(lambda: "cached", on=("timeout",))
    def wrong() -> str:
        raise ValueError("not covered")

    with pytest.raises(ValueError):
        wrong()


def test_stacked_decorators_run_in_the_documented_order_whatever_order_they_are_written_in() -> None:
    # Written with the breaker outside the retry: as one envelope, each attempt still asks the breaker, so the
    # breaker sees every attempt (2 failures open it), and its rejection ends the retries.
    for order in ("breaker outside", "breaker inside"):
        breaker = envelope.CircuitBreaker("db", window=2, min_calls=2, failure_rate=50, open_for=30)
        calls = 0

        def down() -> None:
            nonlocal calls
            calls += 1
            raise ConnectionResetError("down")

        retrying = envelope.retry(5, base=0.001, max_delay=0.002, budget=None)
        guarded = breaker(retrying(down)) if order == "breaker outside" else retrying(breaker(down))
        with pytest.raises(envelope.CircuitOpen):
            guarded()
        assert calls == 2, f"{order}: the breaker is asked on every attempt"
        assert breaker.state == "open"
        assert getattr(guarded, "__envelope__", None) is not None, f"{order}: one envelope"


def test_a_policy_given_twice_in_a_stack_is_an_error() -> None:
    with pytest.raises(ValueError, match="two stacked"):
        envelope.retry(2)(envelope.retry(3)(lambda: None))
