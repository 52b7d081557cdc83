"""Counter-based noise (docs/ARCHITECTURE.md §3, "Keyed noise")."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integers (a hash, so nearby keys are unrelated)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class KeyedNoise:
    """A draw is a pure function of (seed, epoch, key), never of how many draws came before it or of which
    process makes it. That is what lets the schedule's draws be split (rank 0 noises the input, the last
    rank re-noises the outputs) and a session batched with others give the frames it gives alone.

    Keys used by the schedule (engine.schedule): (PRIME, 0, 0) the first chunk's input noise, (PRIME, 0,
    i+1) its re-noising after step i; (STREAM, j, 0) the input noise of stream forward j, (STREAM, j, i+1)
    the re-noising of its row i. `epoch` counts the stream batches of a session (reset, steps change),
    `seed` may change mid-stream (a live seed update applies to the draws after it).
    """

    PRIME, STREAM = 0, 1

    def __init__(self, seed: int, epoch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.seed, self.epoch = int(seed), int(epoch)
        self.device, self.dtype = torch.device(device), dtype
        self._gen = torch.Generator(device=self.device)

    def draw(self, shape: Sequence[int], *key: int) -> torch.Tensor:
        self._gen.manual_seed(mix_seed(self.seed, self.epoch, *key))
        return torch.randn(tuple(shape), generator=self._gen, device=self.device, dtype=self.dtype)
