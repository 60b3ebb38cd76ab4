"""Type stubs of the extension module `envelope._envelope` (the Rust engine)."""

from typing import Any

OUTCOMES: list[str]
BREAKER_STATES: list[str]

class Breaker:
    def __init__(
        self,
        name: str,
        *,
        window: int | None = None,
        window_seconds: int | None = None,
        min_calls: int | None = None,
        failure_rate: float | None = None,
        slow_call: tuple[float, float] | None = None,
        open_for: float | None = None,
        max_open_for: float | None = None,
        half_open_calls: int | None = None,
        max_half_open_wait: float | None = None,
    ) -> None: ...
    def acquire(self) -> BreakerPermit: ...
    @property
    def name(self) -> str: ...
    @property
    def state(self) -> str: ...
    def metrics(self) -> dict[str, Any]: ...
    def force_open(self) -> None: ...
    def force_closed(self) -> None: ...
    def reset(self) -> None: ...

class BreakerPermit:
    def record(self, outcome_name: str) -> None: ...
    def release(self) -> None: ...

class Envelope:
    def __init__(
        self,
        name: str,
        *,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
        breaker: Breaker | None = None,
        max_attempts: int | None = None,
        backoff: tuple[str, float, float, str] | None = None,
        retry_on: list[str] | None = None,
        budget: tuple[float, int, float] | None = None,
        bulkhead: tuple[int, int, float] | None = None,
        rate_limit: tuple[int, float, int] | None = None,
        fallback_on: list[str] | None = None,
    ) -> None: ...
    def steps(self) -> Steps: ...

class Steps:
    def admit(self, blocking: bool = False) -> StepAttempt: ...
    def rejected(self, outcome_name: str, retry_after: float | None) -> float | None: ...
    def after(
        self, attempt: StepAttempt, outcome_name: str, retry_after: float | None = None, may_retry: bool = True
    ) -> float | None: ...
    def succeeded(self, attempt: StepAttempt) -> None: ...
    def fallback_applies(self, outcome_name: str) -> bool: ...
    def time_left(self) -> float | None: ...
    def finish(self, outcome_name: str) -> None: ...

class StepAttempt:
    @property
    def limit(self) -> float | None: ...
