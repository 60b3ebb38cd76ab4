"""Each policy alone, as a decorator: `@retry(…)`, `@timeout(…)`, `@bulkhead(…)`, `@rate_limit(…)`,
`@fallback(…)` (and `CircuitBreaker` itself). Each is an `Envelope` with that one policy, so it behaves exactly
as the same policy does inside a full envelope; stacked, each decorator is its own envelope around the next."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._envelope_policy import Bulkhead, Envelope, RateLimit, Retry


def retry(
    max_attempts: int = 3,
    *,
    backoff: str = "exponential",
    base: float = 0.1,
    max_delay: float = 2.0,
    jitter: str = "full",
    retry_on: tuple[str, ...] | None = None,
    budget: tuple[float, int, float] | None = (10.0, 10, 0.2),
    deadline: float | None = None,
    name: str = "retry",
) -> Envelope:
    """Retries with the engine's backoff, jitter, `Retry-After` and budget (see `Retry`)."""
    settings = Retry(max_attempts, backoff, base, max_delay, jitter, retry_on, budget)
    return Envelope(name, retry=settings, deadline=deadline)


def timeout(seconds: float, *, name: str = "timeout") -> Envelope:
    """Cuts a coroutine off after `seconds` (`DeadlineExceeded`); see docs/python.md for what a timeout can do to a
    function."""
    return Envelope(name, attempt_timeout=seconds)


def bulkhead(max_concurrent: int, *, queue: int = 0, max_wait: float = 0.0, name: str = "bulkhead") -> Envelope:
    """At most `max_concurrent` calls in flight; `queue` more may wait up to `max_wait` seconds, in one FIFO for
    threads and coroutines."""
    return Envelope(name, bulkhead=Bulkhead(max_concurrent, queue, max_wait))


def rate_limit(rate: int, per: float = 1.0, *, burst: int | None = None, name: str = "rate_limit") -> Envelope:
    """At most `rate` calls per `per` seconds (GCRA), bursts of `burst` (default: `rate`)."""
    return Envelope(name, rate_limit=RateLimit(rate, per, burst))


def fallback(
    answer: Callable[..., Any],
    *,
    on: tuple[str, ...] = ("failure", "timeout", "connect_error", "upstream_reset", "upstream_5xx"),
    name: str = "fallback",
) -> Envelope:
    """Answers with `answer(*args, **kwargs)` when the call fails for one of the outcomes in `on`."""
    return Envelope(name, fallback=answer, fallback_on=on)
