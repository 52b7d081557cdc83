"""One stream session: frames + pts in, generated frames + pts out (DESIGN §3, §5).

Everything that changes while streaming lives here (VAE caches, KV cache, rows in flight, noise
controller, RNG, prompt K/V); the engine's weights are shared read-only by all sessions.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from engine.noise_control import NoiseController
from engine.parallel.timing import Lap
from engine.stream_batch import KeyedNoise, StreamBatch
from interface.controls import StreamParams, StreamUpdate

if TYPE_CHECKING:
    from engine.runtime import StreamEngine

log = logging.getLogger(__name__)

OutputFrame = tuple[np.ndarray, int]
EarlyFrames = Callable[[list[OutputFrame]], None]
FIRST_CHUNK = 5  # the DiT's first chunk: 5 pixel frames -> 2 latent frames
CHUNK = 4  # then 4 -> 1


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
class _FrameZero:
    """A fresh stream's frame 0, encoded on arrival while frames 1-4 are still on their way (the VAE
    encodes frame 0 on its own anyway); the first chunk then takes only frames 1-4."""

    frame: np.ndarray
    pts: int
    video: torch.Tensor  # [1, 3, 1, H, W] in [-1, 1], for the noise controller
    latent: torch.Tensor  # [1, 16, 1, h, w]


class StreamSession:
    def __init__(self, engine: "StreamEngine", prompt: str, params: Optional[StreamParams] = None) -> None:
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
        self.frame0: Optional[_FrameZero] = None
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

        Returns the generated frames that are ready. With `early`, frames ready before the push ends are
        handed to it as soon as they reach the host (a fresh stream's first frame leaves while the
        rest of its first chunk is still being decoded) and are not returned again."""
        self._check_open()
        self._input.add(frames, pts)
        out: list[OutputFrame] = []
        early = early or out.extend
        while True:
            if self._updates:  # chunk boundary: a reset changes how many frames the next chunk takes
                out += self._apply_updates()
            got = self._input.take(self.chunk_frames)
            if got is None:
                break
            out += self._run_chunk(*got, early=early)
        return out

    def update(self, update: StreamUpdate) -> None:
        """Queue a live change; it is applied at the next chunk boundary."""
        self._check_open()
        self._updates.append(update)

    def take_finished(self) -> list[OutputFrame]:
        """Frames finished since the last push: none here, a push returns its own (the parallel
        engine's sessions finish chunks in the background)."""
        return []

    @torch.no_grad()
    def flush(self) -> list[OutputFrame]:
        """Drain the chunks in flight (the stream can go on afterwards). Leftover frames short of a
        chunk are padded with the last frame so that every input frame yields one output frame."""
        self._check_open()
        out: list[OutputFrame] = self._apply_updates() if self._updates else []
        rest = self._input.take_rest(self.chunk_frames)
        if rest is not None:
            out += [o for o in self._run_chunk(*rest, early=out.extend) if o[1] is not None]
        if self.frame0 is not None:  # frame 0 alone: pad its first chunk with copies of it
            pad = np.stack([self.frame0.frame] * CHUNK)
            out += [o for o in self._run_chunk(pad, [None] * CHUNK, early=out.extend) if o[1] is not None]
        out += self._drain()
        return out

    def close(self) -> None:
        self.closed = True
        self.batch = None  # free the KV cache now, not when the last reference goes
        self.vae_state = None
        self.dec_state = None
        self.frame0 = None

    # -- internals ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")

    def _reset_stream(self) -> None:
        if self.frame0 is not None:  # not generated yet: the new stream starts from it again
            self._input.frames.insert(0, self.frame0.frame)
            self._input.pts.insert(0, self.frame0.pts)
        self.frame0 = None
        self.vae_state = None  # None until frame 0 is encoded
        self.dec_state = None  # the decoder's stream (engine.decoder: Wan VAE or TAEHV), from the same chunk
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
        )

    def _apply_updates(self) -> list[OutputFrame]:
        out: list[OutputFrame] = []
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
                out += self._drain()
                self.steps = u.steps
                self.batch = self._new_batch()
                self._in_flight.clear()  # only padding chunks were left
        return out

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
        self.vae_state = e.vae.new_stream_state()
        self.dec_state = e.decoder.new_stream_state()
        video = e.to_video_tensor(frame)
        latent = e.vae.stream_encode(video.to(e.dtype), self.vae_state).to(e.dtype)
        self.frame0 = _FrameZero(frame=frame[0], pts=pts, video=video, latent=latent)
        enc = lap.stop().wait()
        self.stats = {"vae_encode_ms": enc.ms() or 0.0, "dit_ms": 0.0, "vae_decode_ms": 0.0}

    def _run_chunk(self, chunk: np.ndarray, pts: list, early: EarlyFrames) -> list[OutputFrame]:
        e = self.engine
        if self.vae_state is None:  # chunk_frames was 1
            self._encode_frame0(chunk, pts[0])
            return []
        out: list[OutputFrame] = []
        # stage times from device events, read once the chunk's frames are on the host: no host sync
        # between the stages, so the GPU never waits for the host to queue the next one
        lap = Lap(e.device)
        video = e.to_video_tensor(chunk)  # [1, 3, T, H, W] in [-1, 1]
        latent = e.vae.stream_encode(video.to(e.dtype), self.vae_state).to(e.dtype)
        f0, self.frame0 = self.frame0, None
        if f0 is not None:  # the DiT's first chunk: frame 0's latent and these 4 frames'
            video, latent, pts = torch.cat([f0.video, video], 2), torch.cat([f0.latent, latent], 2), [f0.pts, *pts]
        strength = self.controller.step(video[0])
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
        if x0 is not None:
            out += self._decode(x0, early)
        dec = lap.stop().wait()
        self.chunks_in += 1
        self.stats = {
            "vae_encode_ms": enc.ms() or 0.0,
            "dit_ms": dit.ms() or 0.0,
            "vae_decode_ms": dec.ms() or 0.0,
            "noise_strength": strength,
            "timestep": float(t0),
        }
        return out

    def _decode(self, x0: torch.Tensor, early: Optional[EarlyFrames] = None) -> list[OutputFrame]:
        pts = self._in_flight.popleft()
        if pts is None:  # a padding chunk from a drain: never decoded, so the VAE stream skips it
            return []
        e = self.engine
        parts = first_latent_apart(x0)
        if len(parts) == 1:
            frames = e.to_uint8(e.decoder.stream_decode(x0, self.dec_state))
            return [(f, p) for f, p in zip(frames, pts) if p is not None]
        # the first chunk: frame 0 goes out (to `early`) while the GPU decodes the rest; both decodes
        # are queued before waiting for the first
        first, rest = (e.to_uint8_later(e.decoder.stream_decode(p, self.dec_state)) for p in parts)
        out = [(first()[0], pts[0])] if pts[0] is not None else []
        if early is not None and out:
            early(out)
            out = []
        return out + [(f, p) for f, p in zip(rest(), pts[1:]) if p is not None]

    def _drain(self) -> list[OutputFrame]:
        """Push pure-noise chunks until every real chunk in flight has left the batch."""
        out: list[OutputFrame] = []
        if not self.batch.primed:
            return out
        while any(p is not None for p in self._in_flight):
            self._in_flight.append(None)
            x0 = self.batch.push(None, 1.0, self._last_t0, self._kv_now())
            if x0 is not None:
                out += self._decode(x0)
        return out
