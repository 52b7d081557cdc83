"""Which camera frames go to the engine (docs/ARCHITECTURE.md §8).

The camera keeps sending while the engine works on a chunk. Frames that arrive in between wait
here; at the next chunk boundary the chunk takes evenly spaced ones and the rest are dropped
(counted). The buffer is bounded so a stalled engine cannot make it grow.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


def spaced_indices(n: int, k: int) -> list[int]:
    """k of n indices, one per equal bucket, each the newest of its bucket (so the last is n-1)."""
    if not 0 < k <= n:
        raise ValueError(f"cannot take {k} of {n}")
    return [((j + 1) * n) // k - 1 for j in range(k)]


class ChunkSampler(Generic[T]):
    def __init__(self, max_frames: int) -> None:
        self._frames: deque[T] = deque()
        self._max = max_frames

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, frame: T) -> int:
        """Keep a frame; returns how many of the oldest were dropped to stay bounded."""
        self._frames.append(frame)
        dropped = 0
        while len(self._frames) > self._max:
            self._frames.popleft()
            dropped += 1
        return dropped

    def take(self, k: int) -> tuple[list[T], int]:
        """k evenly spaced frames of those waiting, and how many were skipped; empties the buffer."""
        frames = list(self._frames)
        self._frames.clear()
        return [frames[i] for i in spaced_indices(len(frames), k)], len(frames) - k

    def clear(self) -> int:
        n = len(self._frames)
        self._frames.clear()
        return n
