"""The middleware under a real uvicorn on 127.0.0.1: streamed responses pass through as they are sent, a slow
handler gets 504, and /metrics is scraped over HTTP and parsed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.parser import text_string_to_metric_families

import envelope.metrics
from envelope.asgi import EnvelopeMiddleware

EVENTS = 3
BOUND = 10.0


class Served:
    """A uvicorn server running an app in a thread of its own, on a free port of 127.0.0.1."""

    def __init__(self, app: FastAPI) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + BOUND
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn starts within the bound"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(BOUND)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def served() -> Iterator[tuple[Served, threading.Semaphore]]:
    acked = threading.Semaphore(0)
    app = FastAPI()

    @app.get("/events")
    async def events() -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            for k in range(EVENTS):
                yield f"data: event-{k}\n\n".encode()
                # The next event only once the client has this one: a middleware that held bytes back would
                # never deliver the first, and the client's bounded wait fails.
                if k + 1 < EVENTS:
                    got = await asyncio.to_thread(acked.acquire, True, BOUND)
                    assert got, "the client acknowledged the event"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(30)
        return {"late": "yes"}

    registry = CollectorRegistry()
    envelope.metrics.register(registry)
    app.mount("/metrics", make_asgi_app(registry))
    app.add_middleware(EnvelopeMiddleware, name="shop", timeout=1.0)
    with Served(app) as server:
        yield server, acked


def test_a_streamed_response_reaches_the_client_event_by_event(served: tuple[Served, threading.Semaphore]) -> None:
    server, acked = served
    seen = ""
    with httpx.stream("GET", f"{server.url}/events", timeout=BOUND) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"]
        chunks = response.iter_text()
        for k in range(EVENTS):
            while f"event-{k}" not in seen:
                seen += next(chunks)
            acked.release()
    assert seen.count("data: event-") == EVENTS


def test_a_slow_handler_gets_504_over_a_real_socket(served: tuple[Served, threading.Semaphore]) -> None:
    server, _ = served
    began = time.monotonic()
    r = httpx.get(f"{server.url}/slow", timeout=BOUND)
    assert r.status_code == 504
    assert r.json()["outcome"] == "timeout"
    assert time.monotonic() - began < BOUND


def test_metrics_are_scraped_and_parse(served: tuple[Served, threading.Semaphore]) -> None:
    server, _ = served
    assert httpx.get(f"{server.url}/slow", timeout=BOUND).status_code == 504
    text = httpx.get(f"{server.url}/metrics/", timeout=BOUND).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["envelope_requests"].samples if s.labels.get("route") == "/slow"]
    assert any(s.labels["outcome"] == "timeout" and s.value >= 1 for s in requests), requests
    assert "envelope_request_duration_seconds" in families
