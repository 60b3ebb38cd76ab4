"""Envelope for Python: the resilience engine of the `envelope` sidecar, in process.

Every decision (the breaker's state machine and window, and as the package grows, retries, budgets, bulkheads,
rate limits, shedding and SLOs) is made by the Rust engine; this package maps Python calls onto it, for functions
and coroutines alike. See docs/python.md.
"""

from ._breaker import CircuitBreaker, breaker, breakers
from ._classify import classify_exception
from ._envelope import BREAKER_STATES, OUTCOMES
from ._envelope_policy import Bulkhead, Envelope, Event, RateLimit, Retry, resilient_call
from ._errors import BulkheadFull, CircuitOpen, DeadlineExceeded, Overloaded, RateLimited, Rejected
from ._single import bulkhead, fallback, rate_limit, retry, timeout
from . import logs, metrics

__all__ = [
    "BREAKER_STATES",
    "OUTCOMES",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpen",
    "DeadlineExceeded",
    "Envelope",
    "Event",
    "Overloaded",
    "RateLimit",
    "RateLimited",
    "Rejected",
    "Retry",
    "breaker",
    "breakers",
    "bulkhead",
    "classify_exception",
    "fallback",
    "rate_limit",
    "resilient_call",
    "retry",
    "timeout",
]
