"""Prometheus metrics under the sidecar's names and labels, through `prometheus_client`.

`envelope.metrics.register()` adds a collector to a `prometheus_client` registry (the default one unless given).
At each scrape it reads what every live `Envelope` and `CircuitBreaker` of the process counted in the engine (the
counters of engine events are the engine's own listeners, as in the sidecar; a series appears once it counts):

| metric | type | labels |
|---|---|---|
| `envelope_requests_total` | counter | `listener` (`python`; `asgi` for the middleware), `route` (the envelope's name, or the route template), `outcome`, `code` (`none`) |
| `envelope_request_duration_seconds` | histogram (the sidecar's buckets, 5 ms … 10 s) | `route` |
| `envelope_upstream_attempts_total` | counter | `route`, `upstream` (the envelope's name; from a config file, the route's upstream) |
| `envelope_breaker_state` | gauge (1 for the current state) | `upstream` (the breaker's name), `state` |
| `envelope_breaker_transitions_total` | counter | `upstream`, `from`, `to` |
| `envelope_breaker_rejections_total` | counter | `upstream` (calls an open breaker refused) |
| `envelope_retries_total` | counter | `route` (retries scheduled) |
| `envelope_retries_given_up_total` | counter | `route`, `reason` (`attempts_exhausted`, `budget_exhausted`, `deadline`, `not_retryable`, `retry_after_too_long`, …) |
| `envelope_timeouts_total` | counter | `route` (attempts cut off or calls ended by their deadline) |
| `envelope_bulkhead_rejections_total` | counter | `upstream`, `waited` |
| `envelope_rate_limited_total` | counter | `upstream`, `shadow` |
| `envelope_slo_error_budget_remaining` | gauge | `route` (the middleware's route templates) |
| `envelope_slo_burn_rate` | gauge | `route`, `window` (5m, 30m, 1h, 6h, 3d, 30d) |

So the Prometheus rules and the Grafana dashboard `envelope generate` writes for a route apply unchanged to an
envelope of the same name in an application that uses only the Python package. Requires `prometheus_client`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from . import _envelope

if TYPE_CHECKING:
    from ._breaker import CircuitBreaker
    from ._envelope_policy import Envelope

T = TypeVar("T")

_envelopes: weakref.WeakSet[Envelope] = weakref.WeakSet()
_breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_routes: dict[str, _envelope.Meter] = {}
_slos: dict[str, _envelope.Slo] = {}
_lock = threading.Lock()

BURN_WINDOWS = ("5m", "30m", "1h", "6h", "3d", "30d")


def route_slo(route: str) -> _envelope.Slo:
    """The SLO of a route template (the ASGI middleware's), in its tier by the sidecar's path rule."""
    return _get_or_make(_slos, route, lambda: _envelope.Slo(_envelope.priority_by_path(route)))


def _get_or_make(table: dict[str, T], key: str, make: Callable[[], T]) -> T:
    """`table[key]`, made once under the lock the first time (reads take no lock)."""
    found = table.get(key)
    if found is None:
        with _lock:
            found = table.get(key)
            if found is None:
                found = table[key] = make()
    return found


def slo_state() -> dict[str, dict[str, Any]]:
    """Every route's SLO state now (availability, error budget left, burn rates per window, alerts)."""
    with _lock:
        slos = list(_slos.items())
    return {route: slo.report() for route, slo in slos}


def route_meter(route: str) -> _envelope.Meter:
    """The meter of a route template (the ASGI middleware's), made the first time."""
    return _get_or_make(_routes, route, _envelope.Meter)


def track_envelope(envelope: Envelope) -> None:
    with _lock:
        _envelopes.add(envelope)


def track_breaker(breaker: CircuitBreaker) -> None:
    with _lock:
        _breakers.add(breaker)


class EnvelopeCollector:
    """A `prometheus_client` collector of every live envelope's and breaker's counts."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with _lock:
            envelopes = list(_envelopes)
            breakers = list(_breakers)
            routes = list(_routes.items())
            slos = list(_slos.items())
        requests = CounterMetricFamily(
            "envelope_requests",
            "Requests answered, by route, outcome and status class",
            labels=["listener", "route", "outcome", "code"],
        )
        duration = HistogramMetricFamily(
            "envelope_request_duration_seconds", "Time to answer a request", labels=["route"]
        )
        attempts = CounterMetricFamily(
            "envelope_upstream_attempts", "Attempts sent to upstreams", labels=["route", "upstream"]
        )
        # Envelopes and breakers of one name (several envelopes of one config upstream) add up to one series.
        events: dict[str, dict[tuple[str, ...], float]] = {name: {} for name, _, _ in _EVENT_FAMILIES}
        for env in envelopes:
            m = env._core.metrics()
            for outcome, n in m["calls"].items():
                if n:
                    requests.add_metric(["python", env.name, outcome, "none"], n)
            buckets = [(_bound(b), n) for b, n in m["buckets"]]
            duration.add_metric([env.name], buckets, m["sum"])
            attempts.add_metric([env.name, m["upstream"]], m["attempts"])
            _add(events["envelope_retries"], (env.name,), m["retries"])
            for reason, n in m["gave_up"].items():
                _add(events["envelope_retries_given_up"], (env.name, reason), n)
            _add(events["envelope_timeouts"], (env.name,), m["timeouts"])
            for waited, n in zip(("false", "true"), m["bulkhead_rejected"]):
                _add(events["envelope_bulkhead_rejections"], (m["upstream"], waited), n)
            for shadow, n in zip(("false", "true"), m["rate_limited"]):
                _add(events["envelope_rate_limited"], (m["upstream"], shadow), n)
        for route, meter in routes:
            m = meter.metrics()
            for outcome, n in m["calls"].items():
                if n:
                    requests.add_metric(["asgi", route, outcome, "none"], n)
            duration.add_metric([route], [(_bound(b), n) for b, n in m["buckets"]], m["sum"])
        state = GaugeMetricFamily(
            "envelope_breaker_state", "Circuit breaker state (1 for the current state)", labels=["upstream", "state"]
        )
        states: dict[str, str] = {}
        for breaker in breakers:
            b = breaker.metrics()
            states[breaker.name] = b["state"]
            _add(events["envelope_breaker_rejections"], (breaker.name,), b["rejections"])
            for from_state, to_state, n in b["transitions"]:
                _add(events["envelope_breaker_transitions"], (breaker.name, from_state, to_state), n)
        for upstream, current in states.items():
            for name in _envelope.BREAKER_STATES:
                state.add_metric([upstream, name], 1.0 if name == current else 0.0)
        budget = GaugeMetricFamily(
            "envelope_slo_error_budget_remaining", "Share of the availability error budget left", labels=["route"]
        )
        burn = GaugeMetricFamily("envelope_slo_burn_rate", "Availability burn rate per window", labels=["route", "window"])
        for route, slo in slos:
            report = slo.report()
            budget.add_metric([route], report["budget_remaining"])
            for window, rate in zip(BURN_WINDOWS, report["burn_rates"]):
                burn.add_metric([route, window], rate)
        yield requests
        yield duration
        yield attempts
        yield state
        for name, documentation, labels in _EVENT_FAMILIES:
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for values, n in events[name].items():
                if n:
                    family.add_metric(list(values), n)
            yield family
        yield budget
        yield burn


# The counters of engine events: the sidecar's names, help texts and labels.
_EVENT_FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("envelope_breaker_transitions", "Circuit breaker state changes", ("upstream", "from", "to")),
    ("envelope_breaker_rejections", "Calls rejected by an open circuit breaker", ("upstream",)),
    ("envelope_retries", "Retries scheduled", ("route",)),
    ("envelope_retries_given_up", "Calls whose retries stopped, by reason", ("route", "reason")),
    ("envelope_timeouts", "Deadlines and attempt timeouts that fired", ("route",)),
    ("envelope_bulkhead_rejections", "Calls rejected by a full bulkhead", ("upstream", "waited")),
    ("envelope_rate_limited", "Calls over a local rate limit", ("upstream", "shadow")),
)


def _add(table: dict[tuple[str, ...], float], key: tuple[str, ...], n: float) -> None:
    table[key] = table.get(key, 0) + n


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)


def register(registry: Any = None) -> EnvelopeCollector:
    """Adds the collector to `registry` (`prometheus_client.REGISTRY` by default) and returns it."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    collector = EnvelopeCollector()
    registry.register(collector)
    return collector
