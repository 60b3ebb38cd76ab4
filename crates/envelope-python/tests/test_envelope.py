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


async def test_coroutines_wait_in_the_bulkhead_queue_in_order() -> None:
    from envelope import Bulkhead

    env = Envelope("db", bulkhead=Bulkhead(1, max_queue=3, max_wait=5.0))
    release = asyncio.Event()
    order: list[int] = []

    async def holder() -> None:
        await release.wait()

    async def queued(i: int) -> int:
        order.append(i)
        return i

    first = asyncio.create_task(env.call_async(holder))
    await asyncio.sleep(0)
    waiters = []
    for i in range(3):
        waiters.append(asyncio.create_task(env.call_async(queued, i)))
        await asyncio.sleep(0)
    # The queue of 3 is full: a fourth is refused at once.
    with pytest.raises(BulkheadFull):
        await env.call_async(queued, 99)
    assert order == []
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [0, 1, 2]
    await first
    assert order == [0, 1, 2], "first come, first served"


async def test_a_queued_coroutine_that_waits_too_long_is_refused_and_a_cancelled_one_loses_no_permit() -> None:
    from envelope import Bulkhead

    env = Envelope("db", bulkhead=Bulkhead(1, max_queue=2, max_wait=0.05))
    release = asyncio.Event()

    async def holder() -> None:
        await release.wait()

    async def quick() -> str:
        return "ok"

    first = asyncio.create_task(env.call_async(holder))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFull) as refused:
        await env.call_async(quick)
    assert refused.value.outcome == "bulkhead_full"
    assert env.metrics()["bulkhead"]["rejected"] == 1
    release.set()
    await first

    # A waiter cancelled in the queue gives its place up: the permit goes to the next one, and none is lost.
    env = Envelope("db", bulkhead=Bulkhead(1, max_queue=2, max_wait=5.0))
    release = asyncio.Event()
    first = asyncio.create_task(env.call_async(holder))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(env.call_async(quick))
    await asyncio.sleep(0)
    behind = asyncio.create_task(env.call_async(quick))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    assert await asyncio.wait_for(behind, 5) == "ok"
    await first
    assert env.metrics()["bulkhead"] == {"max_concurrent": 1, "active": 0, "queued": 0, "rejected": 0}


async def test_threads_and_coroutines_share_the_bulkhead_queue() -> None:
    """A thread blocked in the queue (interpreter released) and a coroutine behind it: the thread is served first,
    then the coroutine, woken on its loop from the thread that returned the permit."""
    import threading

    from envelope import Bulkhead

    env = Envelope("db", bulkhead=Bulkhead(1, max_queue=2, max_wait=5.0))
    order: list[str] = []
    release = threading.Event()
    held = threading.Event()

    def holder() -> None:
        held.set()
        release.wait(5)

    def in_thread() -> None:
        env.call(lambda: order.append("thread"))

    threads = [threading.Thread(target=env.call, args=(holder,))]
    threads[0].start()
    assert held.wait(5)
    threads.append(threading.Thread(target=in_thread))
    threads[1].start()
    for _ in range(500):  # bounded poll: the thread is in the queue
        if env.metrics()["bulkhead"]["queued"] == 1:
            break
        await asyncio.sleep(0.01)

    async def in_coroutine() -> None:
        order.append("coroutine")

    task = asyncio.create_task(env.call_async(in_coroutine))
    for _ in range(500):
        if env.metrics()["bulkhead"]["queued"] == 2:
            break
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(task, 5)
    for t in threads:
        t.join(5)
    assert order == ["thread", "coroutine"]


def test_results_are_classified_and_the_last_one_is_the_answer() -> None:
    """`classify_result` turns a returned value into an outcome (an HTTP status, say), with the dependency's
    Retry-After honoured; when the engine stops trying, the caller gets the last result as it was."""
    from envelope import Event

    answers = [(503, None), (429, 0.02), (200, None)]
    seen: list[Event] = []

    def fetch() -> tuple[int, float | None]:
        return answers.pop(0)

    def by_status(response: tuple[int, float | None]) -> tuple[str, float | None] | None:
        status, retry_after = response
        if status == 429:
            return ("rate_limited", retry_after)
        return ("upstream_5xx", None) if status >= 500 else None

    retry = Retry(max_attempts=3, base=0.001, max_delay=1.0, jitter="none", budget=None)
    env = Envelope("api", retry=retry, classify_result=by_status, on_event=seen.append)
    assert env.call(fetch) == (200, None)
    assert [(e.kind, e.outcome, e.attempt) for e in seen] == [("retry", "upstream_5xx", 1), ("retry", "rate_limited", 2)]
    assert seen[1].wait == pytest.approx(0.02), "the server's Retry-After, not the backoff"

    # Always 503: three attempts, then the last 503 itself is the answer (as the sidecar passes the last one on).
    calls = 0

    def down() -> tuple[int, float | None]:
        nonlocal calls
        calls += 1
        return (503, None)

    seen.clear()
    assert env.call(down) == (503, None)
    assert calls == 3
    assert seen[-1].kind == "gave_up" and seen[-1].outcome == "upstream_5xx"

    # A Retry-After longer than the retry policy's cap is not waited for: the call gives up instead.
    calls = 0
    answers[:] = [(429, 30.0), (200, None)]
    seen.clear()
    assert env.call(fetch) == (429, 30.0)
    assert [e.kind for e in seen] == ["gave_up"]


def test_retry_on_exception_types_retries_those_only() -> None:
    retry = Retry(max_attempts=3, base=0.001, max_delay=0.002, budget=None, retry_on=(ConnectionResetError,))
    breaker = CircuitBreaker("typed", window=10, min_calls=10)
    env = Envelope("typed", retry=retry, breaker=breaker)
    flaky = Flaky(2)
    assert env.call(flaky) == "ok"
    assert flaky.calls == 3
    # A timeout is transient for the engine, but not a type this policy retries: one attempt, still recorded.
    timing_out = Flaky(5, TimeoutError)
    with pytest.raises(TimeoutError):
        env.call(timing_out)
    assert timing_out.calls == 1
    assert breaker.metrics()["calls"] == 4


async def test_events_name_rejections_and_fallbacks() -> None:
    from envelope import Event

    seen: list[Event] = []
    breaker = CircuitBreaker("evt", window=2, min_calls=2, open_for=60)
    env = Envelope("evt", breaker=breaker, fallback=lambda: "cached", on_event=seen.append)
    breaker.force_open()

    async def never() -> str:
        raise AssertionError("not called while open")

    assert await env.call_async(never) == "cached"
    assert [(e.kind, e.outcome, e.envelope) for e in seen] == [
        ("rejected", "circuit_open", "evt"),
        ("fallback", "circuit_open", "evt"),
    ]


async def test_no_bulkhead_permit_is_lost_to_exceptions_cancellation_or_timeouts() -> None:
    """Coroutines and threads hammer one bulkhead (2 in flight, a queue of 4): some raise, some are cut off by the
    attempt timeout, some are cancelled from outside, some wait in the queue. Afterwards nothing is held or
    queued, and the bulkhead still admits its full two at once."""
    import random
    import threading

    from envelope import Bulkhead

    env = Envelope("db", bulkhead=Bulkhead(2, max_queue=4, max_wait=0.05), attempt_timeout=0.02)
    rng = random.Random(7)

    async def work(kind: int) -> None:
        if kind == 0:
            raise ValueError("the call's own error")
        await asyncio.sleep(0.001 if kind == 1 else 1.0)  # 2: cut off by the attempt timeout

    def in_thread(kind: int) -> None:
        for _ in range(20):
            try:
                env.call(lambda: (_ for _ in ()).throw(ValueError("own")) if kind == 0 else None)
            except (ValueError, BulkheadFull):
                pass

    threads = [threading.Thread(target=in_thread, args=(k % 2,)) for k in range(4)]
    for t in threads:
        t.start()
    tasks = [asyncio.create_task(env.call_async(work, rng.randrange(3))) for _ in range(200)]
    for task in tasks[::7]:
        await asyncio.sleep(0)
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    for t in threads:
        t.join(10)
    bulkhead = env.metrics()["bulkhead"]
    assert (bulkhead["active"], bulkhead["queued"]) == (0, 0)
    held = asyncio.Event()

    async def hold() -> None:
        await held.wait()

    both = [asyncio.create_task(env.call_async(hold)) for _ in range(2)]
    await asyncio.sleep(0)
    assert env.metrics()["bulkhead"]["active"] == 2
    held.set()
    await asyncio.gather(*both)
