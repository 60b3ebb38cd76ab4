"""`Envelope.from_config`: the sidecar's config file, read by the sidecar's own parser, and the `ENVELOPE_<NAME>_*`
environment overrides."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import envelope
from envelope import BulkheadFull, CircuitOpen, DeadlineExceeded, Envelope

CONFIG = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:0"

[[upstream]]
name = "model"
endpoints = ["http://127.0.0.1:9"]
bulkhead = { max_concurrent = 1 }
breaker = { window = { count = 4 }, min_calls = 4, failure_rate = 50, open_for = "60s" }

[[route]]
name = "complete"
match = { path_prefix = "/complete" }
upstream = "model"
timeout = "200ms"
attempt_timeout = "50ms"
retry = { max_attempts = 3, base = "1ms", max_delay = "2ms", jitter = "none" }

[[route]]
name = "embed"
match = { path_prefix = "/embed" }
upstream = "model"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "envelope.toml"
    path.write_text(CONFIG)
    # The registry is the process's: a breaker left by another test starts afresh.
    if "model" in envelope.breakers():
        envelope.breakers()["model"].reset()
    return path


async def test_a_route_brings_its_deadline_retry_and_its_upstreams_policies(config: Path) -> None:
    complete = Envelope.from_config(config, "complete")
    attempts = 0

    async def hangs() -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(10)

    # Attempts are cut at 50 ms, retried up to 3, all within the route's 200 ms.
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(complete.call_async(hangs), 5)
    assert attempts == 3

    # The upstream's breaker is shared by both routes, and listed in the registry under the upstream's name: the
    # route's three timed-out attempts are on it, and one more failure through the other route opens it.
    embed = Envelope.from_config(config, "embed")
    model = envelope.breakers()["model"]
    assert model is embed._settings["breaker"]
    assert model.metrics()["calls"] == 3
    with pytest.raises(ConnectionRefusedError):
        embed.call(_refused)
    assert model.state == "open"
    with pytest.raises(CircuitOpen):
        complete.call(lambda: "not called")
    envelope.breakers()["model"].reset()

    # The bulkhead of 1: a second call while one is in flight is refused.
    def reenter() -> str:
        with pytest.raises(BulkheadFull):
            embed.call(lambda: "second")
        return "first"

    assert embed.call(reenter) == "first"


def _refused() -> None:
    raise ConnectionRefusedError("nobody listens")


def test_errors_name_the_file_line_and_field(tmp_path: Path, config: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.replace('timeout = "200ms"', 'timeout = "soon"'))
    with pytest.raises(ValueError, match=r"bad\.toml:16:\d+: `route\[0\]\.timeout`"):
        Envelope.from_config(bad, "complete")
    with pytest.raises(ValueError, match="no route or upstream named `nope`.*complete, embed.*model"):
        Envelope.from_config(config, "nope")
    with pytest.raises(ValueError, match="cannot read"):
        Envelope.from_config(tmp_path / "missing.toml", "complete")


def test_environment_overrides_one_envelope(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVELOPE_COMPLETE_MAX_ATTEMPTS", "1")
    calls = 0

    def fails() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        Envelope.from_config(config, "complete").call(fails)
    assert calls == 1, "the environment's 1 attempt, not the file's 3"

    monkeypatch.setenv("ENVELOPE_LLM_CLIENT_MAX_ATTEMPTS", "2")
    calls = 0
    with pytest.raises(ConnectionResetError):
        Envelope("llm-client", retry=envelope.Retry(max_attempts=5, base=0.001, max_delay=0.002)).call(fails)
    assert calls == 2

    monkeypatch.setenv("ENVELOPE_LLM_CLIENT_DEADLINE", "later")
    with pytest.raises(ValueError, match="ENVELOPE_LLM_CLIENT_DEADLINE"):
        Envelope("llm-client")
