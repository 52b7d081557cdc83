"""One cached DiT forward of a stream batch, eager or replayed from a CUDA graph.

The steady state (every row's window full, one latent frame per row) has fixed shapes and keeps all its
changing inputs in persistent device buffers: the latents, the timesteps and sigmas, and the KV cache's
plan (slots, positions). That forward is captured once per session and replayed: one launch instead
of a few thousand small ones per chunk, which is what bounds the eager DiT (the host, not the GPU).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from engine import flow
from engine.dit import AttnInputs, WanDiT
from engine.kv_cache import StreamKVCache
from engine.rope import Rope
from engine.transfer import h2d_into

log = logging.getLogger(__name__)


class DiTRunner:
    """Runs `x0 = DiT(x, t)` with a session's KV cache; owns that session's CUDA graph."""

    def __init__(self, dit: WanDiT, rope: Rope, cache: StreamKVCache, use_graphs: bool = True) -> None:
        self.dit, self.rope, self.cache = dit, rope, cache
        self.device = cache.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._graph_rows = 0
        self._warm = False
        self._x: Optional[torch.Tensor] = None  # static input latents [R, 16, 1, h, w]
        self._ts: Optional[torch.Tensor] = None  # static [2, R]: timesteps, sigmas
        self._kv: Optional[list] = None  # static cross-attention K/V
        self._kv_src: Optional[list] = None
        self._out: Optional[torch.Tensor] = None

    def _forward(self, x: torch.Tensor, ts: torch.Tensor, cross_kv: list) -> torch.Tensor:
        frames = x.shape[2]
        t = ts[0][:, None].expand(-1, frames)
        emb = self.dit.embed(x, t)
        f, h, w = emb.grid
        ang = self.rope.angles(self.cache.positions, f, h, w)
        a = AttnInputs(cos=ang.cos(), sin=ang.sin(), cache=self.cache)
        tokens = self.dit.run_blocks(emb.tokens, emb, a, cross_kv, self.cache.layers)
        sig = ts[1].float()[:, None, None, None, None]
        return flow.x0_from_velocity(self.dit.finish(tokens, emb), x, sig)

    def __call__(self, cross_kv: list, x: torch.Tensor, t: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """x [R, 16, F, h, w] at integer timesteps t [R] (one per row), row r starting at positions[r]."""
        rows = x.shape[0]
        self.cache.begin(positions, x.shape[2])
        ts_host = torch.tensor([list(t), [flow.sigma_of(v) for v in t]], dtype=torch.float64)
        if not (self.use_graphs and self.cache.all_full and x.shape[2] == 1):
            ts = torch.empty(2, rows, dtype=torch.float64, device=self.device)
            h2d_into(ts, ts_host)
            return self._forward(x, ts, cross_kv)
        self._stage(cross_kv, x, ts_host)
        if self._graph is None or self._graph_rows != rows:
            if not self._warm:  # first steady-state forward runs eagerly: it initialises the kernels
                self._warm = True
                return self._forward(self._x, self._ts, self._kv).clone()
            if not self._capture(rows):
                return self._forward(self._x, self._ts, self._kv).clone()
        self._graph.replay()
        return self._out.clone()

    def _stage(self, cross_kv: list, x: torch.Tensor, ts_host: torch.Tensor) -> None:
        if self._x is None or self._x.shape != x.shape:
            self._x = torch.empty_like(x)
            self._ts = torch.empty(2, x.shape[0], dtype=torch.float64, device=self.device)
            self._graph = None
        self._x.copy_(x)
        h2d_into(self._ts, ts_host)
        if cross_kv is not self._kv_src:  # a new prompt (or blend step): copy into the static K/V
            if self._kv is None:
                self._kv = [(k.clone(), v.clone()) for k, v in cross_kv]
            else:
                for (ks, vs), (k, v) in zip(self._kv, cross_kv):
                    ks.copy_(k)
                    vs.copy_(v)
            self._kv_src = cross_kv

    def _capture(self, rows: int) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            # capturing records kernels without running them, so the KV cache is not touched here
            with torch.cuda.graph(graph):
                self._out = self._forward(self._x, self._ts, self._kv)
        except Exception as exc:  # an op that cannot be captured: stay eager, loudly
            log.warning("CUDA graph capture failed, the DiT stays eager: %s", exc)
            self.use_graphs = False
            return False
        self._graph, self._graph_rows = graph, rows
        log.info("captured the DiT step as a CUDA graph (%d rows)", rows)
        return True
