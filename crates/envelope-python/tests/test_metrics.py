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
