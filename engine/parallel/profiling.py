"""A rank's own profile of a window of forwards, taken inside its process (where its GPU work is queued).

`ParallelEngine.profile_ranks(directory, forwards)` sends a `Profile` message round the ring; each rank then
runs torch.profiler over its part of the next `forwards` forwards and writes, into `directory`:
- `rank{r}.json.gz`: the Chrome trace (chrome://tracing, Perfetto);
- `rank{r}.txt`: the GPU's busy time per CUDA stream over the window and its idle gaps (no kernel on any
  stream), largest first, each with the host calls alive during it: where a rank's host, or a transfer
  it waits for, sets the pace instead of its GPU.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from typing import Any, Optional

import torch

log = logging.getLogger("engine.parallel.profiling")

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "python_function", "cuda_runtime", "user_annotation")


def gpu_gaps(trace: list[dict], top: int, min_us: float = 30.0) -> list[str]:
    """Lines: a summary, then the `top` largest idle gaps of the device in a Chrome trace's events, each
    with the innermost host calls running while the GPU waited and the kernel that ended the wait."""
    dev = sorted((e for e in trace if e.get("cat") in DEVICE_CATS and "dur" in e), key=lambda e: e["ts"])
    if not dev:
        return ["no device activity in the trace"]
    host = [e for e in trace if e.get("cat") in HOST_CATS and "dur" in e]
    gaps, start, end = [], dev[0]["ts"], dev[0]["ts"] + dev[0]["dur"]
    for e in dev[1:]:
        if e["ts"] - end >= min_us:
            busy = [h for h in host if h["ts"] < e["ts"] and h["ts"] + h["dur"] > end]
            names = [h["name"][:60] for h in sorted(busy, key=lambda h: h["dur"])[:4]]
            gaps.append((e["ts"] - end, f"{e['ts'] - end:8.1f} us before {e['name'][:50]!r}; host: {names}"))
        end = max(end, e["ts"] + e["dur"])
    total = sum(g for g, _ in gaps)
    gaps.sort(key=lambda g: -g[0])
    head = (f"idle gaps >= {min_us:.0f} us: {len(gaps)}, {total / 1e3:.2f} ms in all, "
            f"of {(end - start) / 1e3:.2f} ms from the first kernel to the last")
    return [head] + [t for _, t in gaps[:top]]


def stream_busy(trace: list[dict], top: int = 3) -> list[str]:
    """Per CUDA stream: kernel time and count, and its largest kernels by total time."""
    by: dict[Any, dict[str, list[float]]] = {}
    for e in trace:
        if e.get("cat") in DEVICE_CATS and "dur" in e:
            by.setdefault(e.get("tid"), {}).setdefault(e["name"], []).append(e["dur"])
    lines = []
    for tid, kernels in sorted(by.items(), key=lambda kv: -sum(map(sum, kv[1].values()))):
        total = sum(map(sum, kernels.values()))
        big = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
        lines.append(f"stream {tid}: {total / 1e3:.2f} ms in {sum(map(len, kernels.values()))} kernels; largest: "
                     + "; ".join(f"{n[:50]!r} {sum(d) / 1e3:.2f} ms x{len(d)}" for n, d in big))
    return lines


class RankProfiler:
    """Armed by a `Profile` ring message; profiles forwards [first, first + count) as this rank sees them."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device
        self.directory: Optional[str] = None
        self.first = self.count = 0
        self._prof: Any = None
        self._forwards = 0

    def arm(self, directory: str, first: int, count: int) -> None:
        self.finish()  # a window still open ends here
        self.directory, self.first, self.count = directory, first, max(1, count)

    def forward(self, fid: int) -> None:
        """Called as forward `fid` starts on this rank (forwards arrive in ring order)."""
        if self.directory is None:
            return
        if self._prof is None and fid >= self.first + self.count:  # the window passed unseen: disarm
            self.directory = None
            return
        if self._prof is None and self.first <= fid:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=acts)
            self._prof.start()
            self._forwards = 0
            log.info("rank %d: profiling forwards %d-%d", self.rank, fid, self.first + self.count - 1)
        if self._prof is not None:
            if fid >= self.first + self.count:
                self.finish()
            else:
                self._forwards += 1

    def finish(self) -> None:
        """Stop and write the window's trace and summary (also when the rank stops inside it)."""
        prof, directory = self._prof, self.directory
        self._prof, self.directory = None, None
        if prof is None or directory is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's queued work ends inside the profile
        prof.stop()
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            raw = open(f.name, "rb").read()
        trace = json.loads(raw)["traceEvents"]
        with gzip.open(os.path.join(directory, f"rank{self.rank}.json.gz"), "wb") as g:
            g.write(raw)
        lines = [f"rank {self.rank} on {self.device}: {self._forwards} forwards profiled"]
        lines += stream_busy(trace) + gpu_gaps(trace, top=20)
        with open(os.path.join(directory, f"rank{self.rank}.txt"), "w") as out:
            out.write("\n".join(lines) + "\n")
        log.info("rank %d: profile written to %s", self.rank, directory)
