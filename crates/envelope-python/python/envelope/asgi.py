"""`EnvelopeMiddleware`: what the sidecar does at the edge, inside an ASGI application (Starlette, FastAPI, any).

In this order, for each HTTP request:
1. **Request id**: the client's `X-Request-ID` if valid (the sidecar's rules, from the engine), else a new one;
   echoed on the response, set in `envelope.asgi.REQUEST_ID` (a contextvar) while the request is handled, and put
   on every log record the application writes by `RequestIdFilter`.
2. **Timeout → 504**: the handler is cancelled when `timeout` seconds have passed (the whole response, body
   included, as the sidecar's route timeout); if nothing was sent yet, the client gets a 504 problem document.
3. **Errors → problem+json**: an exception escaping the application is logged in full and answered with a 500
   problem document (RFC 9457, the sidecar's) that says nothing of its internals.
4. **Load shedding → 429 by tier** (with `max_concurrent`, or `adaptive=True` for the engine's adaptive limit):
   a request the shedder refuses is answered 429 with `Retry-After` (spread, as the sidecar's) before the
   application sees it; non-critical paths are shed first and critical ones last, by the sidecar's rule
   (`/auth*`, `/login*`, `/payment*`, `/checkout*` critical; `/analytics*`, `/report*`, `/export*` non-critical).
5. **SLO state per route template**, in the route's tier by the same path rule (the sidecar's tier objectives:
   critical 99.99 % / p95 100 ms, default 99.9 % / 200 ms, non-critical 99 % / 500 ms): `envelope.metrics.
   slo_state()` and the `envelope_slo_*` gauges.
6. **RED metrics per route template**: requests by outcome and their durations, under the sidecar's names, by the
   route's *template* (FastAPI's and Starlette's route path, e.g. `/items/{item_id}`; `unmatched` when no route
   matched — never the raw path), exported by `envelope.metrics`.

Responses pass through as they are sent: a streamed body (server-sent events) is not held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from . import _envelope, metrics
from ._envelope_policy import _within
from ._errors import DeadlineExceeded, Overloaded

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID: ContextVar[str | None] = ContextVar("envelope_request_id", default=None)
"""The request id of the request being handled (None outside one)."""

logger = logging.getLogger("envelope.asgi")
access_logger = logging.getLogger("envelope.access")


class RequestIdFilter(logging.Filter):
    """Puts the request id of the request being handled on each record, as `record.request_id` (`-` outside a
    request). Add it to the application's handlers (`handler.addFilter(RequestIdFilter())`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def _outcome_of_status(status: int) -> str:
    """The outcome of an answer the application gave, as the sidecar classifies an upstream's."""
    if status >= 500:
        return "upstream_5xx"
    if status == 429:
        return "rate_limited"
    if status >= 400:
        return "upstream_4xx"
    return "ok"


class EnvelopeMiddleware:
    """The edge policies for an ASGI application; see the module docs.

    `name` names the application in logs. `timeout` (seconds, `None` for none) bounds each request. With
    `access_log`, one record per request goes to the `envelope.access` logger, at INFO, carrying the sidecar's
    access-log fields (render them with `envelope.logs.JsonFormatter`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        name: str = "app",
        timeout: float | None = 30.0,
        max_concurrent: int | None = None,
        adaptive: bool = False,
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.name = name
        self.timeout = timeout
        self.access_log = access_log
        shedding = adaptive or max_concurrent is not None
        self.shedder = _envelope.Shedder(name, None if adaptive else max_concurrent) if shedding else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope.get("headers", ()) if k.lower() == b"x-request-id"), None)
        request_id, _kept = _envelope.request_id(incoming)
        token = REQUEST_ID.set(request_id)
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        began = time.perf_counter()
        outcome = "ok"
        permit: _envelope.ShedPermit | None = None
        try:
            if self.shedder is not None:
                try:
                    permit = self.shedder.acquire(_envelope.priority_by_path(scope.get("path", "/")))
                except Overloaded:
                    outcome = "shed"
                    await self._problem(send_with_id, "shed", "the service is overloaded", request_id, None)
                    return
            if self.timeout is None:
                await self.app(scope, receive, send_with_id)
            else:
                await _within(self.timeout, self.app(scope, receive, send_with_id))
        except DeadlineExceeded:
            outcome = "timeout"
            if status is None:
                detail = f"no answer within {self.timeout:g} s"
                await self._problem(send_with_id, "timeout", detail, request_id, None)
        except Exception:
            outcome = "failure"
            logger.exception("%s: unhandled error", self.name)
            if status is None:
                await self._problem(send_with_id, "failure", "the service failed to answer", request_id, 500)
        else:
            outcome = _outcome_of_status(status or 500)
        finally:
            if permit is not None:
                permit.record(outcome)
            elapsed = time.perf_counter() - began
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.route_meter(route).record(outcome, elapsed)
            metrics.route_slo(route).record(outcome, elapsed)
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                access = {
                    "request_id": request_id,
                    "listener": self.name,
                    "route": route,
                    "method": scope.get("method"),
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "outcome": outcome,
                }
                access_logger.info("%s %s %s", scope.get("method"), route, status, extra={"envelope_access": access})
            REQUEST_ID.reset(token)

    @staticmethod
    async def _problem(send: Send, outcome: str, detail: str, request_id: str, status: int | None) -> None:
        code, headers, body = _envelope.problem(outcome, detail, request_id, None, status)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
