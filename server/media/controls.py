"""A session's live controls (data channel and PATCH): how many it may send, what is refused, and how
updates not yet sent to the engine are coalesced (docs/RELIABILITY.md, "Limits")."""

from __future__ import annotations

import time
from typing import Callable, Optional

from interface.controls import StreamUpdate


class ControlRejected(Exception):
    """A live control that the session's limits refuse (too many per second, prompt too long)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RateLimiter:
    """A token bucket: `rate` events per second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, float(burst), clock
        self._tokens = float(burst)
        self._at = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def merge_updates(old: Optional[StreamUpdate], new: StreamUpdate) -> StreamUpdate:
    """Coalesce updates not yet sent: later fields win, a reset sticks."""
    if old is None:
        return new
    merged = old.model_dump(exclude_none=True)
    merged.update(new.model_dump(exclude_none=True))
    merged["reset"] = old.reset or new.reset
    return StreamUpdate.model_validate(merged)
