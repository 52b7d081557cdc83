"""The streaming algorithm, once (docs/ARCHITECTURE.md §3, §5): a session's frames, updates and resets
turned into DiT forwards. Both executors run it: the in-process engine (a ring of one in the caller's
thread, engine.runtime) and the ring of ranks (engine.parallel); neither has a copy of it.

A `SessionSchedule` keeps the session's input side (noise controller, VAE encode stream, the rows in
flight and their positions, the noise keys) and decides everything a forward needs, writing it into the
forward's `Group`: timesteps, positions, which rows the last stage re-noises and with which noise keys,
whether a chunk leaves and with which pts. Whatever executes the forward only follows the group.

The stream batch. The first chunk is denoised step by step in one row. After it, with n steps, n chunks
are in flight, one per noise level, and run as one forward of n rows: each forward takes a new chunk in
at the noisiest level and lets the cleanest out. With a step lag L (default 1, the reference's schedule),
row i of forward f holds the chunk that entered at forward f - i*L, fed from row i-1 of forward f-L's
output; a chunk leaves (n-1)*L forwards after it entered. With L = 1 a forward needs the previous
forward's output, so one forward of a stream is in flight (other sessions fill the executor); with L > 1,
L forwards of one stream can be (a ring keeps its ranks busy that way). Rows a chunk has not reached yet
are filler (zero latents), so frames equal those of another engine with the same L, not L = 1.

The schedule is a generator that yields what it waits for, so one core can serve many sessions, keep
several forwards in flight and batch sessions together:
- `NeedCommand()`: the next command of this session (from the caller);
- `Submit(group, x)`: a forward's rows, to be batched and issued; resumes with the forward id;
- `AwaitRows(fid)`: the re-noised rows of that forward, back from the last stage;
- `Emit(msg)`: a control message for every stage (prompt, reset, close), in order with forwards;
- `Failure(seq, error)`: the session cannot go on.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generator, Optional

import torch

from engine import flow
from engine.kv_policy import SessionPolicy
from engine.noise_control import NoiseController
from engine.noise import KeyedNoise
from engine import ring_messages as M
from engine.ring_messages import Group
from engine.protocol import CHUNK, AheadCmd, ChunkCmd, CloseCmd, DrainCmd, UpdateCmd
from interface.controls import StreamParams, StreamUpdate

log = logging.getLogger(__name__)


@dataclass
class FrameZero:
    """A fresh stream's frame 0, encoded on arrival while frames 1-4 are still on their way (the VAE
    encodes frame 0 on its own anyway); the first chunk then takes only frames 1-4."""

    frame: Any  # np.ndarray uint8 [H, W, 3]
    pts: int
    video: torch.Tensor  # [1, 3, 1, H, W] in [-1, 1], for the noise controller
    latent: torch.Tensor  # [1, 16, 1, h, w]


@dataclass
class AheadFrames:
    """Frames of a stream's next chunk that came before it was whole (docs/ARCHITECTURE.md §8): uploaded
    and through the encoder's per-frame blocks on arrival; the chunk's last frames finish the encode."""

    pts: list
    video: torch.Tensor  # [1, 3, T, H, W] in [-1, 1], for the noise controller
    lap: Any  # their encode's time, counted in the chunk's


def renoise_rows(x0: torch.Tensor, groups: list[Group], noise: KeyedNoise) -> dict[int, torch.Tensor]:
    """The last stage's flow step after a forward: each group's rows re-noised in place to their next
    timestep with the group's noise keys; returns the rows each session's next forwards take, by sid."""
    back: dict[int, torch.Tensor] = {}
    start = 0
    for g in groups:
        xg = x0[start : start + g.rows]
        noise.seed, noise.epoch = g.seed, g.epoch
        for row, t_next, key in g.renoise:
            xg[row : row + 1] = flow.renoise(xg[row : row + 1], noise.draw(xg[row : row + 1].shape, *key), t_next)
        if g.renoise:
            back[g.sid] = xg[: len(g.renoise)]
        start += g.rows
    return back


def first_latent_apart(x0: torch.Tensor) -> list[torch.Tensor]:
    """A stream's first chunk decodes latent 0 (frame 0 alone) before the rest, so that frame 0 can leave
    early while the rest is decoded."""
    return [x0[:, :, :1], x0[:, :, 1:]] if x0.shape[2] > 1 else [x0]


@dataclass
class NeedCommand:
    pass


@dataclass
class Submit:
    group: Group
    x: torch.Tensor  # the group's noisy rows [R, 16, F, h, w]
    laps: list = field(default_factory=list)  # timing laps spent on this chunk before the forward (VAE encode)


@dataclass
class AwaitRows:
    fid: int


@dataclass
class Emit:
    msg: M.RingMessage


@dataclass
class Failure:
    """The session cannot go on (e.g. its prompt could not be embedded); report it on `seq`."""

    seq: int
    error: str


Wait = Any  # one of the above


Steps = Generator[Wait, Any, None]


class SessionSchedule:
    def __init__(self, host: Any, sid: int, prompt: str, params: StreamParams,
                 output_ring: Optional[str] = None) -> None:
        """`host` is the core that runs it (engine.parallel.rank0.Rank0): io, encoder, defaults, device, dtype, clock,
        embed_prompt(), discard (returns nobody waits for any more)."""
        self.host, self.sid, self.params = host, sid, params
        self.output_ring = output_ring
        d = host.defaults
        self.steps_count = params.steps or d.steps
        self.transition_chunks = d.transition_chunks if params.transition_chunks is None else params.transition_chunks
        s_max = d.noise_strength if params.noise_strength is None else params.noise_strength
        self.controller_args = dict(
            s_max=s_max,
            s_min=max(0.0, s_max - (d.noise_strength - d.noise_strength_min)),
            sigma=d.motion_sigma,
            smoothing=d.motion_smoothing,
            enabled=params.motion_control,
        )
        self.prompt = prompt
        self.seed = params.seed
        self.epoch = 0
        h, w = d.height // 8, d.width // 8
        self.latent_hw = (h, w)
        self.commands: deque = deque()
        self.sources: deque[Optional[int]] = deque()  # per batch: see _new_batch
        self.policy = SessionPolicy(d.kv_policy)  # the session's, kept across its restarts
        self._reset_stream()

    # -- stream state --------------------------------------------------------------------------------
    def _reset_stream(self) -> None:
        self.vae_state = None
        self.frame0: Optional[FrameZero] = None  # a fresh stream's frame 0, waiting for frames 1-4
        self.ahead: list[AheadFrames] = []  # the next chunk's frames so far
        self.new_vae = False  # the next forward starts the last rank's decode stream
        self._new_batch()
        self.controller = NoiseController(**self.controller_args)
        self.in_flight: deque[Optional[list]] = deque()
        self.last_t0 = NoiseController.timestep(self.controller.s_max)

    def _new_batch(self) -> None:
        for fid in self.sources:
            if fid is not None:  # rows nobody will wait for any more
                self.host.discard.add((fid, self.sid))
        self.steps = flow.step_list(self.steps_count)
        self.noise = KeyedNoise(self.seed, self.epoch, self.host.device, self.host.dtype)
        self.epoch += 1
        self.primed = False
        self.fresh = True  # the next forward starts a new KV cache on every rank
        # The last step_lag forwards, oldest first: a forward id whose re-noised rows 0..n-2 the next
        # forwards take as their rows 1.., or None for filler (zeros) while the stream starts.
        self.sources = deque()
        self.entered: deque[int] = deque()  # positions of the chunks that entered, newest last
        self.row_pos: list[int] = []
        self.next_pos = 0
        self.forwards = 0

    # -- the session's life ----------------------------------------------------------------------------
    def run(self, open_seq: int) -> Steps:
        try:
            context = self.host.embed_prompt(self.prompt)
        except Exception as exc:  # a prompt the encoder refuses: this session fails, the engine goes on
            yield Failure(open_seq, f"{type(exc).__name__}: {exc}")
            return
        yield Emit(M.OpenSession(self.sid, open_seq, context, self.output_ring))
        while True:
            cmd = yield NeedCommand()
            if isinstance(cmd, ChunkCmd):
                yield from self._chunk(cmd)
            elif isinstance(cmd, AheadCmd):
                self._ahead(cmd)
            elif isinstance(cmd, UpdateCmd):
                ok = yield from self._update(StreamUpdate.model_validate(cmd.update), cmd.seq)
                if not ok:
                    return
                yield Emit(M.Note(self.sid, cmd.seq))
            elif isinstance(cmd, DrainCmd):
                yield from self._drain()
                yield Emit(M.Note(self.sid, cmd.seq))
            elif isinstance(cmd, CloseCmd):
                yield Emit(M.CloseSession(self.sid, cmd.seq))
                return

    def _group(self, **kw: Any) -> Group:
        return Group(sid=self.sid, seed=self.noise.seed, epoch=self.noise.epoch, **kw)

    # -- one chunk -------------------------------------------------------------------------------------
    def _chunk(self, cmd: ChunkCmd) -> Steps:
        host = self.host
        with host.io.upload_stream():  # neither the upload nor the motion measure waits for queued forwards
            video = host.io.to_video_tensor(cmd.frames)
        if self.vae_state is None:
            self.vae_state = host.encoder.new_stream_state()
            self.new_vae = True
            if len(cmd.frames) == 1:
                yield from self._frame0(cmd, host.io.hand_over(video))
                return
        lap = host.clock.lap()
        ahead, self.ahead = self.ahead, []
        pts = [p for a in ahead for p in a.pts] + list(cmd.pts)
        f0, self.frame0 = self.frame0, None
        with host.io.upload_stream():
            # the motion measure sees the whole chunk, frame 0 too
            parts = ([] if f0 is None else [f0.video]) + [a.video for a in ahead] + [video]
            full = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
            strength_later = self.controller.queue_step(full[0])  # read after the encode is queued
        latent = host.encoder.stream_encode(host.io.hand_over(video).to(host.dtype), self.vae_state).to(host.dtype)
        if f0 is not None:
            latent, pts = torch.cat([f0.latent, latent], 2), [f0.pts, *pts]
        new_vae, self.new_vae = self.new_vae, False
        strength = strength_later()
        t0 = NoiseController.timestep(strength)
        self.last_t0 = t0
        laps = [a.lap for a in ahead] + [lap.stop()]
        self.in_flight.append(pts)
        stats = {"noise_strength": strength, "timestep": float(t0)}
        if not self.primed:
            yield from self.prime(latent, strength, t0, new_vae, cmd.seq, laps, stats)
        else:
            yield from self.push(latent, strength, t0, cmd.seq, laps, stats)

    def _ahead(self, cmd: AheadCmd) -> None:
        """Frames of the next chunk before it is whole: uploaded, and through the encoder's per-frame
        blocks now, most of a chunk's encode (docs/ARCHITECTURE.md §8); `_chunk` finishes it."""
        host = self.host
        if self.vae_state is None:
            raise RuntimeError("frames ahead of a chunk come only after the stream's frame 0")
        with host.io.upload_stream():
            video = host.io.to_video_tensor(cmd.frames)
        lap = host.clock.lap()
        host.encoder.stream_encode_ahead(host.io.hand_over(video).to(host.dtype), self.vae_state)
        self.ahead.append(AheadFrames(pts=list(cmd.pts), video=video, lap=lap.stop()))

    def _frame0(self, cmd: ChunkCmd, video: torch.Tensor) -> Steps:
        """A fresh stream's frame 0, alone: encoded on arrival, held for
        the first chunk; every rank prepares that chunk's forward meanwhile (its fresh KV cache and, where
        the shape has run before, the priming forward as a CUDA graph). The chunk completes once that
        message has been round the ring."""
        host = self.host
        latent = host.encoder.stream_encode(video.to(host.dtype), self.vae_state).to(host.dtype)
        self.frame0 = FrameZero(frame=cmd.frames[0], pts=cmd.pts[0], video=video, latent=latent)
        yield Emit(M.PrepareFirstChunk(self.sid, 1 + CHUNK // 4, cmd.seq))

    def prime(self, latent: torch.Tensor, strength: float, t0: int, new_vae: bool, seq: int, laps: list,
               stats: dict) -> Steps:
        """The first chunk goes through every step in one row, one forward each."""
        frames, n = latent.shape[2], len(self.steps)
        x = strength * self.noise.draw(latent.shape, KeyedNoise.PRIME, 0, 0) + (1 - strength) * latent
        x = x.to(latent.dtype)
        ts = self.policy.prime_timesteps(t0, self.steps)
        for i, t in enumerate(ts):
            last = i + 1 == n
            decode = None
            if last:
                decode = self.in_flight.popleft()
            g = self._group(
                rows=1, frames=frames, positions=[0], t=[t], kv_tick=i == 0, new_batch=i == 0 and self.fresh,
                new_vae=i == 0 and new_vae, expand=n if last else 0,
                renoise=[] if last else [(0, ts[i + 1], (KeyedNoise.PRIME, 0, i + 1))],
                decode=decode, done=seq if last else None, stats=stats if last else {},
            )
            fid = yield Submit(g, x, laps if i == 0 else [])
            if not last:
                x = yield AwaitRows(fid)
        self.fresh = False
        self.primed = True
        lag = self.step_lag
        self.sources = deque([None] * lag)
        self.entered = deque([frames] * ((n - 1) * lag + 1), maxlen=(n - 1) * lag + 1)
        self.row_pos = [frames] * n
        self.next_pos = frames
        self.forwards = 0

    @property
    def step_lag(self) -> int:
        return self.host.opts.step_lag

    def push(self, latent: Optional[torch.Tensor], strength: float, t0: int, seq: Optional[int], laps: list,
              stats: dict) -> Steps:
        """One stream forward: a new chunk (None: pure noise, while draining) enters at the noisiest row, the
        cleanest leaves."""
        n = len(self.steps)
        h, w = self.latent_hw
        shape = (1, 16, 1, h, w)
        j = self.forwards
        eps = self.noise.draw(shape, KeyedNoise.STREAM, j, 0)
        new = eps if latent is None else strength * eps + (1 - strength) * latent
        pos = self.next_pos
        if pos >= self.host.defaults.rope_reset_frames:  # RoPE refresh: wrap to the last window slot
            pos = self.host.defaults.num_kv_cache - 1
        self.next_pos = pos + 1
        src = self.sources.popleft() if n > 1 else None
        if src is not None:
            tail = yield AwaitRows(src)
        else:  # filler rows while the stream starts (none with one step)
            tail = torch.zeros((n - 1, 16, 1, h, w), dtype=self.host.dtype, device=self.host.device)
        x = torch.cat([new.to(self.host.dtype), tail])
        self.entered.append(pos)
        self.row_pos = [self.entered[-1 - i * self.step_lag] for i in range(n)]
        ts = self.policy.stream_timesteps(t0, self.steps)
        self.forwards += 1
        decode = self.in_flight.popleft() if self.forwards > (n - 1) * self.step_lag else None
        g = self._group(
            rows=n, frames=1, positions=list(self.row_pos), t=ts, kv_tick=True,
            renoise=[(i, self.steps[i + 1], (KeyedNoise.STREAM, j, i + 1)) for i in range(n - 1)],
            decode=decode, done=seq, stats=stats,
        )
        fid = yield Submit(g, x, laps)
        if n > 1:
            self.sources.append(fid)

    def _drain(self) -> Steps:
        """Pure-noise chunks until every real chunk in flight has left (a reset keeps the frames they finish)."""
        if not self.primed:
            return
        while any(p is not None for p in self.in_flight):
            self.in_flight.append(None)
            yield from self.push(None, 1.0, self.last_t0, None, [], {})

    # -- live updates, at a chunk boundary -------------------------------------------------------------
    def _update(self, u: StreamUpdate, seq: int) -> Generator[Wait, Any, bool]:
        if u.reset:
            yield from self._drain()  # the chunks in flight leave first: every frame pushed comes out
            self._reset_stream()
            yield Emit(M.ResetStream(self.sid))
        if u.transition_chunks is not None:
            self.transition_chunks = u.transition_chunks
        if u.prompt is not None and u.prompt != self.prompt:
            try:
                context = self.host.embed_prompt(u.prompt)
            except Exception as exc:
                yield Failure(seq, f"{type(exc).__name__}: {exc}")
                yield Emit(M.CloseSession(self.sid))
                return False
            yield Emit(M.SetPrompt(self.sid, self.transition_chunks, context))
            self.prompt = u.prompt
        if u.seed is not None:
            self.seed = u.seed
            self.noise.seed = u.seed
        if u.noise_strength is not None:
            gap = self.controller_args["s_max"] - self.controller_args["s_min"]
            self.controller_args.update(s_max=u.noise_strength, s_min=max(0.0, u.noise_strength - gap))
            self.controller.s_max, self.controller.s_min = self.controller_args["s_max"], self.controller_args["s_min"]
        if u.motion_control is not None:
            self.controller_args["enabled"] = u.motion_control
            self.controller.enabled = u.motion_control
        if u.steps is not None and u.steps != self.steps_count:
            # finish the chunks in flight first so no frame is lost; the VAE stream goes on
            yield from self._drain()
            self.steps_count = u.steps
            self._new_batch()
            self.in_flight.clear()
        return True
