"""When each generated frame leaves: spaced by its input pts, never behind (docs/ARCHITECTURE.md §8).

The engine returns frames in bursts (a chunk of 4 at once). The pacer releases them at the
spacing of their input pts, from an anchor (wall time, pts) set when the stream starts. It never
lets a backlog grow: a frame whose successor is already due is dropped as late, and when a new
burst arrives far off the schedule (early: latency could shrink; late: the engine slowed) the
schedule is re-anchored on that burst. The pacer is pure logic with the clock passed in, so it
can be tested without WebRTC.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, Optional, TypeVar

T = TypeVar("T")

CLOCK_RATE = 90_000  # RTP video clock; input pts arrive in this time base


class PtsPacer(Generic[T]):
    def __init__(
        self,
        clock_rate: int = CLOCK_RATE,
        max_lead_s: float = 0.5,
        max_late_s: float = 0.25,
        max_queue: int = 16,
    ) -> None:
        """max_lead_s: a burst whose first frame would wait longer than this re-anchors (latency
        comes down, the older frames still queued are dropped); max_late_s: a burst arriving
        later than this re-anchors (its frames are shown, not dropped); max_queue: hard cap."""
        self._rate = float(clock_rate)
        self._max_lead = max_lead_s
        self._max_late = max_late_s
        self._max_queue = max_queue
        self._queue: deque[tuple[int, T]] = deque()
        self._anchor: Optional[tuple[float, int]] = None  # (wall seconds, pts)
        self._last_pts: Optional[int] = None  # newest pts accepted
        self.dropped_late = 0
        self.dropped_out_of_order = 0
        self.resyncs = 0

    def __len__(self) -> int:
        return len(self._queue)

    def due(self, pts: int) -> float:
        assert self._anchor is not None
        wall, base = self._anchor
        return wall + (pts - base) / self._rate

    def push(self, frames: list[tuple[int, T]], now: float) -> None:
        """Queue one burst of (pts, item), oldest first."""
        fresh = []
        for pts, item in frames:
            if self._last_pts is not None and pts <= self._last_pts:
                self.dropped_out_of_order += 1
                continue
            self._last_pts = pts
            fresh.append((pts, item))
        if not fresh:
            return
        first = fresh[0][0]
        if self._anchor is None:
            self._anchor = (now, first)
        else:
            lead = self.due(first) - now
            if lead > self._max_lead or lead < -self._max_late:
                self._anchor = (now, first)
                self.resyncs += 1
        self._queue.extend(fresh)
        while len(self._queue) > self._max_queue:
            self._queue.popleft()
            self.dropped_late += 1

    def poll(self, now: float) -> tuple[Optional[tuple[int, T]], float]:
        """((pts, item), 0) to send now, or (None, seconds to wait); inf when nothing is queued."""
        while self._queue:
            pts, item = self._queue[0]
            due = self.due(pts)
            if due > now:
                return None, due - now
            if len(self._queue) > 1 and self.due(self._queue[1][0]) <= now:
                self._queue.popleft()  # its successor is due already: showing it would lag
                self.dropped_late += 1
                continue
            self._queue.popleft()
            return (pts, item), 0.0
        return None, math.inf

    def clear(self) -> int:
        n = len(self._queue)
        self._queue.clear()
        return n
