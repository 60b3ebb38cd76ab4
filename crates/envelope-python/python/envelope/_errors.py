"""The exceptions Envelope raises instead of making a call: all are `Rejected`, each names its outcome."""

from __future__ import annotations


class Rejected(Exception):
    """A call Envelope refused to make (or to wait for). `outcome` is the engine's outcome name."""

    outcome: str = "rejected"


class CircuitOpen(Rejected):
    """The circuit breaker is open (or half-open with every probe taken): the call was not made.

    `retry_after` is the time in seconds until the breaker admits probes again, when known; `state` is the
    breaker's state (`open`, `half_open` or `forced_open`).
    """

    outcome = "circuit_open"

    def __init__(self, message: str, retry_after: float | None = None, state: str = "open") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.state = state
