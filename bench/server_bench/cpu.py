"""CPU time of the processes in a run, from /proc (Linux): the server, its engine process, and this
benchmark's own process with its clients. Per process the whole (all threads) and the main thread,
which runs the Python event loop or request loop: a main thread near one core is a process whose
Python code is the bottleneck, whatever the rest of the machine does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ticks(stat_path: Path) -> Optional[float]:
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime (fields 14 and 15 of stat)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def busiest_child(pid: int) -> Optional[int]:
    """The child of `pid` that has used the most CPU (the server's engine, beside multiprocessing's idle
    resource tracker); None without children."""
    return max(children(pid), key=lambda c: _ticks(Path(f"/proc/{c}/stat")) or 0.0, default=None)


def cpu_seconds(pids: dict[str, int]) -> dict[str, Optional[float]]:
    """{name: process CPU seconds, name + "_main": its main thread's} for each named pid."""
    out: dict[str, Optional[float]] = {}
    for name, pid in pids.items():
        out[name] = _ticks(Path(f"/proc/{pid}/stat"))
        out[name + "_main"] = _ticks(Path(f"/proc/{pid}/task/{pid}/stat"))
    return out


def cores_used(before: dict[str, Optional[float]], after: dict[str, Optional[float]], wall_s: float) -> dict[str, float]:
    """CPU seconds per wall second between two cpu_seconds() readings (1.0: one core busy all along)."""
    return {k: round((after[k] - b) / wall_s, 2) for k, b in before.items()
            if b is not None and after.get(k) is not None and wall_s > 0}
