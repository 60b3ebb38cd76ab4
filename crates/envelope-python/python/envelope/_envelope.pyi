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
