"""`Envelope`: the engine's policies composed in their documented order, around functions and coroutines."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast, overload

from . import _envelope, metrics
from ._breaker import CircuitBreaker
from ._classify import classify_exception
from ._errors import DeadlineExceeded, Rejected

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class _Answer:
    """The call's answer when it ends without the function's own (the fallback's)."""

    value: Any


@dataclass(frozen=True)
class Retry:
    """Retry settings (the engine decides: attempts, backoff and jitter, `Retry-After`, deadline, budget).

    `backoff` is `"exponential"` (doubling), `"linear"` or `"constant"` from `base` up to `max_delay` seconds, with
    `jitter` `"full"`, `"equal"`, `"decorrelated"` or `"none"`. `retry_on` names the outcomes retried (by default
    the engine's transient ones: timeouts, connection errors and resets, 5xx, 429). `budget` is `(ttl seconds,
    retries always allowed per second, retries per live call)`.
    """

    max_attempts: int = 3
    backoff: str = "exponential"
    base: float = 0.1
    max_delay: float = 2.0
    jitter: str = "full"
    retry_on: tuple[str, ...] | None = None
    budget: tuple[float, int, float] | None = (10.0, 10, 0.2)


@dataclass(frozen=True)
class Bulkhead:
    """At most `max_concurrent` calls in flight; up to `max_queue` more wait (FIFO, the engine's queue, shared by
    threads and coroutines) at most `max_wait` seconds each. Without a queue a call over the limit is refused at
    once (`BulkheadFull`)."""

    max_concurrent: int
    max_queue: int = 0
    max_wait: float = 0.0


@dataclass(frozen=True)
class RateLimit:
    """At most `rate` calls per `per` seconds, spaced evenly (GCRA), with bursts of up to `burst` calls (by default
    `rate`). Over the limit, a call is refused at once (`RateLimited`, with `retry_after`)."""

    rate: int
    per: float = 1.0
    burst: int | None = None


class Envelope:
    """Policies composed in the engine's documented order, whatever order they are given in:
    deadline → fallback → retry → breaker → rate limit → bulkhead → attempt timeout → the call.

    Use it as a decorator (`@envelope`, on a function or a coroutine function) or call through it
    (`envelope.call(fn, *args)`, `await envelope.call_async(fn, *args)`). A coroutine is cancelled when its
    attempt's time is up (`attempt_timeout`, or the time left before `deadline`); a function cannot be stopped
    from outside, so its attempt runs to its end and the timeout decides only whether another attempt starts (see
    docs/python.md). `fallback` answers a call that failed for an outcome in `fallback_on` (by default: the
    breaker open, retries exhausted on a transient failure, a timeout, a full bulkhead, shed).
    """

    def __init__(
        self,
        name: str,
        *,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        bulkhead: Bulkhead | tuple[int, int, float] | None = None,
        rate_limit: RateLimit | tuple[int, float, int] | None = None,
        fallback: Callable[..., Any] | None = None,
        fallback_on: tuple[str, ...] = (
            "circuit_open",
            "timeout",
            "connect_error",
            "upstream_reset",
            "upstream_5xx",
            "bulkhead_full",
            "shed",
        ),
        classify: Callable[[BaseException], str] = classify_exception,
        ignore: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.name = name
        # The settings as given, so that stacked single-policy decorators can be merged into one envelope.
        self._settings: dict[str, Any] = {
            "deadline": deadline,
            "attempt_timeout": attempt_timeout,
            "retry": retry,
            "breaker": breaker,
            "bulkhead": bulkhead,
            "rate_limit": rate_limit,
            "fallback": fallback,
            "fallback_on": fallback_on,
            "classify": classify,
            "ignore": ignore,
        }
        self._fallback = fallback
        self._classify = classify
        self._ignore = tuple(ignore)
        self._core = _envelope.Envelope(
            name,
            deadline=deadline,
            attempt_timeout=attempt_timeout,
            breaker=breaker._core if breaker is not None else None,
            max_attempts=retry.max_attempts if retry else None,
            backoff=(retry.backoff, retry.base, retry.max_delay, retry.jitter) if retry else None,
            retry_on=list(retry.retry_on) if retry and retry.retry_on is not None else None,
            budget=retry.budget if retry else None,
            bulkhead=_bulkhead(bulkhead),
            rate_limit=_rate_limit(rate_limit),
            fallback_on=list(fallback_on) if fallback is not None else None,
        )
        metrics.track_envelope(self)

    def metrics(self) -> dict[str, Any]:
        """What the envelope's calls did so far (calls by outcome, durations, attempts) and, with a bulkhead, its
        `active`, `queued` and `rejected` now."""
        return self._core.metrics()

    def _outcome(self, exc: BaseException) -> str | None:
        """The outcome of a failed attempt, or `None` if it is not recorded (ignored types, cancellation)."""
        if not isinstance(exc, Exception) or isinstance(exc, self._ignore):
            return None
        return self._classify(exc)

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Calls `fn` through the envelope (waits block the thread; the interpreter is released meanwhile)."""
        steps = self._core.steps()
        while True:
            try:
                attempt = steps.admit(blocking=True)
            except Rejected as rejected:
                next_step = self._failed(steps, None, rejected, args, kwargs)
            else:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    next_step = self._failed(steps, attempt, exc, args, kwargs)
                else:
                    steps.succeeded(attempt)
                    return result
            if isinstance(next_step, _Answer):
                return cast(R, next_step.value)
            time.sleep(next_step)

    async def call_async(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Awaits `fn(*args, **kwargs)` through the envelope; each attempt is cancelled when its time is up."""
        steps = self._core.steps()
        while True:
            try:
                attempt = steps.admit(queue=True)
                wait = attempt.queue_wait
                if wait is not None:
                    await _wait_in_queue(steps, attempt, wait)
            except Rejected as rejected:
                next_step = self._failed(steps, None, rejected, args, kwargs)
            else:
                limit = attempt.limit
                try:
                    result = await (fn(*args, **kwargs) if limit is None else _within(limit, fn(*args, **kwargs)))
                except BaseException as exc:
                    next_step = self._failed(steps, attempt, exc, args, kwargs)
                else:
                    steps.succeeded(attempt)
                    return result
            if isinstance(next_step, _Answer):
                return cast(R, next_step.value)
            await asyncio.sleep(next_step)

    def _failed(
        self,
        steps: _envelope.Steps,
        attempt: _envelope.StepAttempt | None,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> float | _Answer:
        """An attempt failed (or was refused, `attempt` `None`): the wait before the next one, or the call's end —
        the fallback's answer, or the error raised again."""
        if attempt is None:
            wait = steps.rejected(getattr(exc, "outcome", "failure"), getattr(exc, "retry_after", None))
            if wait is None:
                return _Answer(self._give_up(steps, exc, args, kwargs))
            return wait
        outcome = self._outcome(exc)
        if outcome is None:
            steps.finish("client_cancelled")
            raise exc
        wait = steps.after(attempt, outcome, getattr(exc, "retry_after", None))
        if wait is None:
            return _Answer(self._give_up(steps, exc, args, kwargs, outcome))
        return wait

    def _give_up(
        self,
        steps: _envelope.Steps,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outcome: str | None = None,
    ) -> Any:
        """The call failed for good: the fallback's answer if the engine says it applies, else the error."""
        outcome = outcome or str(getattr(exc, "outcome", "failure"))
        fallback = self._fallback is not None and steps.fallback_applies(outcome)
        steps.finish(outcome)
        if fallback and self._fallback is not None:
            return self._fallback(*args, **kwargs)
        raise exc

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorates a function or a coroutine function (detected).

        Stacked on a function another envelope decorates, the two merge into one envelope (so the policies run in
        the documented order, whatever order the decorators are written in); a policy given by both is an error.
        """
        inner: Envelope | None = getattr(fn, "__envelope__", None)
        breaker: CircuitBreaker | None = getattr(fn, "__envelope_breaker__", None)
        if breaker is not None:
            inner = Envelope(breaker.name, breaker=breaker)
        if inner is not None:
            merged = merge(inner, self)
            return merged(fn.__wrapped__)  # type: ignore[attr-defined]
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(fn, *args, **kwargs)

            guarded_async.__envelope__ = self  # type: ignore[attr-defined]
            return guarded_async

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            return self.call(fn, *args, **kwargs)

        guarded.__envelope__ = self  # type: ignore[attr-defined]
        return guarded


def _bulkhead(b: Bulkhead | tuple[int, int, float] | None) -> tuple[int, int, float] | None:
    if isinstance(b, Bulkhead):
        return (b.max_concurrent, b.max_queue, b.max_wait)
    return b


def _rate_limit(r: RateLimit | tuple[int, float, int] | None) -> tuple[int, float, int] | None:
    if isinstance(r, RateLimit):
        return (r.rate, r.per, r.rate if r.burst is None else r.burst)
    return r


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait_in_queue(steps: _envelope.Steps, attempt: _envelope.StepAttempt, wait: float) -> None:
    """Waits (at most `wait` seconds) in the bulkhead's queue, the engine's FIFO: the engine schedules a callback
    on this loop when it grants the permit. When the wait runs out the engine decides: the permit if it came
    meanwhile, else the rejection it raises. Cancelled, the attempt is dropped and its place given up."""
    loop = asyncio.get_running_loop()
    granted: asyncio.Future[None] = loop.create_future()
    if attempt.ready(loop, functools.partial(_resolve, granted)):
        return
    try:
        await asyncio.wait_for(granted, wait)
    except asyncio.TimeoutError:
        steps.queue_timed_out(attempt)
        return
    attempt.ready()


def _fire(task: asyncio.Task[Any], fired: list[bool]) -> None:
    fired.append(True)
    task.cancel()


if hasattr(asyncio.Task, "uncancel"):

    async def _within(limit: float, awaitable: Awaitable[R]) -> R:
        """Awaits `awaitable` in the caller's task, cancelled after `limit` seconds and then raising
        `DeadlineExceeded` (a cancellation from elsewhere stays a cancellation; the function's own `TimeoutError`
        stays its own). One timer handle per attempt: no task
        of its own (as `asyncio.wait_for` makes) and none of `asyncio.timeout`'s bookkeeping, which cost about
        2 µs more per attempt here (BENCHMARKS.md)."""
        task = asyncio.current_task()
        if task is None:
            return await asyncio.wait_for(awaitable, limit)
        fired: list[bool] = []
        handle = asyncio.get_running_loop().call_later(limit, _fire, task, fired)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if fired and task.uncancel() == 0:
                raise DeadlineExceeded(f"no answer within {limit:g} s") from None
            raise
        finally:
            handle.cancel()

else:  # Python 3.10: no Task.uncancel to tell our cancellation from another

    async def _within(limit: float, awaitable: Awaitable[R]) -> R:
        try:
            return await asyncio.wait_for(awaitable, limit)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no answer within {limit:g} s") from None


_DEFAULTS: dict[str, Any] = {
    "deadline": None,
    "attempt_timeout": None,
    "retry": None,
    "breaker": None,
    "bulkhead": None,
    "rate_limit": None,
    "fallback": None,
}


def merge(inner: Envelope, outer: Envelope) -> Envelope:
    """One envelope with the policies of both (each policy from the one that gives it; both giving one is an
    error), named after the inner one."""
    settings = dict(inner._settings)
    for key, default in _DEFAULTS.items():
        value = outer._settings[key]
        if value is default:
            continue
        if settings[key] is not default:
            raise ValueError(f"`{key}` is given by two stacked envelope decorators ({inner.name!r}, {outer.name!r})")
        settings[key] = value
        if key == "fallback":
            settings["fallback_on"] = outer._settings["fallback_on"]
    return Envelope(inner.name, **settings)


def resilient_call(fn: Callable[..., R], /, *args: Any, policy: Envelope, **kwargs: Any) -> R:
    """Calls `fn(*args, **kwargs)` through `policy` (a function; for a coroutine use
    `await policy.call_async(fn, ...)`)."""
    return policy.call(fn, *args, **kwargs)
