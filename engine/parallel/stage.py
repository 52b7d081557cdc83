"""A rank's share of a DiT forward, for one or several sessions' rows at once.

A forward carries `Group`s: one session's rows (a stream batch, or a step of its first chunk). Rank 0
embeds each group alone (the patch-embedding convolution is not batch-invariant on every backend),
then every rank runs its blocks over all rows at once: row-wise ops are exact under batching, and
self-attention goes to each row's own session cache through `BatchedCache`, which splits the rows by
session. The last rank adds the head and the flow step. A rank runs the same kernels on the same rows
whatever the rank count, so a rank count never changes a frame.

`RankSession` is what a rank keeps of a session: its KV cache and cross-attention K/V for the rank's
own layers (plus the VAE decode stream on the last rank). Blocks moving between ranks take those
layers' entries with them (`export_layers` / `import_layers`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from engine import flow
from engine.config import StreamDefaults
from engine.dit import AttnInputs, Embedded, WanDiT
from engine.fp8 import convert_block
from engine.kv_cache import StreamKVCache
from engine.kv_policy import EvictionQueues, eviction_queues, graphs_allowed
from engine.parallel.stage_graph import StageGraph, cross_kv_rows
from engine.ring_messages import Group
from engine.rope import Rope
from engine.transfer import h2d

log = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]


class PromptState:
    """Cross-attention K/V of one session for a rank's layers, with a prompt transition in progress.
    A transition blends the old K/V into the new over `chunks` chunks, layer by layer."""

    def __init__(self, kv: dict[int, KV]) -> None:
        self.kv = kv  # the current prompt's K/V
        self.cur = dict(kv)  # what the last tick chose (used by every step of a first chunk); own dict
        # so that moving a layer out of `kv` and `cur` never pops the same entry twice
        self.old: dict[int, KV] = {}
        self.new: dict[int, KV] = {}
        self.chunks = 0
        self.done = 0
        self.blending = False

    def _blend_now(self) -> dict[int, KV]:
        a = min(1.0, (self.done + 1) / (self.chunks + 1))
        return {i: (ko.lerp(self.new[i][0], a), vo.lerp(self.new[i][1], a)) for i, (ko, vo) in self.old.items()}

    def set_prompt(self, new: dict[int, KV], chunks: int) -> None:
        old = self._blend_now() if self.blending else self.kv
        self.blending = chunks > 0
        if self.blending:
            self.old, self.new, self.chunks, self.done = old, new, chunks, 0
        self.kv = new

    def reset_blend(self) -> None:
        self.blending = False

    def tick(self) -> None:
        if not self.blending:
            self.cur = dict(self.kv)
            return
        self.cur = self._blend_now()
        self.done += 1
        if self.done >= self.chunks:
            self.blending = False

    # -- moving layers ---------------------------------------------------------------------------------
    def export_layers(self, layers: Sequence[int], prefix: str, out: dict[str, torch.Tensor]) -> None:
        for i in layers:
            for name, store in (("kv", self.kv), ("cur", self.cur), ("old", self.old), ("new", self.new)):
                if i in store:
                    out[f"{prefix}{name}.{i}.k"], out[f"{prefix}{name}.{i}.v"] = store.pop(i)

    def import_layers(self, layers: Sequence[int], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for i in layers:
            for name, store in (("kv", self.kv), ("cur", self.cur), ("old", self.old), ("new", self.new)):
                key = f"{prefix}{name}.{i}.k"
                if key in tensors:
                    store[i] = (tensors[key], tensors[f"{prefix}{name}.{i}.v"])


@dataclass
class RankSession:
    prompt: PromptState
    cache: Optional[StreamKVCache] = None
    decode_state: Any = None  # the decoder's stream state (Wan VAEStreamState or TAEHVStreamState), last rank
    graph: Optional[StageGraph] = None  # this rank's blocks for the session's steady state
    # A fresh stream's first chunk, prepared when its frame 0 arrived (Stage.prepare_prime): the cache
    # its next stream batch starts with, and this rank's blocks of the priming forward captured for it
    next_cache: Optional[StreamKVCache] = None
    prime: Optional[StageGraph] = None
    prime_live: bool = False  # the prime graph's cache still has its first-chunk tensors (before expand)
    # reference KV policy: this rank's layers' eviction queues, kept across the session's restarts
    queues: Optional[EvictionQueues] = None


def export_cache_layers(cache: StreamKVCache, layers: Sequence[int], prefix: str, out: dict[str, torch.Tensor]) -> None:
    for i in layers:
        out.update({f"{prefix}{name}.{i}": t for name, t in cache.export_layer(i).items()})


def import_cache_layers(cache: StreamKVCache, layers: Sequence[int], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    for i in layers:
        cache.import_layer(i, {name: tensors[f"{prefix}{name}.{i}"] for name in cache.layer_state})


def _is_prime(g: Group) -> bool:
    """A stream's priming forward: its first chunk's latents in one row at position 0."""
    return g.rows == 1 and g.frames > 1 and list(g.positions) == [0]


class BatchedCache:
    """The KV caches of several sessions behind StreamKVCache's attend(): rows [a, b) of a forward
    belong to one session and attend to its cache only (results equal running each session alone)."""

    def __init__(self, caches: Sequence[StreamKVCache], layers: Sequence[int]) -> None:
        self.caches, self.layers = list(caches), list(layers)
        self.bounds, start = [], 0
        for c in self.caches:
            self.bounds.append((start, start + c.rows))
            start += c.rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # each session's rows attend to its own cache in a call of their own: the same call as that
        # session alone (so the same numbers), and no per-layer copy of every session's whole window
        return torch.cat([c.attend(layer, q[a:b], k[a:b], v[a:b]) for c, (a, b) in zip(self.caches, self.bounds)])


class Stage:
    """The DiT work of one rank: its layers (a contiguous range), the sessions' state for them."""

    MAX_BATCH_GRAPHS = 8
    # forwards a set of several sessions shares (each session through its own graph) before the set gets
    # a graph of its own (one eager forward to warm its shapes, then the capture): sets that only form
    # while sessions join or one runs late seldom come back
    BATCH_CAPTURE_AFTER = 3

    def __init__(self, dit: WanDiT, rope: Rope, defaults: StreamDefaults, device: torch.device, dtype: torch.dtype,
                 layers: Sequence[int], fp8: bool = False) -> None:
        self.dit, self.rope, self.defaults = dit, rope, defaults
        self.fp8 = fp8  # the blocks' linears are engine.fp8.FP8Linear (blocks moved in arrive as FP8 weights + scales)
        self.device, self.dtype = device, dtype
        self.layers = list(layers)
        cfg = dit.cfg
        self.latent_hw = (defaults.height // 8, defaults.width // 8)
        self.frame_tokens = (self.latent_hw[0] // cfg.patch_size[1]) * (self.latent_hw[1] // cfg.patch_size[2])
        self.sessions: dict[int, RankSession] = {}
        # steady-state forwards replay from CUDA graphs (False: always eager)
        self.use_graphs = device.type == "cuda" and graphs_allowed(defaults.kv_policy)
        self.batch_graphs: "OrderedDict[tuple[int, ...], StageGraph]" = OrderedDict()  # several sessions' forwards
        self.batch_seen: "OrderedDict[tuple, int]" = OrderedDict()  # (sessions, shapes) -> forwards shared so far
        self.captures = self.replays = self.prime_replays = 0
        self.last_graphed = False  # whether the last run() replayed graphs only
        self._eager_runs = 0  # blocks run eagerly in the current run() (several where it goes session by session)
        self.eager_batched = 0  # forwards of several sessions run eagerly (a set's warm-up before its capture)
        self.warm_primes: set[tuple] = set()  # priming-forward shapes that ran eagerly here

    # -- sessions ------------------------------------------------------------------------------------
    @torch.no_grad()
    def open(self, sid: int, context: torch.Tensor) -> None:
        d = self.defaults
        queues = eviction_queues(d.kv_policy, d.num_sink, d.num_kv_cache, d.sink_refresh_threshold)
        self.sessions[sid] = RankSession(PromptState(self._cross_kv(context)), queues=queues)

    def close(self, sid: int) -> None:
        self.drop_graphs(sid)
        self.sessions.pop(sid, None)

    @torch.no_grad()
    def set_prompt(self, sid: int, context: torch.Tensor, chunks: int) -> None:
        self.sessions[sid].prompt.set_prompt(self._cross_kv(context), chunks)

    def _cross_kv(self, context: torch.Tensor) -> dict[int, KV]:
        return dict(zip(self.layers, self.dit.cross_kv(context.to(self.device, self.dtype), self.layers)))

    def new_cache(self, queues: Optional[EvictionQueues] = None) -> StreamKVCache:
        d, cfg = self.defaults, self.dit.cfg
        return StreamKVCache(
            layers=self.layers, rows=1, window=d.num_kv_cache, frame_tokens=self.frame_tokens,
            heads=cfg.num_heads, head_dim=cfg.head_dim, num_sink=d.num_sink,
            sink_threshold=d.sink_refresh_threshold, rope=self.rope, dtype=self.dtype, device=self.device,
            policy=d.kv_policy, queues=queues,
        )

    # -- one forward ---------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, groups: Sequence[Group], xs: Sequence[torch.Tensor]) -> Embedded:
        """Rank 0: patch + time embedding, one group at a time, then concatenated."""
        parts = []
        for g, x in zip(groups, xs):
            t = h2d(torch.tensor(g.t, dtype=torch.float64), self.device)[:, None].expand(-1, g.frames)
            parts.append(self.dit.embed(x, t))
        if len(parts) == 1:
            return parts[0]
        return Embedded(torch.cat([p.tokens for p in parts]), torch.cat([p.e for p in parts]),
                        torch.cat([p.e6 for p in parts]), parts[0].grid)

    @torch.no_grad()
    def run(self, groups: Sequence[Group], emb: Embedded) -> torch.Tensor:
        """This rank's blocks over every row of the forward; updates the sessions' caches."""
        caches = []
        for g in groups:
            s = self.sessions[g.sid]
            if g.new_batch or s.cache is None:
                s.cache, s.next_cache = s.next_cache or self.new_cache(s.queues), None
                s.prime_live = s.prime is not None and s.prime.caches[0] is s.cache
            if g.kv_tick:
                s.prompt.tick()
            s.cache.begin(g.positions, g.frames)
            caches.append(s.cache)
        self._eager_runs = 0
        tokens = self._primed(groups, emb) if len(groups) == 1 else None
        if tokens is None:
            tokens = self._graphed(groups, emb, caches)
        if tokens is None:
            tokens = self._eager(groups, emb, caches)
        self.last_graphed = self._eager_runs == 0
        for g in groups:
            if g.expand:
                s = self.sessions[g.sid]
                s.cache.expand_rows(g.expand)  # type: ignore[union-attr]
                s.prime_live = False  # new cache tensors; the graph is kept until the next prepare
        return tokens

    def _eager(self, groups: Sequence[Group], emb: Embedded, caches: list[StreamKVCache]) -> torch.Tensor:
        f, h, w = emb.grid
        positions = [p for g in groups for p in g.positions]
        ang = self.rope.angles(h2d(positions, self.device), f, h, w)
        cache: Any = caches[0] if len(caches) == 1 else BatchedCache(caches, self.layers)
        a = AttnInputs(cos=ang.cos(), sin=ang.sin(), cache=cache)
        kv = cross_kv_rows(self._session_kv(groups), [g.rows for g in groups])
        self._eager_runs += 1
        if len(groups) > 1:
            self.eager_batched += 1
        elif _is_prime(groups[0]):
            self.warm_primes.add(self._prime_key(emb))
        return self.dit.run_blocks(emb.tokens, emb, a, kv, self.layers)

    def _one_by_one(self, groups: Sequence[Group], emb: Embedded, caches: list[StreamKVCache]) -> torch.Tensor:
        """A steady forward of sessions that have no graph together: each session's rows through its own
        graph (eager where it has none yet), one after the other. Exactly what the batch gives (a row
        attends only to its own session's cache), without an eager batched forward, whose host time
        (hundreds of kernel launches) held every session up while sets of sessions formed and broke up
        as they joined."""
        outs, r = [], 0
        for g, cache in zip(groups, caches):
            part = Embedded(emb.tokens[r:r + g.rows], emb.e[r:r + g.rows], emb.e6[r:r + g.rows], emb.grid)
            r += g.rows
            out = self._graphed([g], part, [cache])
            outs.append(out if out is not None else self._eager([g], part, [cache]))
        return torch.cat(outs)

    # -- a fresh stream's first chunk, captured ahead ------------------------------------------------------
    def _prime_key(self, emb: Embedded) -> tuple:
        return ("prime", tuple(self.layers), tuple(emb.tokens.shape), tuple(emb.e6.shape), emb.grid)

    def prepare_prime(self, sid: int, frames: int) -> None:
        """Frame 0 of a fresh stream arrived (its other first-chunk frames are on their way): give the
        session the cache its next stream batch starts with, and capture this rank's blocks of the
        priming forward (one row of `frames` latents at position 0) on it. Eager priming forwards are host-bound (a ring of one on an H200: the GPU
        idled 172 of 314 ms from the push of frames 0-4 to the first frame). Only a shape that has
        already run eagerly on this rank is captured (a capture must not be its first run)."""
        s = self.sessions.get(sid)
        if s is None:
            return
        cache = self.new_cache(s.queues)
        s.next_cache, s.prime, s.prime_live = cache, None, False
        cfg = self.dit.cfg
        grid = (frames, self.latent_hw[0] // cfg.patch_size[1], self.latent_hw[1] // cfg.patch_size[2])
        z = dict(dtype=self.dtype, device=self.device)
        emb = Embedded(torch.zeros(1, frames * self.frame_tokens, cfg.dim, **z), torch.zeros(1, frames, cfg.dim, **z),
                       torch.zeros(1, frames, 6, cfg.dim, **z), grid)  # type: ignore[arg-type]
        key = self._prime_key(emb)
        if not (self.use_graphs and self.layers and key in self.warm_primes):
            return
        graph = StageGraph([cache], key)
        kv = [[s.prompt.kv[i] for i in self.layers]]
        # the forward's plan (a first chunk's is the same every time), then back to an empty cache: the
        # capture runs no kernel, so nothing on the device changes
        filled, last_pos = list(cache.filled), list(cache.last_pos)
        cache.begin([0], frames)
        try:
            graph.capture(self.dit, self.rope, emb, kv, [1], self.layers, cache)
        except Exception as exc:  # an op that cannot be captured: the first chunk stays eager
            log.warning("CUDA graph capture of a first chunk (layers %s) failed, it stays eager: %s", self.layers, exc)
            return
        finally:
            cache.filled, cache.last_pos, cache._plan = filled, last_pos, None
        s.prime = graph
        self.captures += 1

    def _primed(self, groups: Sequence[Group], emb: Embedded) -> Optional[torch.Tensor]:
        g = groups[0]
        s = self.sessions[g.sid]
        if not (s.prime is not None and s.prime_live and _is_prime(g) and s.prime.fits([s.cache], self._prime_key(emb))):
            return None
        self.replays += 1
        self.prime_replays += 1
        return s.prime.replay(emb, self._session_kv(groups))

    def _graphed(self, groups: Sequence[Group], emb: Embedded, caches: list[StreamKVCache]) -> Optional[torch.Tensor]:
        """The blocks' output from a CUDA graph of this forward's sessions; None where this forward runs
        eagerly (not the steady state, the graph's warm-up forward, graphs off or failed)."""
        if not (self.use_graphs and all(c.all_full for c in caches) and all(g.frames == 1 and not g.expand for g in groups)):
            return None
        key = (tuple(self.layers), tuple(g.rows for g in groups), tuple(emb.tokens.shape), tuple(emb.e6.shape), emb.grid)
        sids = tuple(g.sid for g in groups)
        graph = self._graph_of(sids)
        if graph is None or not graph.fits(caches, key):
            if len(sids) > 1 and not self._batch_recurs(sids, key):
                return self._one_by_one(groups, emb, caches)
            graph = StageGraph(caches, key)
            self._keep_graph(sids, graph)
        kv = self._session_kv(groups)
        if graph.graph is None:
            if not graph.warm:  # the first steady forward runs eagerly: it initialises the kernels
                graph.warm = True
                return None
            attend: Any = caches[0] if len(caches) == 1 else BatchedCache(caches, self.layers)
            started = time.perf_counter()
            try:
                graph.capture(self.dit, self.rope, emb, kv, [g.rows for g in groups], self.layers, attend)
            except Exception as exc:  # an op that cannot be captured: stay eager, loudly
                log.warning("CUDA graph capture of layers %s failed, they stay eager: %s", self.layers, exc)
                self.use_graphs = False
                self.drop_graphs()
                return None
            self.captures += 1
            log.info("captured layers %d-%d of session(s) %s as a CUDA graph in %.0f ms", self.layers[0],
                     self.layers[-1], ",".join(map(str, sids)), 1000 * (time.perf_counter() - started))
        self.replays += 1
        return graph.replay(emb, kv)

    # -- graphs: a lone session's lives with it, batches' in a small LRU --------------------------------
    def _graph_of(self, sids: tuple[int, ...]) -> Optional[StageGraph]:
        if len(sids) == 1:
            return self.sessions[sids[0]].graph
        graph = self.batch_graphs.pop(sids, None)
        if graph is not None:
            self.batch_graphs[sids] = graph  # most recently used last
        return graph

    def _batch_recurs(self, sids: tuple[int, ...], key: tuple) -> bool:
        """Whether this set of sessions (at these shapes) has shared BATCH_CAPTURE_AFTER forwards, this one
        counted. Only sets that recur enter the LRU, so sets that form now and then never push out
        the graph of the set that runs every chunk."""
        seen = (sids, key)
        n = self.batch_seen.pop(seen, 0) + 1
        if n > self.BATCH_CAPTURE_AFTER:
            return True
        self.batch_seen[seen] = n
        while len(self.batch_seen) > 8 * self.MAX_BATCH_GRAPHS:
            self.batch_seen.popitem(last=False)
        return False

    def _keep_graph(self, sids: tuple[int, ...], graph: StageGraph) -> None:
        if len(sids) == 1:
            self.sessions[sids[0]].graph = graph
            return
        self.batch_graphs.pop(sids, None)
        self.batch_graphs[sids] = graph
        while len(self.batch_graphs) > self.MAX_BATCH_GRAPHS:  # each holds its caches and a memory pool
            self.batch_graphs.pop(next(iter(self.batch_graphs)))

    def drop_graphs(self, sid: Optional[int] = None) -> None:
        """Graphs involving `sid` (all graphs when None): they hold its caches. A prepared first-chunk
        cache goes with its graph (it is empty: a new one, for the layers held then, is the same)."""
        for key in [k for k in self.batch_graphs if sid is None or sid in k]:
            del self.batch_graphs[key]
        for seen in [k for k in self.batch_seen if sid is None or sid in k[0]]:
            del self.batch_seen[seen]
        for s_id, s in self.sessions.items():
            if sid is None or s_id == sid:
                s.graph = None
                s.prime, s.prime_live, s.next_cache = None, False, None

    def _session_kv(self, groups: Sequence[Group]) -> list[list[KV]]:
        """Per group, its session's cross-attention K/V for this rank's layers (as the last tick chose)."""
        return [[self.sessions[g.sid].prompt.cur[i] for i in self.layers] for g in groups]

    @torch.no_grad()
    def finish(self, groups: Sequence[Group], emb: Embedded, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Last rank: head + unpatchify + x0 = x_t - sigma * v (sigma per row, looked up on the host)."""
        sig_host = torch.tensor([flow.sigma_of(t) for g in groups for t in g.t], dtype=torch.float64)
        sig = h2d(sig_host, self.device).float()[:, None, None, None, None]
        return flow.x0_from_velocity(self.dit.finish(tokens, emb), x, sig)

    # -- moving layers ---------------------------------------------------------------------------------
    def export_layers(self, layers: Sequence[int]) -> dict[str, torch.Tensor]:
        """Weights and per-session state of `layers`, removed from this rank (weights go to meta)."""
        out: dict[str, torch.Tensor] = {}
        for i in layers:
            for name, p in self.dit.blocks[i].state_dict().items():
                out[f"w.{i}.{name}"] = p
        for sid, s in self.sessions.items():
            s.prompt.export_layers(layers, f"s{sid}.p.", out)
            if s.cache is not None:
                export_cache_layers(s.cache, layers, f"s{sid}.c.", out)
        for i in layers:
            self.dit.blocks[i] = self.dit.blocks[i].to("meta")
        self.layers = [i for i in self.layers if i not in set(layers)]
        self.drop_graphs()  # they ran the old layers; their memory pools go before the new captures
        return out

    def import_layers(self, layers: Sequence[int], tensors: dict[str, torch.Tensor]) -> None:
        for i in layers:
            sd = {k[len(f"w.{i}.") :]: v for k, v in tensors.items() if k.startswith(f"w.{i}.")}
            if self.fp8:  # the giver sent e4m3 weights and their scales: give the meta block their layout
                convert_block(self.dit.blocks[i])
            self.dit.blocks[i].load_state_dict(sd, strict=True, assign=True)
            self.dit.blocks[i].requires_grad_(False)
        for sid, s in self.sessions.items():
            s.prompt.import_layers(layers, f"s{sid}.p.", tensors)
            if s.cache is not None:
                import_cache_layers(s.cache, layers, f"s{sid}.c.", tensors)
        self.layers = sorted(set(self.layers) | set(layers))
        self.drop_graphs()
