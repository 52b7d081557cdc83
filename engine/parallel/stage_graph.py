"""A rank's blocks for a steady-state forward, replayed from a CUDA graph: one session's rows, or the
rows of several sessions batched into one forward.

Once every session in the forward has
a full KV cache and each row brings one latent frame, the forward's shapes no longer change and
everything that does change lives in device buffers (each cache's plan and positions, and here the
incoming tokens, modulation and cross-attention K/V, copied into static inputs). One replay then stands
for the hundreds of kernel launches of the blocks, which left a rank's GPU waiting for its host
(docs/BENCHMARKS.md, pipeline rows). Several sessions in one forward attend each to its own cache
(stage.BatchedCache) inside the same graph; without a graph for them, batching sessions ran slower
than one stream (2×H200, both rows).

A graph belongs to one list of caches (in forward order) and one set of layers: a new stream batch, a
block move or a new shape makes a new one (after one eager forward that warms the kernels up).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from engine.dit import AttnInputs, Embedded, WanDiT
from engine.stream_graph import capture_graph
from engine.kv_cache import StreamKVCache
from engine.rope import Rope

log = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]


class StageGraph:
    def __init__(self, caches: Sequence[StreamKVCache], key: tuple) -> None:
        self.caches, self.key = list(caches), key
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warm = False
        self._tokens: Optional[torch.Tensor] = None
        self._e6: Optional[torch.Tensor] = None
        self._kv: list[list[KV]] = []  # per session, per layer: the static cross-attention K/V
        self._kv_src: list[list[KV]] = []  # the tensors they were last copied from
        self._out: Optional[torch.Tensor] = None

    def fits(self, caches: Sequence[StreamKVCache], key: tuple) -> bool:
        return key == self.key and len(caches) == len(self.caches) and all(a is b for a, b in zip(caches, self.caches))

    def capture(self, dit: WanDiT, rope: Rope, emb: Embedded, kv: Sequence[Sequence[KV]], rows: Sequence[int],
                layers: Sequence[int], attend: Any) -> None:
        """`kv`: per session, its layers' cross-attention K/V (one row each); `rows`: each session's
        rows in the forward; `attend`: the object whose attend() the blocks call (the cache, or a
        stage.BatchedCache over `caches`).

        Captured on a side stream without synchronising the device or emptying the allocator's cache
        (capture_graph), unlike `with torch.cuda.graph()`: a rank captures while the ring
        runs (a new session, a block move), and a device-wide wait plus an emptied cache (later
        allocations going back to cudaMalloc) would land in the forwards right after a move, the very
        ones the block scheduler measures to judge it."""
        self._tokens, self._e6 = emb.tokens.clone(), emb.e6.clone()
        self._kv = [[(k.clone(), v.clone()) for k, v in s] for s in kv]
        self._kv_src = [list(s) for s in kv]
        f, h, w = emb.grid

        def forward() -> torch.Tensor:
            positions = self.caches[0].positions if len(self.caches) == 1 else \
                torch.cat([c.positions for c in self.caches])
            ang = rope.angles(positions, f, h, w)
            a = AttnInputs(cos=ang.cos(), sin=ang.sin(), cache=attend)
            static = Embedded(self._tokens, emb.e, self._e6, emb.grid)  # type: ignore[arg-type]
            return dit.run_blocks(self._tokens, static, a, cross_kv_rows(self._kv, rows), layers)

        # capturing records kernels without running them, so the KV caches are not touched here
        self.graph, self._out = capture_graph(forward, emb.tokens.device)

    def replay(self, emb: Embedded, kv: Sequence[Sequence[KV]]) -> torch.Tensor:
        assert self.graph is not None and self._tokens is not None and self._e6 is not None and self._out is not None
        self._tokens.copy_(emb.tokens)
        self._e6.copy_(emb.e6)
        for static, src, now in zip(self._kv, self._kv_src, kv):
            for j, ((ks, vs), (k, v)) in enumerate(zip(static, now)):
                if k is not src[j][0] or v is not src[j][1]:  # a new prompt or a blend step: refresh
                    ks.copy_(k)
                    vs.copy_(v)
                    src[j] = (k, v)
        self.graph.replay()
        return self._out.clone()


def cross_kv_rows(kv: Sequence[Sequence[KV]], rows: Sequence[int]) -> list[KV]:
    """Per layer, the cross-attention K/V of the forward's rows: one session's as they are (they
    broadcast over its rows); several sessions' expanded to their rows and concatenated."""
    if len(kv) == 1:
        return list(kv[0])
    out = []
    for per_layer in zip(*kv):
        out.append((torch.cat([k.expand(r, -1, -1, -1) for (k, _), r in zip(per_layer, rows)]),
                    torch.cat([v.expand(r, -1, -1, -1) for (_, v), r in zip(per_layer, rows)])))
    return out
