"""One streaming step `y = fn(x, cache)` replayed from a CUDA graph once its shapes stop changing.

A streaming VAE call reads its history from a list of tensors and replaces the list's entries with
the new history. In the steady state the input and every entry keep their shapes, so the call can be
captured: the graph reads the history from static tensors and, as its last kernels, copies the new
history back into those whose memory it does not already write in place. A call then costs one graph
launch plus the input copy, instead of the host's time to queue a few hundred convolutions, norms and
adds, which is what kept the GPU waiting (docs/BENCHMARKS.md, second speed round). A step in parts (the
decode: a chunk's frame 0, then frames 1-3) is a graph per part, replayed as the caller takes them.

Each stream's step has its own memory pool (the step's intermediates: about what one eager call peaks
at; the parts of a step share one).
Sharing one pool between the streams of a device would be sound in principle (a replay writes every
intermediate it reads and keeps nothing there past its return), but torch 2.11 asserted in its caching
allocator once graphs on a shared pool had been freed and new ones captured into it (2×H200, ranks
opening and closing sessions).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)

Cache = list[Optional[torch.Tensor]]


def capture_error_mode() -> str:
    """How strictly a capture forbids other CUDA calls: "global" in one process; "thread_local" in a
    pipeline rank, where torch's NCCL watchdog thread queries the events of communication work that
    was queued before the capture (on another stream). In global mode such a query can invalidate the
    capture, and a rank whose capture failed runs eagerly from then on."""
    import torch.distributed as dist

    return "thread_local" if dist.is_available() and dist.is_initialized() else "global"


def capture_graph(fn: Callable[[], Any], device: torch.device, pool: Optional[tuple] = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture fn's kernels as a CUDA graph (not run). Unlike `with torch.cuda.graph(...)` this neither
    synchronises the device nor empties the allocator's cache. A capture happens while other sessions'
    work is queued (a session joins, a new set of sessions shares a forward, a block moves): a
    device-wide wait would stall them all, and an emptied cache would send their next allocations back
    to cudaMalloc. `pool`: another graph's memory pool (`graph.pool()`) to capture into."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool, capture_error_mode=capture_error_mode())
        try:
            out = fn()
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph, out


StepFn = Callable[[torch.Tensor, Cache], torch.Tensor]
PartsFn = Callable[[torch.Tensor, Cache], Iterator[torch.Tensor]]


def _signature(x: torch.Tensor, cache: Cache) -> Optional[tuple]:
    """What a captured step depends on. The history's strides are not part of it: a capture reads and
    writes the history tensors it finds, whatever their layout."""
    if any(c is None for c in cache):
        return None
    return (x.shape, x.stride(), x.dtype, tuple((c.shape, c.dtype) for c in cache))  # type: ignore[union-attr]


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class StepGraph:
    """Runs one stream's step eagerly until two calls in a row have the same shapes, then captures it
    and replays it for as long as the shapes (and the history tensors themselves) stay the same.

    A step may come in parts (`parts`: a generator that yields each part's output): each part is a graph
    of its own, all in one memory pool, replayed one after another as the caller takes the parts, so
    the caller can queue work of its own between them (a frame's copy to the host). What the parts hand
    each other stays in the pool."""

    def __init__(self, name: str, history: slice = slice(None)) -> None:
        """`history`: the entries of the stream's cache this step reads and writes (all by default); a
        step that keeps its history in some of them leaves the others to calls outside the graph."""
        self.name = name
        self.history = history
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._sig: Optional[tuple] = None
        self._x: Optional[torch.Tensor] = None
        self._ys: list[torch.Tensor] = []
        self._history: Cache = []
        self.failed = False  # capture failed once: this stream stays eager
        self.replays = 0

    def __call__(self, fn: StepFn, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        def one(x: torch.Tensor, cache: Cache) -> Iterator[torch.Tensor]:
            yield fn(x, cache)

        return list(self.parts(one, x, cache, count=1))[0]

    def parts(self, fn: PartsFn, x: torch.Tensor, cache: Cache, count: int) -> Iterator[torch.Tensor]:
        """fn's `count` parts, from graphs once captured. Take them all: the stream's history is
        whole only after the last."""
        sig = _signature(x, cache[self.history])
        if self._graphs and sig == self._sig and self._owns(cache):
            self._x.copy_(x)  # type: ignore[union-attr]
            yield from self._replay()
            return
        if self.failed or sig is None or sig != self._sig:
            # warm-up (or the shapes moved): eager; capture once a call leaves the shapes as it found them
            self._graphs = []
            yield from fn(x, cache)  # type: ignore[misc]
            self._sig = sig if sig is not None and sig == _signature(x, cache[self.history]) else None
            return
        yield from self._capture(fn, x, cache, count)

    def _replay(self) -> Iterator[torch.Tensor]:
        """Each part's graph in turn, its output as a new tensor (the static one is overwritten next time)."""
        for graph, y in zip(self._graphs, self._ys):
            graph.replay()
            yield y.clone()
        self.replays += 1

    def _owns(self, cache: Cache) -> bool:
        mine = cache[self.history]
        return len(cache) == len(self._history) and all(a is b for a, b in zip(mine, self._history[self.history]))

    def _capture(self, fn: PartsFn, x: torch.Tensor, cache: Cache, count: int) -> Iterator[torch.Tensor]:
        # the static tensors live outside the graph's pool: the history stays the caller's tensors
        self._x = x.clone()
        self._history = list(cache)
        work = list(cache)
        before = torch.cuda.memory_reserved(x.device)
        started = time.perf_counter()
        steps = fn(self._x, work)  # type: ignore[arg-type]

        def part(last: bool) -> torch.Tensor:
            y = next(steps)
            if last:
                if next(steps, None) is not None:
                    raise RuntimeError(f"{self.name} gave more than {count} parts")
                for static, new in zip(self._history, work):
                    if not _same_memory(new, static):  # type: ignore[arg-type]
                        static.copy_(new)  # type: ignore[union-attr]
            return y

        graphs: list[torch.cuda.CUDAGraph] = []
        ys: list[torch.Tensor] = []
        try:
            for i in range(count):
                pool = graphs[0].pool() if graphs else None
                graph, y = capture_graph(lambda: part(i == count - 1), x.device, pool)
                graphs.append(graph)
                ys.append(y)
        except Exception as exc:  # an op that cannot be captured: this stream stays eager, loudly
            log.warning("CUDA graph capture of %s failed, it stays eager: %s", self.name, exc)
            self.failed, self._graphs, self._history = True, [], []
            # the capture worked on a copy of the list: `cache` is as it was
            yield from fn(x, cache)  # type: ignore[misc]
            return
        self._graphs, self._ys = graphs, ys
        cache[:] = self._history
        log.info("captured %s as %d CUDA graph(s) in %.0f ms (their memory pool took %.2f GiB more from the device)",
                 self.name, count, 1000 * (time.perf_counter() - started),
                 (torch.cuda.memory_reserved(x.device) - before) / 2**30)
        yield from self._replay()  # capturing recorded the kernels without running them: run this call now
