"""A rank's blocks for one session's steady-state forward, replayed from a CUDA graph.

The same idea as engine.dit_runner.DiTRunner, for a rank's share: once a session's KV cache is full and
each row brings one latent frame, the forward's shapes no longer change and everything that does change
lives in device buffers (the cache's plan and positions, and here the incoming tokens and modulation,
copied into static inputs). One replay then stands for the hundreds of kernel launches of the blocks,
which left a rank's GPU waiting for its host (docs/BENCHMARKS.md, pipeline rows).

A graph belongs to one session's cache and one set of layers: a new stream batch, a block move or a new
shape makes a new one (after one eager forward that warms the kernels up).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from engine.dit import AttnInputs, Embedded, WanDiT
from engine.kv_cache import StreamKVCache
from engine.rope import Rope

log = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]


class StageGraph:
    def __init__(self, cache: StreamKVCache, key: tuple) -> None:
        self.cache, self.key = cache, key
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warm = False
        self._tokens: Optional[torch.Tensor] = None
        self._e6: Optional[torch.Tensor] = None
        self._kv: list[KV] = []
        self._kv_src: list[KV] = []
        self._out: Optional[torch.Tensor] = None

    def fits(self, cache: StreamKVCache, key: tuple) -> bool:
        return cache is self.cache and key == self.key

    def capture(self, dit: WanDiT, rope: Rope, emb: Embedded, kv: Sequence[KV], layers: Sequence[int]) -> None:
        self._tokens, self._e6 = emb.tokens.clone(), emb.e6.clone()
        self._kv = [(k.clone(), v.clone()) for k, v in kv]
        self._kv_src = list(kv)
        f, h, w = emb.grid
        graph = torch.cuda.CUDAGraph()
        # capturing records kernels without running them, so the KV cache is not touched here
        with torch.cuda.graph(graph):
            ang = rope.angles(self.cache.positions, f, h, w)
            a = AttnInputs(cos=ang.cos(), sin=ang.sin(), cache=self.cache)
            static = Embedded(self._tokens, emb.e, self._e6, emb.grid)
            self._out = dit.run_blocks(self._tokens, static, a, self._kv, layers)
        self.graph = graph

    def replay(self, emb: Embedded, kv: Sequence[KV]) -> torch.Tensor:
        assert self.graph is not None and self._tokens is not None and self._e6 is not None and self._out is not None
        self._tokens.copy_(emb.tokens)
        self._e6.copy_(emb.e6)
        for j, ((ks, vs), (k, v)) in enumerate(zip(self._kv, kv)):
            src_k, src_v = self._kv_src[j]
            if k is not src_k or v is not src_v:  # a new prompt or a blend step: refresh the static K/V
                ks.copy_(k)
                vs.copy_(v)
                self._kv_src[j] = (k, v)
        self.graph.replay()
        return self._out.clone()
