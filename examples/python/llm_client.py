#!/usr/bin/env python3
"""Envelope around an LLM-like HTTP client: retries with backoff and jitter, `Retry-After` honoured, a breaker,
a deadline, a fallback, and a streamed answer — against a local fake model server on 127.0.0.1 that fails, throttles
and streams (started by this script, bounded, stops by itself).

    python examples/python/llm_client.py      # with the envelope package installed (see docs/python.md)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

import envelope

# --- a fake model server: the first call of each prompt fails, the second is throttled, the third answers ------------

seen: dict[str, int] = {}
fake = FastAPI()


@fake.post("/v1/complete")
async def complete(body: dict[str, Any]) -> Response:
    prompt = str(body.get("prompt", ""))
    seen[prompt] = seen.get(prompt, 0) + 1
    if seen[prompt] == 1:
        return Response(status_code=503, content="overloaded")
    if seen[prompt] == 2:
        return Response(status_code=429, headers={"retry-after": "0.05"}, content="slow down")

    async def tokens() -> AsyncIterator[bytes]:
        for word in f"an answer to {prompt}".split():
            yield f"data: {word}\n\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(tokens(), media_type="text/event-stream")


def serve() -> tuple[uvicorn.Server, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    return server, sock.getsockname()[1]


# --- the client: its HTTP errors carry the outcome and the server's Retry-After ---------------------------------------


class ModelError(Exception):
    """An answer that is not a success, with what the envelope needs to know about it."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"model answered {status}")
        self.status = status
        self.retry_after = retry_after  # honoured by the retry policy (capped by its max delay)


def classify(exc: BaseException) -> str:
    if isinstance(exc, ModelError):
        if exc.status == 429:
            return "rate_limited"
        return "upstream_5xx" if exc.status >= 500 else "upstream_4xx"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    return envelope.classify_exception(exc)


llm = envelope.Envelope(
    "llm",
    deadline=10.0,
    attempt_timeout=5.0,
    retry=envelope.Retry(max_attempts=4, base=0.02, max_delay=0.5),
    breaker=envelope.breaker("llm", window=20, min_calls=10),
    fallback=lambda client, url, prompt: f"(cached) an earlier answer to {prompt}",
    classify=classify,
)


@llm
async def ask(client: httpx.AsyncClient, url: str, prompt: str) -> str:
    """One completion, streamed token by token; an error answer raises `ModelError`."""
    async with client.stream("POST", url, json={"prompt": prompt}) as response:
        if response.status_code != 200:
            after = response.headers.get("retry-after")
            raise ModelError(response.status_code, float(after) if after else None)
        words = [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]
        return " ".join(words)


async def main() -> list[str]:
    server, port = serve()
    url = f"http://127.0.0.1:{port}/v1/complete"
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            answers = [await ask(client, url, prompt) for prompt in ("hello", "retries")]
    finally:
        server.should_exit = True
    for prompt, answer in zip(("hello", "retries"), answers):
        print(f"{prompt!r}: {answer!r} after {seen[prompt]} attempts (503, then 429 with Retry-After, then the answer)")
    return answers


if __name__ == "__main__":
    asyncio.run(main())
