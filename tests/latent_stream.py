"""The engine's one schedule (engine.schedule.SessionSchedule) driven at the latent level, for tests that
compare it with the reference package or with an offline forward: latents in, every forward's x0 out,
without the VAE, the noise controller or the pixel I/O.

The forwards run on one Stage holding every block (what the in-process engine runs), through the same
calls a ring makes: embed, the blocks, the head and flow step, then the last stage's re-noising
(engine.schedule.renoise_rows). Nothing of the streaming algorithm is written here: positions,
timesteps, rows and noise keys are the schedule's.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Union

import torch

from engine.config import StreamDefaults
from engine.dit import WanDiT
from engine.kv_cache import StreamKVCache
from engine.kv_policy import EvictionQueues, SessionPolicy
from engine.noise import KeyedNoise
from engine.parallel.stage import Stage
from engine.rope import Rope
from engine.schedule import AwaitRows, Emit, Group, SessionSchedule, Submit, renoise_rows
from interface.controls import StreamParams

NoiseFn = Callable[[torch.Size], torch.Tensor]
SID = 0


class CalledNoise:
    """A plain `noise(shape)` callable behind KeyedNoise's interface: draws are taken in the order the
    schedule and the last stage make them (the input noise of a forward, then its rows' re-noising), so
    a test can record them and feed the reference the same noise."""

    PRIME, STREAM = KeyedNoise.PRIME, KeyedNoise.STREAM

    def __init__(self, fn: NoiseFn) -> None:
        self.fn, self.seed, self.epoch = fn, 0, 0

    def draw(self, shape: Sequence[int], *key: int) -> torch.Tensor:
        return self.fn(torch.Size(shape))


class LatentStream:
    """One session's stream batch at the latent level: prime() the first chunk, then push() one latent
    frame per forward. `outputs[-1]` is the last forward's x0 (its rows but the last re-noised)."""

    def __init__(self, dit: WanDiT, context: torch.Tensor, steps: int, window: int, num_sink: int,
                 sink_threshold: Optional[float], rope_reset: int, latent_hw: tuple[int, int],
                 noise: Union[NoiseFn, KeyedNoise], step_lag: int = 1, policy: Optional[SessionPolicy] = None,
                 queues: Optional[EvictionQueues] = None) -> None:
        p = dit.patch_embedding.weight
        self.device, self.dtype = p.device, p.dtype
        pol = policy.policy if policy is not None else "ours"
        self.defaults = StreamDefaults(height=latent_hw[0] * 8, width=latent_hw[1] * 8, steps=steps, num_kv_cache=window,
                                       num_sink=num_sink, sink_refresh_threshold=sink_threshold,
                                       rope_reset_frames=rope_reset, kv_policy=pol)
        self.opts = SimpleNamespace(step_lag=step_lag)
        self.discard: set = set()
        self.stage = Stage(dit, Rope(dit.cfg.head_dim, self.device), self.defaults, self.device, self.dtype,
                           range(dit.cfg.num_layers))
        self.stage.use_graphs = False
        self.stage.open(SID, context)
        if queues is not None:
            self.stage.sessions[SID].queues = queues
        self.schedule = SessionSchedule(self, SID, "", StreamParams(steps=steps))
        if policy is not None:
            self.schedule.policy = policy
        self.noise = noise if isinstance(noise, KeyedNoise) else CalledNoise(noise)
        self.schedule.noise = self.noise  # type: ignore[assignment]
        self.outputs: deque[torch.Tensor] = deque()
        self._rows: dict[int, torch.Tensor] = {}
        self._fid = 0

    @property
    def cache(self) -> StreamKVCache:
        cache = self.stage.sessions[SID].cache
        assert cache is not None
        return cache

    def prime(self, latent: torch.Tensor, strength: float, t0: int) -> torch.Tensor:
        """Denoise the first chunk (latent [1, 16, F, h, w]) through every step; returns its x0."""
        self.schedule.in_flight.append([])
        self._drive(self.schedule.prime(latent, strength, t0, False, 0, None, {}))
        return self.outputs[-1]

    def push(self, latent: Optional[torch.Tensor], strength: float, t0: int) -> Optional[torch.Tensor]:
        """One stream forward with a new 1-frame chunk; the x0 of the chunk that leaves, or None while the
        rows fill."""
        self.schedule.in_flight.append([])
        left = len(self.schedule.in_flight)
        self._drive(self.schedule.push(latent, strength, t0, None, None, {}))
        return self.outputs[-1][-1:] if len(self.schedule.in_flight) < left else None

    def _drive(self, steps: Any) -> None:
        value = None
        while True:
            try:
                wait = steps.send(value)
            except StopIteration:
                return
            if isinstance(wait, Submit):
                value = self._forward(wait.group, wait.x)
            elif isinstance(wait, AwaitRows):
                value = self._rows.pop(wait.fid)
            elif isinstance(wait, Emit):
                value = None
            else:
                raise TypeError(f"unexpected {type(wait).__name__}")

    def _forward(self, g: Group, x: torch.Tensor) -> int:
        emb = self.stage.embed([g], [x])
        x0 = self.stage.finish([g], emb, self.stage.run([g], emb), x)
        back = renoise_rows(x0, [g], self.noise)  # type: ignore[arg-type]
        fid, self._fid = self._fid, self._fid + 1
        if SID in back:
            self._rows[fid] = back[SID]
        self.outputs.append(x0)
        return fid


def dit_step(dit: WanDiT, stage: Stage, x: torch.Tensor, t: int, position: int) -> torch.Tensor:
    """One cached forward of one row (x [1, 16, F, h, w] at timestep t, from `position`) on `stage`'s
    session SID, as the executors run it; returns the x0 prediction."""
    g = Group(sid=SID, rows=1, frames=x.shape[2], positions=[position], t=[t])
    emb = stage.embed([g], [x])
    return stage.finish([g], emb, stage.run([g], emb), x)
