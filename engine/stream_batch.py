"""The DiT side of the streaming algorithm for one session (docs/ARCHITECTURE.md §3): the first chunk is denoised
step by step in one row; after it, n chunks are in flight, one per noise level, run as one batch of n
rows through the DiT. Each forward takes a new chunk in at the noisiest level and lets the cleanest out.

Step lag L (default 1, the reference's schedule): row i of forward f holds the chunk that entered at
forward f - i*L, fed from row i-1 of forward f-L's output. With L = 1 a forward needs the previous
forward's output, so one forward of a stream can be in flight; with L > 1, L forwards of one stream can
be (the pipeline-parallel engine keeps its ranks busy that way). Every chunk still meets the same steps,
each row attends to its own KV cache row in chunk order, and a chunk leaves (n-1)*L forwards after it
entered. What differs is the start: the rows a chunk has not reached yet are filler (zero latents), and
with L > 1 there are more of them, so frames equal those of another engine with the same L, not L = 1.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Callable, Optional, Sequence, Union

import torch

from engine import flow
from engine.dit import WanDiT
from engine.dit_runner import DiTRunner
from engine.kv_cache import StreamKVCache
from engine.kv_policy import EvictionQueues, SessionPolicy, graphs_allowed
from engine.rope import Rope

NoiseFn = Callable[[torch.Size], torch.Tensor]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integers (a hash, so nearby keys are unrelated)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class KeyedNoise:
    """Counter-based noise: a draw is a pure function of (seed, epoch, key), never of how many draws came
    before it or of which process makes it. That is what lets a pipeline of ranks split the draws of one
    stream (rank 0 noises the input, the last rank re-noises the outputs) and still produce the frames of
    one process exactly.

    Keys used by a stream batch: (PRIME, 0, 0) the first chunk's input noise, (PRIME, 0, i+1) its
    re-noising after step i; (STREAM, j, 0) the input noise of stream forward j, (STREAM, j, i+1) the
    re-noising of its row i. `epoch` counts the stream batches of a session (reset, steps change), `seed`
    may change mid-stream (a live seed update applies to the draws after it).
    """

    PRIME, STREAM = 0, 1

    def __init__(self, seed: int, epoch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.seed, self.epoch = int(seed), int(epoch)
        self.device, self.dtype = torch.device(device), dtype
        self._gen = torch.Generator(device=self.device)

    def draw(self, shape: Sequence[int], *key: int) -> torch.Tensor:
        self._gen.manual_seed(mix_seed(self.seed, self.epoch, *key))
        return torch.randn(tuple(shape), generator=self._gen, device=self.device, dtype=self.dtype)


Noise = Union[NoiseFn, KeyedNoise]


def dit_step(
    dit: WanDiT,
    rope: Rope,
    cache: StreamKVCache,
    cross_kv: list,
    x: torch.Tensor,
    t: torch.Tensor,
    positions: Sequence[int],
) -> torch.Tensor:
    """One eager cached DiT forward: x [R, 16, F, H, W] at timesteps t [R, F] (uniform per row),
    row r starting at positions[r]. Returns the x0 prediction."""
    return DiTRunner(dit, rope, cache, use_graphs=False)(cross_kv, x, t[:, 0].tolist(), positions)


class StreamBatch:
    """Holds the rows in flight, their positions and the KV cache of one session."""

    def __init__(
        self,
        dit: WanDiT,
        rope: Rope,
        steps: int,
        window: int,
        num_sink: int,
        sink_threshold: Optional[float],
        rope_reset: int,
        latent_hw: tuple[int, int],
        noise: Noise,
        step_lag: int = 1,
        warm_shapes: Optional[set] = None,
        policy: Optional[SessionPolicy] = None,
        queues: Optional[EvictionQueues] = None,
    ) -> None:
        """`policy` (the session's, surviving its restarts; default ours) chooses the chunks' timesteps;
        under the reference policy `queues` (the session's too) drive the cache's evictions."""
        if step_lag < 1:
            raise ValueError(f"step_lag must be >= 1, got {step_lag}")
        cfg = dit.cfg
        self.step_lag = step_lag
        p = dit.patch_embedding.weight
        self.dit, self.rope, self.noise = dit, rope, noise
        self.policy = policy or SessionPolicy("ours")
        self.steps = flow.step_list(steps)
        self.window, self.rope_reset = window, rope_reset
        h, w = latent_hw
        self.cache = StreamKVCache(
            layers=range(cfg.num_layers),
            rows=1,
            window=window,
            frame_tokens=(h // cfg.patch_size[1]) * (w // cfg.patch_size[2]),
            heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            num_sink=num_sink,
            sink_threshold=sink_threshold,
            rope=rope,
            dtype=p.dtype,
            device=p.device,
            policy=self.policy.policy,
            queues=queues,
        )
        self.runner = DiTRunner(dit, rope, self.cache, use_graphs=graphs_allowed(self.policy.policy),
                                warm_shapes=warm_shapes)
        # the last step_lag forwards' outputs [n, 16, 1, h, w] (re-noised), oldest first: forward f's
        # rows 1.. come from rows ..n-2 of forward f - step_lag
        self.outputs: Optional[deque[torch.Tensor]] = None
        self.entered: deque[int] = deque()  # positions of the chunks that entered, newest last
        self.row_pos: list[int] = []
        self.next_pos = 0
        self.forwards = 0  # stream forwards since the first chunk

    @property
    def primed(self) -> bool:
        return self.outputs is not None

    @property
    def lag(self) -> int:
        """Forwards between a chunk entering and leaving."""
        return (len(self.steps) - 1) * self.step_lag

    def _eps(self, shape: Sequence[int], *key: int) -> torch.Tensor:
        """Keyed noise when the session gives a KeyedNoise; otherwise a plain `noise(shape)` callable,
        called in a fixed order (the parity tests inject one that records its draws)."""
        if isinstance(self.noise, KeyedNoise):
            return self.noise.draw(shape, *key)
        return self.noise(torch.Size(shape))

    def prime(self, latent: torch.Tensor, strength: float, t0: int, cross_kv: list) -> torch.Tensor:
        """Denoise the first chunk (latent [1, 16, F, h, w]) through every step; returns its x0."""
        frames = latent.shape[2]
        x = strength * self._eps(latent.shape, KeyedNoise.PRIME, 0, 0) + (1 - strength) * latent
        x = x.to(latent.dtype)
        ts = self.policy.prime_timesteps(t0, self.steps)
        for i, t in enumerate(ts):
            x0 = self.runner(cross_kv, x, [t], [0])
            if i + 1 < len(ts):
                x = flow.renoise(x0, self._eps(x0.shape, KeyedNoise.PRIME, 0, i + 1), ts[i + 1])
        n = len(self.steps)
        self.cache.expand_rows(n)
        filler = torch.zeros((n, *latent.shape[1:2], 1, *latent.shape[3:]), dtype=latent.dtype, device=latent.device)
        self.outputs = deque([filler] * self.step_lag)
        self.entered = deque([frames] * (self.lag + 1), maxlen=self.lag + 1)
        self.row_pos = [frames] * n
        self.next_pos = frames
        self.forwards = 0
        return x0

    def push(self, latent: Optional[torch.Tensor], strength: float, t0: int, cross_kv: list) -> Optional[torch.Tensor]:
        """One stream forward with a new 1-frame chunk (latent [1, 16, 1, h, w], or None for pure noise
        while draining). Returns the x0 of the chunk that leaves, or None while the pipeline fills."""
        assert self.outputs is not None, "prime() first"
        prev = self.outputs.popleft()  # the output of forward j - step_lag (filler at the start)
        shape = (1, *prev.shape[1:])
        j = self.forwards
        eps = self._eps(shape, KeyedNoise.STREAM, j, 0)
        new = eps if latent is None else strength * eps + (1 - strength) * latent
        pos = self.next_pos
        if pos >= self.rope_reset:  # RoPE refresh: wrap to the last window slot
            pos = self.window - 1
        self.next_pos = pos + 1
        x = torch.cat([new.to(prev.dtype), prev[:-1]])
        self.entered.append(pos)
        self.row_pos = [self.entered[-1 - i * self.step_lag] for i in range(len(self.steps))]
        ts = self.policy.stream_timesteps(t0, self.steps)
        x0 = self.runner(cross_kv, x, ts, self.row_pos)
        for i in range(len(ts) - 1):
            x0[i : i + 1] = flow.renoise(x0[i : i + 1], self._eps(shape, KeyedNoise.STREAM, j, i + 1), self.steps[i + 1])
        self.outputs.append(x0)
        self.forwards += 1
        return x0[-1:] if self.forwards > self.lag else None
