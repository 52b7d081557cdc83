"""Pauses of a process's Python thread that hold up every session at once: garbage collections and,
in the server, an event loop that could not run its callbacks in time. Each long one is logged and
counted, so that a latency tail can be traced to it (docs/RELIABILITY.md, "Pauses").

`freeze_startup_objects()` moves what exists once a process is ready (modules, the model, the app)
out of the collector's reach: a full collection then walks only what sessions allocate since.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)


class GcPauses:
    """Times every collection through `gc.callbacks`; a collection of at least `log_ms` is logged."""

    def __init__(self, log_ms: float = 20.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.log_ms, self._clock = log_ms, clock
        self._started: Optional[float] = None
        self.collections = [0, 0, 0]  # per generation
        self.long = 0  # collections of at least log_ms
        self.max_ms = 0.0

    def install(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:
            return
        ms = 1000.0 * (self._clock() - self._started)
        self._started = None
        generation = int(info.get("generation", 0))
        self.collections[generation] += 1
        self.max_ms = max(self.max_ms, ms)
        if ms >= self.log_ms:
            self.long += 1
            log.warning("garbage collection of generation %d held the process for %.0f ms (%d objects collected)",
                        generation, ms, int(info.get("collected", 0)))


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now to the permanent generation; returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class LoopLag:
    """How late an event loop runs a callback it scheduled `interval_s` ahead: a lag of `log_ms` or more
    is logged (something held the loop: a slow callback, a collection, a blocking call)."""

    def __init__(self, interval_s: float = 0.05, log_ms: float = 50.0) -> None:
        self.interval_s, self.log_ms = interval_s, log_ms
        self.long = 0
        self.max_ms = 0.0
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(1000.0 * (loop.time() - due))

    def observe(self, lag_ms: float) -> None:
        self.max_ms = max(self.max_ms, lag_ms)
        if lag_ms >= self.log_ms:
            self.long += 1
            log.warning("the event loop ran %.0f ms late (every session waited)", lag_ms)
