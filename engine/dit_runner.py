"""One cached DiT forward of a stream batch, eager or replayed from a CUDA graph.

The steady state (every row's window full, one latent frame per row) has fixed shapes and keeps all its
changing inputs in persistent device buffers: the latents, the timesteps and sigmas, and the KV cache's
plan (slots, positions). That forward is captured once per session and replayed: one launch instead
of a few thousand small ones per chunk, which is what bounds the eager DiT (the host, not the GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from engine import flow
from engine.dit import AttnInputs, WanDiT
from engine.kv_cache import StreamKVCache
from engine.rope import Rope
from engine.stream_graph import capture_error_mode
from engine.transfer import h2d_into

log = logging.getLogger(__name__)

PRIME_POSITIONS = [0]  # a stream's first chunk: one row at position 0


def capture_graph(fn: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture fn's kernels as a CUDA graph (not run). Unlike `with torch.cuda.graph(...)` this neither
    synchronises the device nor empties the allocator's cache: a capture ahead of time (a fresh
    stream's first chunk) must not stall the GPU's other work or make later allocations cudaMalloc again."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode=capture_error_mode())
        try:
            out = fn()
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph, out


@dataclass
class _PrimeGraph:
    """The first chunk's forward, captured while the stream waits for its frames 1-4."""

    frames: int
    x: torch.Tensor  # static [1, 16, frames, h, w]
    ts: torch.Tensor  # static [2, 1]: timestep, sigma
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


class DiTRunner:
    """Runs `x0 = DiT(x, t)` with a session's KV cache; owns that session's CUDA graph."""

    def __init__(self, dit: WanDiT, rope: Rope, cache: StreamKVCache, use_graphs: bool = True,
                 warm_shapes: Optional[set] = None) -> None:
        self.dit, self.rope, self.cache = dit, rope, cache
        self.device = cache.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        # first-chunk input shapes whose kernels have run eagerly in this process (shared by the engine's
        # sessions): a capture must not be the first run (Triton compiles, cuDNN autotunes)
        self.warm_shapes: set = set() if warm_shapes is None else warm_shapes
        self._prime: Optional[_PrimeGraph] = None
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
        prime = self._prime
        if prime is not None and rows == 1 and x.shape == prime.x.shape and list(positions) == PRIME_POSITIONS:
            prime.x.copy_(x)
            h2d_into(prime.ts, ts_host)
            self._stage_kv(cross_kv)
            prime.graph.replay()
            return prime.out.clone()
        if not (self.use_graphs and self.cache.all_full and x.shape[2] == 1):
            ts = torch.empty(2, rows, dtype=torch.float64, device=self.device)
            h2d_into(ts, ts_host)
            out = self._forward(x, ts, cross_kv)
            if rows == 1 and x.shape[2] > 1 and list(positions) == PRIME_POSITIONS:
                self.warm_shapes.add(tuple(x.shape))
            return out
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
        self._stage_kv(cross_kv)

    def _stage_kv(self, cross_kv: list) -> None:
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
            with torch.cuda.graph(graph, capture_error_mode=capture_error_mode()):
                self._out = self._forward(self._x, self._ts, self._kv)
        except Exception as exc:  # an op that cannot be captured: stay eager, loudly
            log.warning("CUDA graph capture failed, the DiT stays eager: %s", exc)
            self.use_graphs = False
            return False
        self._graph, self._graph_rows = graph, rows
        log.info("captured the DiT step as a CUDA graph (%d rows)", rows)
        return True

    def prepare_prime(self, x_shape: Sequence[int], cross_kv: list) -> bool:
        """Capture the stream's first-chunk forward (one row of `x_shape`'s latents at position 0) now,
        while the stream waits for its first chunk's frames: the priming forwards then replay it instead
        of queuing a few thousand kernels each from the host (measured host-bound: 60 ms for two 480x832
        forwards against about 25 ms of GPU work). Needs an empty cache and a shape already run eagerly
        in this process; True when captured."""
        shape = tuple(x_shape)
        if not (self.use_graphs and shape in self.warm_shapes and self.cache.filled == [0] and shape[0] == 1):
            return False
        self._stage_kv(cross_kv)
        x = torch.zeros(shape, dtype=self._kv[0][0].dtype, device=self.device)  # type: ignore[index]
        ts = torch.zeros(2, 1, dtype=torch.float64, device=self.device)
        # the forward's plan (a first chunk's is the same every time), then back to an empty cache: the
        # plan is host bookkeeping and the capture runs no kernel, so nothing on the device changes
        filled, last_pos = list(self.cache.filled), list(self.cache.last_pos)
        self.cache.begin(PRIME_POSITIONS, shape[2])
        try:
            graph, out = capture_graph(lambda: self._forward(x, ts, self._kv), self.device)
        except Exception as exc:  # an op that cannot be captured: the first chunk stays eager
            log.warning("CUDA graph capture of the first chunk failed, it stays eager: %s", exc)
            return False
        finally:
            self.cache.filled, self.cache.last_pos, self.cache._plan = filled, last_pos, None
        # kept until the session ends (as the steady graph is): freeing a graph's pool mid-stream may
        # release device memory, which waits for the GPU
        self._prime = _PrimeGraph(shape[2], x, ts, graph, out)
        return True
