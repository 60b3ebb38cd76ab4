"""`CircuitBreaker`: the engine's breaker around sync functions and coroutines alike."""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

from . import _envelope
from ._classify import classify_exception

P = ParamSpec("P")
R = TypeVar("R")


class CircuitBreaker:
    """A circuit breaker (the Rust engine's state machine, window and probes).

    Use it as a decorator (`@breaker`, on a function or a coroutine function), or call through it
    (`breaker.call(fn, *args)`, `await breaker.call_async(fn, *args)`). A call the breaker refuses raises
    `CircuitOpen` without calling anything.

    An exception is recorded by its outcome (`classify_exception`, or `classify=`); exceptions of the types in
    `ignore` — and cancellation, `KeyboardInterrupt`, `SystemExit` — are not recorded at all (a probe they held is
    handed back). Unset settings are the engine's defaults: a window of the last 100 calls, 20 calls before any
    verdict, 50 % failures to trip, 30 s open, 3 probes.

    `on_state_change(name, from_state, to_state)` is called at every transition (by the engine, on the thread
    that caused it, outside the breaker's locks); an exception it raises is reported, never raised to the call.
    """

    def __init__(
        self,
        name: str,
        *,
        window: int | None = None,
        window_seconds: int | None = None,
        min_calls: int | None = None,
        failure_rate: float | None = None,
        slow_call: tuple[float, float] | None = None,
        open_for: float | None = None,
        max_open_for: float | None = None,
        half_open_calls: int | None = None,
        max_half_open_wait: float | None = None,
        ignore: tuple[type[BaseException], ...] = (),
        classify: Callable[[BaseException], str] = classify_exception,
        on_state_change: Callable[[str, str, str], object] | None = None,
    ) -> None:
        self._core = _envelope.Breaker(
            name,
            window=window,
            window_seconds=window_seconds,
            min_calls=min_calls,
            failure_rate=failure_rate,
            slow_call=slow_call,
            open_for=open_for,
            max_open_for=max_open_for,
            half_open_calls=half_open_calls,
            max_half_open_wait=max_half_open_wait,
            on_state_change=on_state_change,
        )
        self._ignore = tuple(ignore)
        self._classify = classify
        from . import metrics

        metrics.track_breaker(self)

    @classmethod
    def _wrap(
        cls,
        core: _envelope.Breaker,
        *,
        ignore: tuple[type[BaseException], ...] = (),
        classify: Callable[[BaseException], str] = classify_exception,
    ) -> CircuitBreaker:
        """A breaker around an engine breaker made elsewhere (from a config file)."""
        self = cls.__new__(cls)
        self._core = core
        self._ignore = tuple(ignore)
        self._classify = classify
        from . import metrics

        metrics.track_breaker(self)
        return self

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def state(self) -> str:
        """`closed`, `open`, `half_open`, `disabled`, `forced_open`, `forced_closed` or `metrics_only`."""
        return self._core.state

    def metrics(self) -> dict[str, Any]:
        """The window now (see `_envelope.Breaker.metrics`)."""
        return self._core.metrics()

    def force_open(self) -> None:
        self._core.force_open()

    def force_closed(self) -> None:
        self._core.force_closed()

    def reset(self) -> None:
        self._core.reset()

    def _settle(self, permit: _envelope.BreakerPermit, exc: BaseException) -> None:
        if not isinstance(exc, Exception) or isinstance(exc, self._ignore):
            permit.release()
        else:
            permit.record(self._classify(exc))

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Calls `fn` through the breaker."""
        permit = self._core.acquire()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(permit, exc)
            raise
        permit.record("ok")
        return result

    async def call_async(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Awaits `fn(*args, **kwargs)` through the breaker."""
        permit = self._core.acquire()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(permit, exc)
            raise
        permit.record("ok")
        return result

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorates a function or a coroutine function (detected). Stacked with envelope decorators (`@retry`,
        `@timeout`, …), it joins their envelope, so the breaker runs in its documented place."""
        if getattr(fn, "__envelope__", None) is not None:
            from ._envelope_policy import Envelope

            return Envelope(self.name, breaker=self)(fn)
        # The wrappers do what `call` and `call_async` do, inline: one Python frame less on every call, and on
        # every rejection (an open breaker's refusal is the path that must be cheapest).
        core, settle = self._core, self._settle
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                permit = core.acquire()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    settle(permit, exc)
                    raise
                permit.record("ok")
                return result

            guarded_async.__envelope_breaker__ = self  # type: ignore[attr-defined]
            return guarded_async

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            permit = core.acquire()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                settle(permit, exc)
                raise
            permit.record("ok")
            return result

        # An envelope decorator stacked over this one takes the breaker into its own envelope.
        guarded.__envelope_breaker__ = self  # type: ignore[attr-defined]
        return guarded

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self.name!r}, state={self.state!r})"


_registry: weakref.WeakValueDictionary[str, CircuitBreaker] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def breaker(name: str, **settings: Any) -> CircuitBreaker:
    """The breaker named `name`, made with `settings` the first time it is asked for (later calls return it as it
    is: give the settings once). Every part of an application that names the same dependency shares one breaker."""
    with _registry_lock:
        found = _registry.get(name)
        if found is None:
            found = CircuitBreaker(name, **settings)
            _registry[name] = found
        return found


def breakers() -> dict[str, CircuitBreaker]:
    """Every breaker made with `breaker(name)` and still in use, by name (to list, inspect, force or reset)."""
    with _registry_lock:
        return dict(_registry)
