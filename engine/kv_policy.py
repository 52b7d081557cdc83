"""The KV/scheduling policy of a session (docs/ARCHITECTURE.md §3): `ours` (the default) or `reference`, which
reproduces StreamDiffusionV2's behaviour where we depart from it on purpose (README "Where we differ").

Every decision that depends on the policy is made here, once (the schedule, engine.schedule, asks for
timesteps; StreamKVCache for eviction):

- the timesteps of a chunk (`SessionPolicy.prime_timesteps`, `.stream_timesteps`);
- where a new frame goes in a full KV cache, and which sink a refresh replaces (`EvictionQueues`);
- whether cached keys are re-rotated when positions wrap (`rebase_on_wrap`).

`reference` state belongs to one session and survives that session's restarts (as the reference's state
survives its own restarts); the reference keeps it on shared modules, so a second session there disturbs
the first. That sharing is a bug we do not copy.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from interface.catalogue import KVPolicy

__all__ = ["KVPolicy", "SessionPolicy", "EvictionQueues", "eviction_queues", "graphs_allowed", "rebase_on_wrap"]


def graphs_allowed(policy: KVPolicy) -> bool:
    """Whether the DiT forward may run as a CUDA graph: not under the reference, whose cache slots are
    decided on the host inside the forward."""
    return policy == "ours"


def rebase_on_wrap(policy: KVPolicy) -> bool:
    """On a position wrap, ours re-rotates cached keys to their new positions; the reference keeps the
    rotations they were written with."""
    return policy == "ours"


class EvictionQueues:
    """The reference's eviction queue, per layer and cache row (its CausalWanSelfAttention.evict_idx).

    Entries are slot ends in frames (slot = entry - 1), as the reference keeps them in tokens. Its rules:
    - a frame written while the cache fills appends `position + 2·frames` (where the next write of the
      same size would end) when that lies past the sinks and inside the window and is not already last:
      with a 2-latent first chunk the queue starts at slot 3, so rolling slots below 3 are never evicted;
    - every single-frame write, filling or not, first compares the new frame's mean key and value with each
      sink slot's (cosine, averaged over k and v; an empty slot gives 0): when the lowest is under the
      threshold, that sink's entry goes to the front of the queue;
    - a write into a full cache takes the front entry; a rolling entry goes back to the end, a sink
      entry is used once.
    A cache row added by a forward with more rows (after the first chunk) starts as a copy of row 0's
    queue, only when the layer has fewer queues than rows (so a restart keeps every row's old queue).
    """

    def __init__(self, num_sink: int, window: int, threshold: Optional[float]) -> None:
        self.num_sink, self.window, self.threshold = num_sink, window, threshold
        self.q: dict[int, list[list[int]]] = {}

    @property
    def checks_sinks(self) -> bool:
        return self.num_sink > 0 and self.threshold is not None

    def rows(self, layer: int, rows: int) -> list[list[int]]:
        q = self.q.setdefault(layer, [[]])
        if len(q) < rows:
            q[:] = [list(q[0]) for _ in range(rows)]
        return q

    def filled(self, layer: int, row: int, pos: int, frames: int) -> None:
        """A write of `frames` frames at `pos` into a cache that is not full."""
        q = self.q[layer][row]
        end = pos + 2 * frames
        if self.num_sink < end <= self.window and (not q or q[-1] != end):
            q.append(end)

    def flag_sink(self, layer: int, row: int, sink: int) -> None:
        self.q[layer][row].insert(0, sink + 1)

    def evict(self, layer: int, row: int) -> int:
        """The slot a frame overwrites in a full cache row."""
        q = self.q[layer][row]
        if not q:
            raise RuntimeError("reference eviction queue is empty (num_sink too close to the window)")
        end = q.pop(0)
        if end > self.num_sink:
            q.append(end)
        return end - 1

    def sink_similarity(self, cached_k: torch.Tensor, cached_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        frame_tokens: int) -> tuple[list[float], list[int]]:
        """Per row: the lowest sink similarity and its sink index, in the cache's dtype as the reference
        computes it. cached_* [rows, W·T, heads, hd], k/v [rows, T, heads, hd]."""
        rows, s, t = k.shape[0], self.num_sink, frame_tokens
        ks = cached_k[:, : s * t].reshape(rows, s, t, -1).mean(2)
        vs = cached_v[:, : s * t].reshape(rows, s, t, -1).mean(2)
        kn = k.reshape(rows, 1, t, -1).mean(2)
        vn = v.reshape(rows, 1, t, -1).mean(2)
        sim = (torch.cosine_similarity(ks, kn, dim=-1) + torch.cosine_similarity(vs, vn, dim=-1)) / 2
        low, idx = sim.min(dim=1)
        return low.float().tolist(), idx.tolist()

    # moving a layer between ranks: the queues travel as one long tensor [rows, 1 + longest] (length first)
    def export_layer(self, layer: int) -> torch.Tensor:
        q = self.q.pop(layer, [[]])
        width = 1 + max(len(r) for r in q)
        out = torch.zeros(len(q), width, dtype=torch.long)
        for i, r in enumerate(q):
            out[i, 0] = len(r)
            out[i, 1 : 1 + len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def import_layer(self, layer: int, packed: torch.Tensor) -> None:
        rows = packed.cpu().tolist()
        self.q[layer] = [r[1 : 1 + r[0]] for r in rows]


def eviction_queues(policy: KVPolicy, num_sink: int, window: int, threshold: Optional[float]) -> Optional[EvictionQueues]:
    """A session's eviction queues for its caches: None under `ours` (StreamKVCache keeps its own FIFO)."""
    return EvictionQueues(num_sink, window, threshold) if policy == "reference" else None


class SessionPolicy:
    """One session's timestep policy and, for `reference`, the step the reference would start from."""

    def __init__(self, policy: KVPolicy) -> None:
        if policy not in ("ours", "reference"):
            raise ValueError(f"kv_policy must be 'ours' or 'reference', got {policy!r}")
        self.policy: KVPolicy = policy
        # the reference writes each stream chunk's first timestep into its step list in place, so a
        # restart's first chunk starts from the last stream chunk's t0 (kept across every restart of the
        # session, a step-count change included)
        self._first_step: Optional[int] = None

    def prime_timesteps(self, t0: int, steps: Sequence[int]) -> list[int]:
        """The timesteps a first chunk is denoised through. Ours starts at the chunk's own t0
        (int(1000·strength) − 100); the reference at the first entry of its step list: the first step
        (700) on a fresh stream, after a restart the last stream chunk's t0."""
        if self.policy == "ours":
            return [int(t0)] + list(steps[1:])
        first = steps[0] if self._first_step is None else self._first_step
        return [int(first)] + list(steps[1:])

    def stream_timesteps(self, t0: int, steps: Sequence[int]) -> list[int]:
        """The timesteps of a stream forward's rows (the new chunk at t0, then the step list): the same
        in both policies; the reference remembers t0 for its next first chunk."""
        if self.policy == "reference":
            self._first_step = int(t0)
        return [int(t0)] + list(steps[1:])
