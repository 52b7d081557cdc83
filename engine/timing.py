"""Stage clocks that never synchronise the host with the GPU.

On CUDA a lap is a pair of events recorded on the compute stream and read once both have completed
(`Event.query()` does not block); on CPU it is the wall clock. A forward's record is complete when all
its laps are; records are handed out in completion order and travel to rank 0 on later messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch


class Lap:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        self._ms: Optional[float] = None
        self._extra = 0.0  # host time added by add()

    def stop(self) -> "Lap":
        if self.cuda:
            self._end.record()
        else:
            self._ms = 1000.0 * (time.perf_counter() - self._t0)
        return self

    def add(self, ms: float) -> None:
        """Count extra host time (a test hook's sleep) in this lap."""
        self._extra += ms

    def wait(self) -> "Lap":
        """Block until the lap's end has run on the device (no-op on CPU)."""
        if self.cuda:
            self._end.synchronize()
        return self

    def ms(self) -> Optional[float]:
        if self._ms is None and self.cuda and self._end.query():
            self._ms = self._start.elapsed_time(self._end)
        return None if self._ms is None else self._ms + self._extra


@dataclass
class ForwardTimes:
    """One rank's time for one forward: its blocks (dit) and the rest of its share (VAE, embed, head)."""

    fid: int
    dit: list[Lap] = field(default_factory=list)
    other: list[Lap] = field(default_factory=list)
    graphed: bool = False  # the blocks replayed a CUDA graph

    def result(self) -> Optional[tuple[int, float, float, bool]]:
        d = [lap.ms() for lap in self.dit]
        o = [lap.ms() for lap in self.other]
        if any(v is None for v in d + o):
            return None
        return self.fid, float(sum(d)), float(sum(o)), self.graphed  # type: ignore[arg-type]


class StageClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._open: list[ForwardTimes] = []

    def lap(self) -> Lap:
        return Lap(self.device)

    def add(self, times: ForwardTimes) -> None:
        self._open.append(times)

    def harvest(self) -> list[tuple[int, float, float, bool]]:
        """Completed (fid, dit_ms, other_ms, graphed) records, oldest first; later ones wait for earlier ones."""
        out = []
        while self._open:
            r = self._open[0].result()
            if r is None:
                break
            out.append(r)
            self._open.pop(0)
        return out
