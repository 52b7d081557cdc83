"""When each generated frame leaves: spaced by its input pts, never behind (docs/ARCHITECTURE.md §8).

The engine returns frames in bursts (a chunk of 4 at once). The pacer releases them at the
spacing of their input pts, from an anchor (wall time, pts) set when the stream starts: a fresh
stream's first frame leaves at once. It never lets a backlog grow: a frame whose successor is
already due is dropped as late.

The playout delay adapts to measured jitter. Each burst's arrival is noted as its first frame's
arrival time less its pts in seconds (a number the anchor does not change). Over a recent window, a
high percentile of these (`jitter_percentile`; 100: the latest of them) plus a small floor is the
delay at which that share of recent bursts would have come in time: the schedule moves there, later
at once, earlier by at most 10 ms and half a frame interval per burst (no queued frame goes stale for
it, and the output's jitter stays small). A burst later than that is shown as it comes (its frames
whose successor is due already are dropped as late). A burst far off the schedule (a pts jump, a
stall) re-anchors it at once. The pacer is pure logic with the clock passed in, so it can be tested
without WebRTC.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, Optional, TypeVar

import numpy as np

T = TypeVar("T")

CLOCK_RATE = 90_000  # RTP video clock; input pts arrive in this time base


class PtsPacer(Generic[T]):
    def __init__(
        self,
        clock_rate: int = CLOCK_RATE,
        max_lead_s: float = 0.5,
        max_late_s: float = 0.25,
        max_queue: int = 16,
        window_s: float = 2.0,
        margin_floor_s: float = 0.004,
        jitter_percentile: float = 100.0,
        max_step_s: float = 0.01,
        adaptive: bool = True,
    ) -> None:
        """max_lead_s: a burst whose first frame would wait longer than this re-anchors (latency
        comes down, the older frames still queued are dropped); max_late_s: a burst arriving
        later than this re-anchors (its frames are shown, not dropped); max_queue: hard cap.
        window_s, margin_floor_s, jitter_percentile: the adaptive delay's window of recent bursts, the
        floor added, and the share of recent bursts (percentile) the delay lets come in time; max_step_s:
        the most the delay comes down per burst (also at most half a frame interval). adaptive=False:
        the schedule moves only when a burst is past max_lead_s or max_late_s."""
        self._rate = float(clock_rate)
        self._max_lead = max_lead_s
        self._max_late = max_late_s
        self._max_queue = max_queue
        self._window_s = window_s
        self._margin_floor = margin_floor_s
        self._jitter_percentile = jitter_percentile
        self._max_step = max_step_s
        self._adaptive = adaptive
        self._queue: deque[tuple[int, T]] = deque()
        self._anchor: Optional[tuple[float, int]] = None  # (wall seconds, pts)
        self._last_pts: Optional[int] = None  # newest pts accepted
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=256)  # per burst: (now, now - pts s)
        self._frame_s = 1 / 30  # the input's frame interval, from the latest burst of several frames
        self.dropped_late = 0
        self.dropped_out_of_order = 0
        self.resyncs = 0
        self.delay_raised = 0  # bursts that came late and moved the schedule later
        self.delay_lowered_s = 0.0  # how far the schedule moved earlier, in all

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
        if len(fresh) > 1:
            self._frame_s = (fresh[1][0] - first) / self._rate
        if self._anchor is None:
            self._anchor = (now, first)  # the first frame leaves at once
        else:
            lead = self.due(first) - now
            if lead > self._max_lead or lead < -self._max_late:
                self._anchor = (now, first)
                self._arrivals.clear()  # a new regime: what came before says nothing about it
                self.resyncs += 1
            elif self._adaptive:
                self._adapt(now, first, lead)
        self._queue.extend(fresh)
        while len(self._queue) > self._max_queue:
            self._queue.popleft()
            self.dropped_late += 1

    def target_offset(self) -> Optional[float]:
        """The schedule (as `_offset`) at which the chosen share of recent bursts came in time, plus the
        floor; None before any burst was noted."""
        if not self._arrivals:
            return None
        offsets = np.fromiter((a for _, a in self._arrivals), dtype=np.float64, count=len(self._arrivals))
        return float(np.percentile(offsets, self._jitter_percentile)) + self._margin_floor

    def _adapt(self, now: float, first: int, lead: float) -> None:
        self._arrivals.append((now, now - first / self._rate))
        while self._arrivals[0][0] < now - self._window_s:
            self._arrivals.popleft()
        target = self.target_offset()
        assert target is not None
        change = target - self._offset()
        if change > 0.0005:  # bursts come later than the schedule allows for: later from now on
            self._shift(change)
            self.delay_raised += 1
        elif change < -0.001 and len(self._arrivals) >= 3:
            step = min(-change, self._max_step, 0.5 * self._frame_s)
            self._shift(-step)
            self.delay_lowered_s += step

    def _offset(self) -> float:
        """The schedule as one number: a frame is due at this plus its pts in seconds."""
        assert self._anchor is not None
        wall, base = self._anchor
        return wall - base / self._rate

    def _shift(self, seconds: float) -> None:
        assert self._anchor is not None
        wall, base = self._anchor
        self._anchor = (wall + seconds, base)

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
