"""SLO-aware batch scheduler: how many sessions' chunks go into one forward (docs/PARALLEL.md).

A forward of B sessions costs a latency L(B) that grows with B (measured: from rank 0 issuing it to
the last rank's decoded frames coming back), while it yields B chunks, so throughput rises with B
until the hardware's knee. A frame's latency is the wait for its chunk to fill (T frames at the target
fps), the stream batch's lag (each extra denoising step holds a chunk for one more chunk interval),
and L(B). The rule: take the largest B whose predicted L(B) still fits what the deadline leaves,

    L(B) <= deadline - (1 + lag) * T / fps,

predicting L(B) from measurements: the running mean where B was measured, else a line through the
measured sizes (least squares), else, from one measured size b0, L(b0) * B / b0 (no batching gain: a
cautious guess that only lets B grow when even that fits). B never exceeds the sessions ready to run.

Sessions seldom come due at the same instant: each sends a chunk when its camera has filled one. So a
forward may wait for another session's chunk, but only within what the same budget leaves once the
bigger batch's latency is paid, `wait_bound_ms` (docs/ARCHITECTURE.md §5 says when the core waits).
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("engine.parallel.slo")


class BatchScheduler:
    def __init__(self, max_batch: int, target_fps: float, deadline_ms: float, frames_per_chunk: int = 4,
                 alpha: float = 0.3) -> None:
        self.max_batch, self.target_fps, self.deadline_ms = max_batch, target_fps, deadline_ms
        self.frames_per_chunk, self.alpha = frames_per_chunk, alpha
        self.latency: dict[int, float] = {}  # running mean of L(B) per batch size B
        self.count: dict[int, int] = {}
        self.last: dict = {}
        self.waits, self.wait_ms, self.joined = 0, 0.0, 0  # forwards that waited for others; their waits

    def observe(self, batch: int, latency_ms: float) -> None:
        if batch in self.latency:
            self.latency[batch] += self.alpha * (latency_ms - self.latency[batch])
        else:
            self.latency[batch] = latency_ms
        self.count[batch] = self.count.get(batch, 0) + 1

    def budget_ms(self, lag_chunks: int) -> float:
        chunk_ms = 1000.0 * self.frames_per_chunk / self.target_fps
        return self.deadline_ms - (1 + lag_chunks) * chunk_ms

    def predict(self, batch: int) -> Optional[float]:
        if batch in self.latency:
            return self.latency[batch]
        sizes = sorted(self.latency)
        if not sizes:
            return None
        if len(sizes) == 1:
            b0 = sizes[0]
            return self.latency[b0] * batch / b0
        n = len(sizes)
        mx = sum(sizes) / n
        my = sum(self.latency[b] for b in sizes) / n
        sxx = sum((b - mx) ** 2 for b in sizes)
        slope = sum((b - mx) * (self.latency[b] - my) for b in sizes) / sxx
        slope = max(slope, 0.0)  # latency never falls with more rows
        return my + slope * (batch - mx)

    def wait_bound_ms(self, batch: int, lag_chunks: int) -> float:
        """How long a forward of `batch` sessions may wait for one more session's chunk: the budget left
        after the predicted latency of `batch + 1`; 0 while nothing has been measured or at the limit."""
        if batch >= self.max_batch:
            return 0.0
        p = self.predict(batch + 1)
        return 0.0 if p is None else max(0.0, self.budget_ms(lag_chunks) - p)

    def waited(self, ms: float, joined: int) -> None:
        """A forward that waited `ms` for other sessions, which `joined` more sessions' chunks then joined."""
        self.waits += 1
        self.wait_ms += ms
        self.joined += joined

    def choose(self, ready: int, lag_chunks: int) -> int:
        """Sessions to put in the next forward (1 <= B <= ready)."""
        limit = max(1, min(self.max_batch, ready))
        budget = self.budget_ms(lag_chunks)
        chosen = 1
        for b in range(limit, 0, -1):
            p = self.predict(b)
            if p is not None and p <= budget:
                chosen = b
                break
        self.last = dict(ready=ready, chosen=chosen, budget_ms=round(budget, 3), lag_chunks=lag_chunks,
                         predicted_ms=None if self.predict(chosen) is None else round(self.predict(chosen), 3))
        return chosen

    def stats(self) -> dict:
        return dict(
            max_batch=self.max_batch, target_fps=self.target_fps, deadline_ms=self.deadline_ms,
            latency_ms={b: round(v, 3) for b, v in sorted(self.latency.items())},
            forwards={b: c for b, c in sorted(self.count.items())}, last=self.last,
            waits=self.waits, wait_ms=round(self.wait_ms, 3), joined=self.joined,
        )
