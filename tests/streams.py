"""Helpers shared by tests that stream sessions."""

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


class HeldCopies:
    """Device-to-host copies that stay in flight until released: what a push sees on CUDA while the GPU
    still works on its chunk (on the CPU every copy is done at once). `released` lets every copy land,
    `release(n)` the first n made so far, as a GPU finishes them in the order they were queued."""

    def __init__(self, engine: Any) -> None:
        self.real = engine.to_uint8_later
        self.released = False
        self.made: list[Any] = []

    def release(self, n: int) -> None:
        for copy in self.made[:n]:
            copy.landed = True

    def __call__(self, video):
        pending, held = self.real(video), self

        class Held:
            landed = False

            def ready(self) -> bool:
                return held.released or self.landed

            def result(self):
                return pending.result()

        copy = Held()
        self.made.append(copy)
        return copy
