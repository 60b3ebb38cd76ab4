"""How a Python exception maps onto Envelope's outcomes (the same taxonomy as the sidecar's)."""

from __future__ import annotations

import asyncio

from ._errors import Rejected

# Checked in order: the first class an exception is an instance of gives its outcome.
_DEFAULTS: tuple[tuple[type[BaseException], str], ...] = (
    (TimeoutError, "timeout"),
    (asyncio.TimeoutError, "timeout"),  # a distinct class before Python 3.11
    (ConnectionRefusedError, "connect_error"),
    (ConnectionError, "upstream_reset"),
)


def classify_exception(exc: BaseException) -> str:
    """The outcome an exception stands for: a rejection's own outcome, `timeout` for timeouts, `connect_error`
    when a connection was refused, `upstream_reset` for other broken connections, else `failure`."""
    if isinstance(exc, Rejected):
        return exc.outcome
    for cls, outcome in _DEFAULTS:
        if isinstance(exc, cls):
            return outcome
    return "failure"
