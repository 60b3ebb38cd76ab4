"""Metrics under the sidecar's names, through prometheus_client."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import envelope
import envelope.metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_calls_are_counted_under_the_sidecars_names() -> None:
    registry = CollectorRegistry()
    envelope.metrics.register(registry)
    breaker = envelope.CircuitBreaker("metrics-db", window=10, min_calls=10)
    env = envelope.Envelope("checkout", retry=envelope.Retry(max_attempts=2, base=0.001, budget=None), breaker=breaker)
    assert env.call(lambda: 1) == 1
    with pytest.raises(ConnectionResetError):
        env.call(lambda: (_ for _ in ()).throw(ConnectionResetError()))
    got = samples(registry)
    ok = ("envelope_requests_total", (("code", "none"), ("listener", "python"), ("outcome", "ok"), ("route", "checkout")))
    reset = ok[0], tuple((k, "upstream_reset" if k == "outcome" else v) for k, v in ok[1])
    assert got[ok] == 1
    assert got[reset] == 1
    assert got[("envelope_request_duration_seconds_count", (("route", "checkout"),))] == 2
    # The buckets the generated rules read (the tiers' latency thresholds) are there.
    for le in ("0.1", "0.2", "0.5", "+Inf"):
        assert ("envelope_request_duration_seconds_bucket", (("le", le), ("route", "checkout"))) in got
    assert got[("envelope_upstream_attempts_total", (("route", "checkout"), ("upstream", "checkout")))] == 3
    assert got[("envelope_breaker_state", (("state", "closed"), ("upstream", "metrics-db")))] == 1.0
    assert got[("envelope_breaker_state", (("state", "open"), ("upstream", "metrics-db")))] == 0.0


def test_the_engines_events_are_counted_as_the_sidecar_counts_them() -> None:
    """Retries, give-ups by reason, timeouts, bulkhead and rate-limit rejections, breaker transitions and
    rejections: the engine's listeners count them, under the sidecar's families and labels."""
    import asyncio

    registry = CollectorRegistry()
    envelope.metrics.register(registry)
    breaker = envelope.CircuitBreaker("events-db", window=2, min_calls=2, open_for=60)
    retry = envelope.Retry(max_attempts=2, base=0.001, max_delay=0.002, budget=None)
    env = envelope.Envelope("events", retry=retry, breaker=breaker, attempt_timeout=0.01)

    async def hangs() -> None:
        await asyncio.sleep(10)

    with pytest.raises(envelope.DeadlineExceeded):
        asyncio.run(env.call_async(hangs))  # two attempts cut off: the breaker opens
    with pytest.raises(envelope.CircuitOpen):
        env.call(lambda: 1)

    limited = envelope.Envelope("events-limited", rate_limit=envelope.RateLimit(1, per=60.0))
    limited.call(lambda: 1)
    with pytest.raises(envelope.RateLimited):
        limited.call(lambda: 1)
    full = envelope.Envelope("events-full", bulkhead=envelope.Bulkhead(1))
    with pytest.raises(envelope.BulkheadFull):
        full.call(lambda: full.call(lambda: 1))

    got = samples(registry)
    assert got[("envelope_retries_total", (("route", "events"),))] == 1
    gave_up = ("envelope_retries_given_up_total", (("reason", "attempts_exhausted"), ("route", "events")))
    assert got[gave_up] == 1
    assert got[("envelope_timeouts_total", (("route", "events"),))] == 2
    opened = ("envelope_breaker_transitions_total", (("from", "closed"), ("to", "open"), ("upstream", "events-db")))
    assert got[opened] == 1
    assert got[("envelope_breaker_rejections_total", (("upstream", "events-db"),))] == 1
    assert got[("envelope_rate_limited_total", (("shadow", "false"), ("upstream", "events-limited")))] == 1
    assert got[("envelope_bulkhead_rejections_total", (("upstream", "events-full"), ("waited", "false")))] == 1
    # No series for what never happened.
    assert ("envelope_rate_limited_total", (("shadow", "true"), ("upstream", "events-limited"))) not in got
