"""Helpers shared by tests that stream several sessions."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def push_interleaved(sessions: Sequence[Any], clips: Sequence[np.ndarray], chunk: int = 4) -> list[list]:
    """Push each clip to its session `chunk` frames at a time, round robin, then flush each session;
    returns each session's outputs [(frame, pts), ...]."""
    outs: list[list] = [[] for _ in sessions]
    for i in range(0, max(len(c) for c in clips), chunk):
        for s, c, out in zip(sessions, clips, outs):
            if i < len(c):
                out += s.push(c[i : i + chunk], list(range(i, min(i + chunk, len(c)))))
    for s, out in zip(sessions, outs):
        out += s.flush()
    return outs
