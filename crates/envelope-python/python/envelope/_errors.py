"""The exceptions Envelope raises instead of making a call: all are `Rejected`, each names its outcome."""

from __future__ import annotations


class Rejected(Exception):
    """A call Envelope refused to make (or to wait for any longer). `outcome` is the engine's outcome name;
    `retry_after` the time in seconds after which trying again may succeed, when the engine knows it.

    Raised as `Rejected(message, retry_after, state)`; the attributes read the arguments, so that raising one costs
    no Python-level `__init__` (a rejection is the fast path of an open breaker).
    """

    outcome: str = "rejected"

    @property
    def retry_after(self) -> float | None:
        value = self.args[1] if len(self.args) > 1 else None
        return float(value) if value is not None else None

    @property
    def state(self) -> str | None:
        value = self.args[2] if len(self.args) > 2 else None
        return str(value) if value is not None else None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.outcome


class CircuitOpen(Rejected):
    """The circuit breaker is open (or half-open with every probe taken): the call was not made. `state` is the
    breaker's state (`open`, `half_open` or `forced_open`)."""

    outcome = "circuit_open"


class BulkheadFull(Rejected):
    """Too many calls in flight to the dependency, and no room (or no time left) in the bulkhead's queue."""

    outcome = "bulkhead_full"


class RateLimited(Rejected):
    """The local rate limit is reached; `retry_after` says when the next turn is free."""

    outcome = "local_rate_limited"


class DeadlineExceeded(Rejected):
    """The call's deadline passed (an attempt was cut off, or no attempt could finish in the time left)."""

    outcome = "timeout"


class Overloaded(Rejected):
    """Shed: the envelope is at its concurrency limit for calls of this priority."""

    outcome = "shed"
