"""How a Python exception maps onto Envelope's outcomes (the same taxonomy as the sidecar's)."""

from __future__ import annotations

import asyncio
import errno
import socket

from ._errors import Rejected

# OS errors that mean the dependency could not be reached (beside ConnectionRefusedError): DNS failures and
# unreachable networks or hosts.
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}

# Checked in order: the first class an exception is an instance of gives its outcome.
_DEFAULTS: tuple[tuple[type[BaseException], str], ...] = (
    (TimeoutError, "timeout"),
    (asyncio.TimeoutError, "timeout"),  # a distinct class before Python 3.11
    (ConnectionRefusedError, "connect_error"),
    (ConnectionError, "upstream_reset"),
)


def classify_exception(exc: BaseException) -> str:
    """The outcome an exception stands for: a rejection's own outcome, `timeout` for timeouts, `connect_error`
    when a connection was refused or the host could not be reached (DNS failures, unreachable networks),
    `upstream_reset` for other broken connections, else `failure` (other `OSError`s, such as a missing file,
    are the caller's own failures)."""
    if isinstance(exc, Rejected):
        return exc.outcome
    for cls, outcome in _DEFAULTS:
        if isinstance(exc, cls):
            return outcome
    if isinstance(exc, socket.gaierror) or (isinstance(exc, OSError) and exc.errno in _UNREACHABLE):
        return "connect_error"
    return "failure"
