"""The ASGI middleware around a FastAPI application, driven in process through httpx."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

import envelope.metrics
from envelope.asgi import REQUEST_ID, EnvelopeMiddleware, RequestIdFilter

log = logging.getLogger("test.app")


def make_app(cancelled: list[bool]) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, object]:
        log.warning("serving item %s", item_id)
        return {"item": item_id, "request_id": REQUEST_ID.get()}

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return {"late": "yes"}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    app.add_middleware(EnvelopeMiddleware, name="shop", timeout=0.05)
    return app


async def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


async def test_request_ids_are_kept_when_valid_made_when_not_and_on_the_apps_log_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    async with await client(make_app([])) as c:
        kept = await c.get("/items/1", headers={"x-request-id": "abc-123"})
        assert kept.status_code == 200
        assert kept.headers["x-request-id"] == "abc-123"
        assert kept.json()["request_id"] == "abc-123", "the handler sees it in the contextvar"

        made = await c.get("/items/2", headers={"x-request-id": "bad id with spaces"})
        made_id = made.headers["x-request-id"]
        assert made_id != "bad id with spaces" and len(made_id) == 36, "an invalid id is replaced by a new one"
        assert made.json()["request_id"] == made_id
    ids = [getattr(r, "request_id", None) for r in caplog.records if r.name == "test.app"]
    assert ids == ["abc-123", made_id]


async def test_a_slow_handler_is_cancelled_and_answered_504_as_a_problem() -> None:
    cancelled: list[bool] = []
    async with await client(make_app(cancelled)) as c:
        r = await c.get("/slow")
    assert r.status_code == 504
    assert r.headers["content-type"] == "application/problem+json"
    doc = r.json()
    assert (doc["status"], doc["outcome"]) == (504, "timeout")
    assert doc["request_id"] == r.headers["x-request-id"]
    assert cancelled == [True], "the handler was cancelled"


async def test_an_unhandled_error_is_a_500_problem_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    async with await client(make_app([])) as c:
        r = await c.get("/boom")
    assert r.status_code == 500
    assert r.json()["status"] == 500 and r.json()["title"] == "Internal Server Error"
    assert "hunter2" not in r.text and "RuntimeError" not in r.text
    assert any("hunter2" in (r.exc_text or "") for r in caplog.records), "the cause is logged in full"


async def test_red_metrics_are_by_route_template_never_by_raw_path() -> None:
    registry = CollectorRegistry()
    envelope.metrics.register(registry)
    async with await client(make_app([])) as c:
        for i in range(3):
            assert (await c.get(f"/items/{i}")).status_code == 200
        assert (await c.get("/nowhere")).status_code == 404
    text = generate_latest(registry).decode()
    assert 'envelope_requests_total{code="none",listener="asgi",outcome="ok",route="/items/{item_id}"}' in text
    assert 'route="unmatched"' in text
    assert "/items/1" not in text and "/nowhere" not in text


async def test_one_json_access_line_per_request_with_the_sidecars_fields() -> None:
    import io
    import json

    import envelope.logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(envelope.logs.JsonFormatter())
    access = logging.getLogger("envelope.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        async with await client(make_app([])) as c:
            await c.get("/items/7", headers={"x-request-id": "req-7", "authorization": "Bearer secret"})
            await c.get("/slow")
    finally:
        access.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert {k: first[k] for k in ("request_id", "listener", "route", "method", "status", "outcome")} == {
        "request_id": "req-7",
        "listener": "shop",
        "route": "/items/{item_id}",
        "method": "GET",
        "status": 200,
        "outcome": "ok",
    }
    assert first["duration_ms"] >= 0 and "ts_ms" in first
    assert (second["status"], second["outcome"]) == (504, "timeout")
    assert "secret" not in stream.getvalue(), "header values are never logged"


async def test_under_load_non_critical_paths_are_shed_first_with_429_and_retry_after() -> None:
    gate = asyncio.Event()
    held = 0
    app = FastAPI()

    @app.get("/reports/{n}")
    async def report(n: int) -> dict[str, int]:
        nonlocal held
        held += 1
        await gate.wait()
        return {"n": n}

    @app.get("/auth/token")
    async def token() -> dict[str, str]:
        return {"token": "t"}

    # A limit of 10: non-critical work may use 75 % of it (8), critical all of it.
    app.add_middleware(EnvelopeMiddleware, name="shop", timeout=None, max_concurrent=10)
    async with await client(app) as c:
        busy = [asyncio.create_task(c.get(f"/reports/{i}")) for i in range(8)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while held < 8 and loop.time() < deadline:  # a bounded poll
            await asyncio.sleep(0.001)
        assert held == 8, "eight non-critical requests in flight"
        shed = await c.get("/reports/9")
        assert shed.status_code == 429
        assert shed.json()["outcome"] == "shed"
        assert 1 <= int(shed.headers["retry-after"]) <= 3, "the expected wait, spread"
        assert (await c.get("/auth/token")).status_code == 200, "critical work still gets in"
        gate.set()
        assert all(r.status_code == 200 for r in await asyncio.gather(*busy))
    assert envelope._envelope.priority_by_path("/auth/token") == "critical"


async def test_each_route_has_its_slo_in_its_tier_and_failures_spend_its_budget() -> None:
    registry = CollectorRegistry()
    envelope.metrics.register(registry)
    async with await client(make_app([])) as c:
        for i in range(5):
            assert (await c.get(f"/items/{i}")).status_code == 200
        assert (await c.get("/boom")).status_code == 500
    state = envelope.metrics.slo_state()
    assert state["/items/{item_id}"]["errors"] == 0
    assert state["/items/{item_id}"]["budget_remaining"] == 1.0
    boom = state["/boom"]
    assert boom["errors"] >= 1 and boom["budget_remaining"] < 0, "one failure overspends a 99.9 % budget"
    assert boom["alert"] == "page"
    text = generate_latest(registry).decode()
    assert 'envelope_slo_error_budget_remaining{route="/boom"}' in text
    assert 'envelope_slo_burn_rate{route="/boom",window="5m"}' in text
