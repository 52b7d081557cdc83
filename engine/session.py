"""One stream session: frames + pts in, generated frames + pts out (docs/ARCHITECTURE.md §3, §5).

Everything that changes while streaming lives here (VAE caches, KV cache, rows in flight, noise
controller, RNG, prompt K/V); the engine's weights are shared read-only by all sessions.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from engine.kv_policy import SessionPolicy, eviction_queues
from engine.noise_control import NoiseController
from engine.stream_batch import KeyedNoise, StreamBatch
from engine.timing import Lap
from engine.transfer import PendingFrames
from interface.controls import StreamParams, StreamUpdate
from interface.messages import EngineInfo

log = logging.getLogger(__name__)

OutputFrame = tuple[np.ndarray, int]
EarlyFrames = Callable[[list[OutputFrame]], None]
FIRST_CHUNK = 5  # the DiT's first chunk: 5 pixel frames -> 2 latent frames
CHUNK = 4  # then 4 -> 1
# A chunk's stats that time its stages on the device, in ms (FramesOut.stats; EngineInfo names them)
ENCODE_MS, DIT_MS, DECODE_MS = STAGE_STATS = ("vae_encode_ms", "dit_ms", "vae_decode_ms")
# Chunks whose frames may be on their way to the host while the next one is queued: a push returns once
# its chunk is queued, so the GPU goes from one chunk to the next without waiting for the host.
MAX_PENDING = 2


def engine_info(**facts: Any) -> EngineInfo:
    """What an engine (in process, or rank 0 of a ring) reports about itself, with the chunk facts that
    every engine shares: the server sizes its frame rings and budgets from them."""
    return EngineInfo(max_chunk_frames=FIRST_CHUNK, chunk_frames=CHUNK, stage_stats=STAGE_STATS, **facts)


def first_latent_apart(x0: torch.Tensor) -> list[torch.Tensor]:
    """A stream's first chunk decodes latent 0 (frame 0 alone) before the rest, so that frame 0 can
    leave early; every path decodes it so (same frames in process and on a pipeline's last rank: a
    decoder's numbers may depend on how many latents one call takes)."""
    return [x0[:, :, :1], x0[:, :, 1:]] if x0.shape[2] > 1 else [x0]


def check_frames(frames: np.ndarray, pts: Sequence[int], height: int, width: int) -> np.ndarray:
    """The input contract of push(): uint8 [T, height, width, 3] with one pts per frame."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != (height, width, 3) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, {height}, {width}, 3], got {frames.dtype} {list(frames.shape)}")
    if len(pts) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(pts)} pts")
    return frames


class ChunkBuffer:
    """push() input not yet cut into chunks, with its pts (shared by the in-process session and the
    pipeline-parallel coordinator)."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.frames: list[np.ndarray] = []
        self.pts: list[int] = []

    def add(self, frames: np.ndarray, pts: Sequence[int]) -> None:
        self.frames.extend(check_frames(frames, pts, self.height, self.width))
        self.pts.extend(int(p) for p in pts)

    def take(self, n: int) -> Optional[tuple[np.ndarray, list]]:
        """The next n frames and their pts, or None while fewer are buffered."""
        if len(self.frames) < n:
            return None
        chunk, pts = np.stack(self.frames[:n]), self.pts[:n]
        del self.frames[:n], self.pts[:n]
        return chunk, pts

    def take_rest(self, n: int) -> Optional[tuple[np.ndarray, list]]:
        """What is left (fewer than n frames) padded to n with the last frame, whose pts are None (the
        padding is computed, never output); None when nothing is left."""
        if not self.frames:
            return None
        short = n - len(self.frames)
        chunk = np.stack(self.frames + [self.frames[-1]] * short)
        pts: list = self.pts + [None] * short
        self.frames, self.pts = [], []
        return chunk, pts


@dataclass
class PromptBlend:
    """Cross-attention K/V moving from `old` to `new` over `chunks` chunks (prompt transition)."""

    old: list
    new: list
    chunks: int
    done: int = 0

    def current(self) -> list:
        a = min(1.0, (self.done + 1) / (self.chunks + 1))
        return [(ko.lerp(kn, a), vo.lerp(vn, a)) for (ko, vo), (kn, vn) in zip(self.old, self.new)]


@dataclass
class _Pending:
    """A chunk queued on the device: its frames (None while the stream batch fills) and stage laps."""

    frames: Optional[PendingFrames]
    pts: list
    laps: Optional[tuple[Lap, Lap, Lap]] = None  # VAE encode, DiT, decode: the chunk's stats
    extra: Optional[dict] = None

    def ready(self) -> bool:
        if self.frames is not None:
            return self.frames.ready()
        return self.laps is None or all(lap.ms() is not None for lap in self.laps)


@dataclass
class FrameZero:
    """A fresh stream's frame 0, encoded on arrival while frames 1-4 are still on their way (the VAE
    encodes frame 0 on its own anyway); the first chunk then takes only frames 1-4. Held by the
    in-process session and by the ring's driver alike."""

    frame: np.ndarray
    pts: int
    video: torch.Tensor  # [1, 3, 1, H, W] in [-1, 1], for the noise controller
    latent: torch.Tensor  # [1, 16, 1, h, w]


class StreamSession:
    def __init__(self, engine: Any, prompt: str, params: Optional[StreamParams] = None) -> None:
        """`engine` is the StreamEngine (engine.runtime) that opens it: its parts, defaults and host I/O."""
        self.engine = engine
        self.id = uuid.uuid4().hex[:12]
        self.params = params or StreamParams()
        d = engine.defaults
        self.steps = self.params.steps or d.steps
        self.transition_chunks = d.transition_chunks if self.params.transition_chunks is None else self.params.transition_chunks
        s_max = d.noise_strength if self.params.noise_strength is None else self.params.noise_strength
        self._controller_args = dict(
            s_max=s_max,
            s_min=max(0.0, s_max - (d.noise_strength - d.noise_strength_min)),
            sigma=d.motion_sigma,
            smoothing=d.motion_smoothing,
            enabled=self.params.motion_control,
        )
        self.prompt = prompt
        # Counter-based noise (see KeyedNoise): the seed, and the stream-batch count as its epoch.
        self._seed = self.params.seed
        self._noise_epoch = 0
        self.cross_kv = engine.prompt_kv(prompt)
        self.blend: Optional[PromptBlend] = None
        self._updates: list[StreamUpdate] = []
        self.stats: dict[str, float] = {}
        self.chunks_in = 0
        self.closed = False
        self._input = ChunkBuffer(engine.info.height, engine.info.width)
        self.frame0: Optional[FrameZero] = None
        # queued chunks, oldest first; a reset keeps them (they are finished frames of the old stream)
        self._pending: deque[_Pending] = deque()
        # the KV/schedule policy's state is the session's and outlives its restarts (engine/kv_policy.py)
        self.policy = SessionPolicy(d.kv_policy)
        self.queues = eviction_queues(d.kv_policy, d.num_sink, d.num_kv_cache, d.sink_refresh_threshold)
        self._reset_stream()

    # -- public API ---------------------------------------------------------------------------------
    @property
    def chunk_frames(self) -> int:
        """How many frames the next push should bring: a fresh stream's frame 0 alone (it is encoded on
        arrival), then chunks of 4 (the first of them completes the DiT's 5-frame first chunk)."""
        return 1 if self.vae_state is None else CHUNK

    @torch.no_grad()
    def push(self, frames: np.ndarray, pts: Sequence[int], early: Optional[EarlyFrames] = None) -> list[OutputFrame]:
        """frames uint8 [T, H, W, 3] at the engine's size, with one pts each; any T (buffered).

        Returns the generated frames that are ready, in order: on CUDA the push queues its chunks and
        returns without waiting for them, so a chunk's frames usually come with a later push or from
        take_finished(); flush() waits for all. With `early`, a fresh stream's first frame is handed
        to it as soon as it reaches the host (with any frames before it), while the rest of its
        first chunk is still being decoded, and is not returned again."""
        self._check_open()
        self._input.add(frames, pts)
        out: list[OutputFrame] = []

        def ahead(frames: list[OutputFrame]) -> None:
            # frames collected earlier in this push leave first: the order never changes
            if early is None:
                out.extend(frames)
            else:
                early(out + frames)
                out.clear()

        while True:
            if self._updates:  # chunk boundary: a reset changes how many frames the next chunk takes
                self._apply_updates()
            got = self._input.take(self.chunk_frames)
            if got is None:
                break
            out += self._run_chunk(*got, early=ahead)
        return out + self._collect()

    def update(self, update: StreamUpdate) -> None:
        """Queue a live change; it is applied at the next chunk boundary."""
        self._check_open()
        self._updates.append(update)

    def take_finished(self) -> list[OutputFrame]:
        """Frames of chunks that finished since the last push or call, in order (never waits)."""
        return [] if self.closed else self._collect()

    @torch.no_grad()
    def flush(self) -> list[OutputFrame]:
        """Drain the chunks in flight (the stream can go on afterwards). Leftover frames short of a
        chunk are padded with the last frame so that every input frame yields one output frame."""
        self._check_open()
        if self._updates:
            self._apply_updates()
        out: list[OutputFrame] = []
        rest = self._input.take_rest(self.chunk_frames)
        if rest is not None:
            out += self._run_chunk(*rest, early=out.extend)
        if self.frame0 is not None:  # frame 0 alone: pad its first chunk with copies of it
            pad = np.stack([self.frame0.frame] * CHUNK)
            out += self._run_chunk(pad, [None] * CHUNK, early=out.extend)
        self._drain()
        return out + self._collect(keep=0)

    def close(self) -> None:
        self.closed = True
        self.batch = None  # free the KV cache now, not when the last reference goes
        self.vae_state = None
        self.dec_state = None
        self.frame0 = None
        self._pending.clear()

    # -- internals ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")

    def _reset_stream(self) -> None:
        if self.frame0 is not None:  # not generated yet: the new stream starts from it again
            self._input.frames.insert(0, self.frame0.frame)
            self._input.pts.insert(0, self.frame0.pts)
        self.frame0 = None
        self.vae_state = None  # the encoder's stream (engine.encoder: Wan VAE, TAEHV or LightVAE); None until frame 0 is encoded
        self.dec_state = None  # the decoder's stream (engine.decoder, likewise), from the same chunk
        self.batch = self._new_batch()
        self.controller = NoiseController(**self._controller_args)
        self._in_flight: deque[Optional[list]] = deque()
        self._last_t0 = NoiseController.timestep(self.controller.s_max)

    def _new_batch(self) -> StreamBatch:
        e, d = self.engine, self.engine.defaults
        noise = KeyedNoise(self._seed, self._noise_epoch, e.device, e.dtype)
        self._noise_epoch += 1
        return StreamBatch(
            dit=e.dit,
            rope=e.rope,
            steps=self.steps,
            window=d.num_kv_cache,
            num_sink=d.num_sink,
            sink_threshold=d.sink_refresh_threshold,
            rope_reset=d.rope_reset_frames,
            latent_hw=(e.info.height // 8, e.info.width // 8),
            noise=noise,
            step_lag=e.options.step_lag,
            warm_shapes=e.warm_shapes,
            policy=self.policy,
            queues=self.queues,
        )

    def _apply_updates(self) -> None:
        """The queued live changes, at a chunk boundary (frames they finish are queued, see _collect)."""
        updates, self._updates = self._updates, []
        for u in updates:
            if u.reset:
                self._reset_stream()
                self.blend = None
            if u.transition_chunks is not None:
                self.transition_chunks = u.transition_chunks
            if u.prompt is not None and u.prompt != self.prompt:
                new = self.engine.prompt_kv(u.prompt)
                old = self.blend.current() if self.blend else self.cross_kv
                self.blend = PromptBlend(old, new, self.transition_chunks) if self.transition_chunks > 0 else None
                self.cross_kv, self.prompt = new, u.prompt
            if u.seed is not None:
                self._seed = u.seed
                self.batch.noise.seed = u.seed  # type: ignore[union-attr]
            if u.noise_strength is not None:
                gap = self._controller_args["s_max"] - self._controller_args["s_min"]
                self._controller_args.update(s_max=u.noise_strength, s_min=max(0.0, u.noise_strength - gap))
                self.controller.s_max, self.controller.s_min = self._controller_args["s_max"], self._controller_args["s_min"]
            if u.motion_control is not None:
                self._controller_args["enabled"] = u.motion_control
                self.controller.enabled = u.motion_control
            if u.steps is not None and u.steps != self.steps:
                # A new row count needs a new stream batch: finish the chunks in flight first so no
                # frame is lost, then the next chunk primes the new batch on the same VAE stream.
                self._drain()
                self.steps = u.steps
                self.batch = self._new_batch()
                self._in_flight.clear()  # only padding chunks were left

    def _kv_now(self) -> list:
        if self.blend is None:
            return self.cross_kv
        kv = self.blend.current()
        self.blend.done += 1
        if self.blend.done >= self.blend.chunks:
            self.blend = None
        return kv

    def _encode_frame0(self, frame: np.ndarray, pts: int) -> None:
        e = self.engine
        lap = Lap(e.device)
        self.vae_state = e.encoder.new_stream_state()
        self.dec_state = e.decoder.new_stream_state()
        video = e.to_video_tensor(frame)
        latent = e.encoder.stream_encode(video.to(e.dtype), self.vae_state).to(e.dtype)
        self.frame0 = FrameZero(frame=frame[0], pts=pts, video=video, latent=latent)
        enc = lap.stop()
        # while frames 1-4 are on their way: the first chunk's DiT forward as a CUDA graph (its latents:
        # frame 0's and one per 4 frames after it)
        first = (1, latent.shape[1], 1 + CHUNK // 4, *latent.shape[3:])
        self.batch.runner.prepare_prime(first, self.cross_kv)
        enc.wait()
        self.stats = {ENCODE_MS: enc.ms() or 0.0, DIT_MS: 0.0, DECODE_MS: 0.0}

    def _run_chunk(self, chunk: np.ndarray, pts: list, early: EarlyFrames) -> list[OutputFrame]:
        """Queue one chunk; returns frames of earlier chunks collected on the way (at most MAX_PENDING
        chunks stay queued)."""
        e = self.engine
        if self.vae_state is None:  # chunk_frames was 1
            self._encode_frame0(chunk, pts[0])
            return []
        # a first chunk collects everything before its frame 0 goes out (see _decode)
        out = self._collect(keep=MAX_PENDING - 1) if self.frame0 is None else []
        # stage times from device events, read once the chunk's frames are on the host: no host sync
        # between the stages, so the GPU never waits for the host to queue the next one
        lap = Lap(e.device)
        video = e.to_video_tensor(chunk)  # [1, 3, T, H, W] in [-1, 1]
        f0, self.frame0 = self.frame0, None
        # the DiT's first chunk holds frame 0 too: its video for the motion measure, its latent below
        full = video if f0 is None else torch.cat([f0.video, video], 2)
        strength_later = self.controller.queue_step(full[0])  # queued before the encode, read after it
        latent = e.encoder.stream_encode(video.to(e.dtype), self.vae_state).to(e.dtype)
        if f0 is not None:
            latent, pts = torch.cat([f0.latent, latent], 2), [f0.pts, *pts]
        strength = strength_later()
        t0 = NoiseController.timestep(strength)
        self._last_t0 = t0
        enc, lap = lap.stop(), Lap(e.device)
        kv = self._kv_now()
        self._in_flight.append(pts)
        if not self.batch.primed:
            x0: Optional[torch.Tensor] = self.batch.prime(latent, strength, t0, kv)
        else:
            x0 = self.batch.push(latent, strength, t0, kv)
        dit, lap = lap.stop(), Lap(e.device)
        extra = {"noise_strength": strength, "timestep": float(t0)}
        if x0 is None:
            self._pending.append(_Pending(None, [], (enc, dit, lap.stop()), extra))
        else:
            self._decode(x0, early, (enc, dit, lap), extra)
        self.chunks_in += 1
        return out

    def _decode(self, x0: torch.Tensor, early: Optional[EarlyFrames] = None,
                laps: Optional[tuple[Lap, Lap, Lap]] = None, extra: Optional[dict] = None) -> None:
        """Queue the decode of a chunk leaving the stream batch (`laps`' last one is stopped here)."""
        pts = self._in_flight.popleft()
        if pts is None:  # a padding chunk from a drain: never decoded, so the VAE stream skips it
            return
        e = self.engine
        parts = first_latent_apart(x0)
        pending = [e.to_uint8_later(e.decoder.stream_decode(p, self.dec_state)) for p in parts]
        if laps is not None:
            laps[2].stop()
        if len(parts) == 1:
            self._pending.append(_Pending(pending[0], pts, laps, extra))
            return
        # the first chunk: frame 0 goes out (to `early`, after every frame before it) while the GPU
        # decodes the rest; both decodes are queued before waiting for the first
        first, rest = pending
        if early is not None and pts[0] is not None:
            ahead = self._collect(keep=0)
            early(ahead + [(first.result()[0], pts[0])])
            self._pending.append(_Pending(rest, pts[1:], laps, extra))
            return
        self._pending.append(_Pending(first, pts[:1]))
        self._pending.append(_Pending(rest, pts[1:], laps, extra))

    def _collect(self, keep: Optional[int] = None) -> list[OutputFrame]:
        """Frames of the queued chunks that are ready, oldest first, without waiting; with `keep`, waits
        for the oldest until at most `keep` chunks are left queued."""
        out: list[OutputFrame] = []
        while self._pending and ((keep is not None and len(self._pending) > keep) or self._pending[0].ready()):
            p = self._pending.popleft()
            if p.frames is not None:
                out += [(f, t) for f, t in zip(p.frames.result(), p.pts) if t is not None]
            if p.laps is not None:
                enc, dit, dec = (lap.wait().ms() or 0.0 for lap in p.laps)
                self.stats = {ENCODE_MS: enc, DIT_MS: dit, DECODE_MS: dec, **(p.extra or {})}
        return out

    def _drain(self) -> None:
        """Push pure-noise chunks until every real chunk in flight has left the batch (their frames
        are queued: _collect gives them)."""
        if not self.batch.primed:
            return
        while any(p is not None for p in self._in_flight):
            self._in_flight.append(None)
            x0 = self.batch.push(None, 1.0, self._last_t0, self._kv_now())
            if x0 is not None:
                self._decode(x0)
