"""`Envelope`: the engine's policies composed in their documented order, around functions and coroutines."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
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


class _Answer:
    """The call's answer when the loop ends other than by a plain success (the fallback's, or a result
    `classify_result` called a failure)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass(frozen=True)
class Retry:
    """Retry settings (the engine decides: attempts, backoff and jitter, `Retry-After`, deadline, budget).

    `backoff` is `"exponential"` (doubling), `"linear"` or `"constant"` from `base` up to `max_delay` seconds, with
    `jitter` `"full"`, `"equal"`, `"decorrelated"` or `"none"`. `retry_on` names the outcomes retried (by default
    the engine's transient ones: timeouts, connection errors and resets, 5xx, 429) and may also give exception
    types: an exception that is none of them is then not retried (it still counts for the breaker). `budget` is
    `(ttl seconds, retries always allowed per second, retries per live call)`.
    """

    max_attempts: int = 3
    backoff: str = "exponential"
    base: float = 0.1
    max_delay: float = 2.0
    jitter: str = "full"
    retry_on: tuple[str | type[BaseException], ...] | None = None
    budget: tuple[float, int, float] | None = (10.0, 10, 0.2)

    def outcomes(self) -> list[str] | None:
        """The outcome names in `retry_on`, for the engine (`None`: its default set)."""
        if self.retry_on is None:
            return None
        names = [r for r in self.retry_on if isinstance(r, str)]
        return names if names or not self.exception_types() else None

    def exception_types(self) -> tuple[type[BaseException], ...]:
        """The exception types in `retry_on` (empty: any exception whose outcome the engine retries)."""
        return tuple(r for r in self.retry_on or () if isinstance(r, type))


@dataclass(frozen=True)
class Event:
    """What happened in a call through an envelope, for `on_event` callbacks.

    `kind` is `"retry"` (attempt `attempt` ended in `outcome`; the next starts after `wait` seconds),
    `"rejected"` (a policy refused attempt `attempt` before it ran: `outcome` says which), `"gave_up"` (the call
    failed for good with `outcome`) or `"fallback"` (the fallback answered a call that failed with `outcome`).
    """

    kind: str
    envelope: str
    outcome: str
    attempt: int
    wait: float | None = None


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


# The outcomes a fallback answers by default: the dependency is down or too slow, or the envelope refused the call.
_FALLBACK_ON = ("circuit_open", "timeout", "connect_error", "upstream_reset", "upstream_5xx", "bulkhead_full", "shed")


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
        fallback_on: tuple[str, ...] = _FALLBACK_ON,
        classify: Callable[[BaseException], str] = classify_exception,
        classify_result: Callable[[Any], str | tuple[str, float | None] | None] | None = None,
        ignore: tuple[type[BaseException], ...] = (),
        on_event: Callable[[Event], object] | None = None,
        _core: _envelope.Envelope | None = None,
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
            "classify_result": classify_result,
            "ignore": ignore,
            "on_event": on_event,
        }
        self._fallback = fallback
        self._classify = classify
        self._classify_result = classify_result
        self._ignore = tuple(ignore)
        self._retry_types = retry.exception_types() if retry else ()
        self._on_event = on_event
        self._from_config = _core is not None
        self._core = _core or _envelope.Envelope(
            name,
            deadline=deadline,
            attempt_timeout=attempt_timeout,
            breaker=breaker._core if breaker is not None else None,
            max_attempts=retry.max_attempts if retry else None,
            backoff=(retry.backoff, retry.base, retry.max_delay, retry.jitter) if retry else None,
            retry_on=retry.outcomes() if retry else None,
            budget=retry.budget if retry else None,
            bulkhead=_bulkhead(bulkhead),
            rate_limit=_rate_limit(rate_limit),
            fallback_on=list(fallback_on) if fallback is not None else None,
        )
        metrics.track_envelope(self)

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str],
        name: str,
        *,
        fallback: Callable[..., Any] | None = None,
        fallback_on: tuple[str, ...] = _FALLBACK_ON,
        classify: Callable[[BaseException], str] = classify_exception,
        classify_result: Callable[[Any], str | tuple[str, float | None] | None] | None = None,
        ignore: tuple[type[BaseException], ...] = (),
        on_event: Callable[[Event], object] | None = None,
    ) -> Envelope:
        """The envelope of route `name` (or of upstream `name`) in the sidecar's config file at `path`, read and
        validated by the sidecar's own parser (`ValueError` naming file, line, column and field): the route's
        `timeout` is the deadline, its `attempt_timeout` and `retry` apply, and its upstream's `breaker`,
        `bulkhead` and `rate_limit`. The upstream's breaker is the registry's `breaker(<upstream>)`, so every
        envelope made for routes to one upstream shares it, as in the sidecar. What a file cannot say (the
        fallback, the classification, callbacks) is given here."""
        from ._breaker import _registry, _registry_lock

        with _registry_lock:
            known = {n: b._core for n, b in _registry.items()}
            core, breaker_core, upstream = _envelope.Envelope.from_config(os.fspath(path), name, known)
            breaker = _registry.get(upstream)
            if breaker_core is not None and breaker is None:
                breaker = CircuitBreaker._wrap(breaker_core, ignore=ignore, classify=classify)
                _registry[upstream] = breaker
        env = cls(
            name,
            breaker=breaker,
            fallback=fallback,
            fallback_on=fallback_on,
            classify=classify,
            classify_result=classify_result,
            ignore=ignore,
            on_event=on_event,
            _core=core,
        )
        return env

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
        made = 0
        while True:
            try:
                attempt = steps.admit(blocking=True)
            except Rejected as rejected:
                next_step = self._refused(steps, made + 1, rejected, args, kwargs)
            else:
                made += 1
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    next_step = self._failed(steps, attempt, made, exc, args, kwargs)
                else:
                    if self._classify_result is None:  # the common case, without a call more
                        steps.succeeded(attempt)
                        return result
                    next_step = self._answered(steps, attempt, made, result, args, kwargs)
            if isinstance(next_step, _Answer):
                return cast(R, next_step.value)
            time.sleep(next_step)

    async def call_async(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Awaits `fn(*args, **kwargs)` through the envelope; each attempt is cancelled when its time is up."""
        steps = self._core.steps()
        made = 0
        while True:
            try:
                attempt = steps.admit(queue=True)
                wait = attempt.queue_wait
                if wait is not None:
                    await _wait_in_queue(steps, attempt, wait)
            except Rejected as rejected:
                next_step = self._refused(steps, made + 1, rejected, args, kwargs)
            else:
                made += 1
                limit = attempt.limit
                try:
                    result = await (fn(*args, **kwargs) if limit is None else _within(limit, fn(*args, **kwargs)))
                except BaseException as exc:
                    next_step = self._failed(steps, attempt, made, exc, args, kwargs)
                else:
                    if self._classify_result is None:  # the common case, without a call more
                        steps.succeeded(attempt)
                        return result
                    next_step = self._answered(steps, attempt, made, result, args, kwargs)
            if isinstance(next_step, _Answer):
                return cast(R, next_step.value)
            await asyncio.sleep(next_step)

    def _answered(
        self,
        steps: _envelope.Steps,
        attempt: _envelope.StepAttempt,
        made: int,
        result: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> float | _Answer:
        """An attempt returned: the call's answer, unless `classify_result` says the result is a failure (then as
        for a failed attempt; when the engine stops trying, the last result is the answer, or the fallback's)."""
        verdict = self._classify_result(result) if self._classify_result is not None else None
        outcome, retry_after = verdict if isinstance(verdict, tuple) else (verdict, None)
        if outcome is None or outcome == "ok":
            steps.succeeded(attempt)
            return _Answer(result)
        return self._ended(steps, attempt, made, outcome, retry_after, True, args, kwargs, result=_Answer(result))

    def _refused(
        self,
        steps: _envelope.Steps,
        made: int,
        rejected: Rejected,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> float | _Answer:
        """A policy refused the attempt before it ran: the wait before the next one, or the call's end."""
        self._emit("rejected", rejected.outcome, made)
        wait = steps.rejected(rejected.outcome, rejected.retry_after)
        if wait is None:
            return _Answer(self._give_up(steps, made, rejected.outcome, args, kwargs, error=rejected))
        return wait

    def _failed(
        self,
        steps: _envelope.Steps,
        attempt: _envelope.StepAttempt,
        made: int,
        exc: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> float | _Answer:
        """An attempt raised: the wait before the next one, or the call's end — the fallback's answer, or the
        error raised again. An exception not recorded (ignored, cancellation) ends the call at once."""
        outcome = self._outcome(exc)
        if outcome is None:
            attempt.release()
            steps.finish("client_cancelled")
            raise exc
        may_retry = not self._retry_types or isinstance(exc, self._retry_types)
        retry_after = getattr(exc, "retry_after", None)
        return self._ended(steps, attempt, made, outcome, retry_after, may_retry, args, kwargs, error=exc)

    def _ended(
        self,
        steps: _envelope.Steps,
        attempt: _envelope.StepAttempt,
        made: int,
        outcome: str,
        retry_after: float | None,
        may_retry: bool,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        error: BaseException | None = None,
        result: _Answer | None = None,
    ) -> float | _Answer:
        """An attempt ended in a failure (raised `error`, or returned `result`): the engine's wait before the next
        attempt, or the call's end."""
        wait = steps.after(attempt, outcome, retry_after, may_retry)
        if wait is None:
            return _Answer(self._give_up(steps, made, outcome, args, kwargs, error=error, result=result))
        self._emit("retry", outcome, made, wait)
        return wait

    def _give_up(
        self,
        steps: _envelope.Steps,
        made: int,
        outcome: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        error: BaseException | None = None,
        result: _Answer | None = None,
    ) -> Any:
        """The call failed for good: the fallback's answer if the engine says it applies, else the error raised (or
        the last result returned)."""
        fallback = self._fallback is not None and steps.fallback_applies(outcome)
        steps.finish(outcome)
        if fallback and self._fallback is not None:
            self._emit("fallback", outcome, made)
            return self._fallback(*args, **kwargs)
        self._emit("gave_up", outcome, made)
        if error is not None:
            raise error
        return result.value if result is not None else None

    def _emit(self, kind: str, outcome: str, attempt: int, wait: float | None = None) -> None:
        if self._on_event is not None:
            self._on_event(Event(kind, self.name, outcome, attempt, wait))

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
    except BaseException:
        attempt.release()  # cancelled: the place in the queue (or a permit granted meanwhile) goes on now
        raise
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
    "classify_result": None,
    "on_event": None,
}


def merge(inner: Envelope, outer: Envelope) -> Envelope:
    """One envelope with the policies of both (each policy from the one that gives it; both giving one is an
    error), named after the inner one."""
    if inner._from_config or outer._from_config:
        raise ValueError(
            f"an envelope read from a config file is complete: give the other policies in the file "
            f"({inner.name!r}, {outer.name!r})"
        )
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
