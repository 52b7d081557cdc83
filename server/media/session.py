"""One WebRTC session: camera in, chunks to the engine, paced generated video out, live controls
over the `control` data channel, stats pushed back once a second."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack
from av import VideoFrame
from pydantic import BaseModel, ValidationError

from interface.controls import StreamParams, StreamUpdate
from interface.frame_ring import FrameRing, StaleSlot
from interface.messages import FramesOut, OpenSession, PushFrames, SessionError, UpdateSession
from server.config import ServerConfig
from server.outputs.egress import SessionEgress
from server.media.engine_client import EngineClient, EngineUnavailable
from server.errors import validation_details
from server.http import parse_json
from interface.imaging import to_model_rgb
from server.media.imaging import output_size, to_output_frame
from server.media.jitter_buffer import install_for_track
from server.ops.metrics import ServerMetrics, SessionMetrics
from server.media.controls import ControlRejected, RateLimiter, merge_updates
from server.media.pacing import CLOCK_RATE, PtsPacer
from server.media.sampling import ChunkSampler
from server.schemas import ChannelAck, ChannelError, FrameTimes, SessionInfo, SessionKind, SessionState, Size
from server.media.tasks import BackgroundTasks
from server.media.tracks import GeneratedVideoTrack, drain

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "control"
# Buffers in units of the largest push the engine takes (EngineInfo.max_chunk_frames):
INPUT_CHUNKS = 2  # one chunk in flight per session; room to spare
OUTPUT_CHUNKS = 4  # a steps change can drain several chunks in one reply
PENDING_CHUNKS = 3  # camera frames kept while the engine is busy
REMEMBERED_PTS = 256  # input frames whose output has not left yet


def chunk_cost_s(reply: FramesOut, stage_stats: Sequence[str]) -> float:
    """Engine time one chunk of a session costs, from a push's reply: its wall time in the engine, or the
    chunk's GPU stage times (`stage_stats`: EngineInfo's) where more (a CUDA engine's push returns once its
    chunk is queued)."""
    gpu_ms = sum(reply.stats.get(k, 0.0) for k in stage_stats)
    return max(reply.engine_ms, gpu_ms) / 1000.0


@dataclass
class SessionContext:
    """What a session needs from the app; passed in so sessions hold no global state."""

    config: ServerConfig
    engine: EngineClient
    metrics: ServerMetrics
    on_closed: Callable[["Session"], None]


@dataclass
class _Arrival:
    frame: VideoFrame
    pts: int
    arrived_at: float
    # the frame at the model's size, scaled on arrival: a chunk then waits only for its last frame's scaling
    rgb: "asyncio.Future[np.ndarray]"


@dataclass
class _InputMeta:
    arrived_at: float
    width: int
    height: int
    # When the frame passed each later stage (monotonic seconds), for the latency breakdown:
    pushed_at: Optional[float] = None  # its chunk went to the engine
    returned_at: Optional[float] = None  # its generated frame came back
    delivered_at: Optional[float] = None  # handed to the paced track

    def times(self, pts: int, sent_at: float) -> Optional[FrameTimes]:
        if self.pushed_at is None or self.returned_at is None or self.delivered_at is None:
            return None
        return FrameTimes(pts=pts, arrived=self.arrived_at, pushed=self.pushed_at, returned=self.returned_at,
                          delivered=self.delivered_at, sent=sent_at)


class Session:
    def __init__(
        self,
        session_id: str,
        ctx: SessionContext,
        pc: RTCPeerConnection,
        prompt: str,
        params: Optional[StreamParams],
        clock: Callable[[], float] = time.monotonic,
        kind: SessionKind = "browser",
    ) -> None:
        if ctx.engine.info is None:
            raise EngineUnavailable("engine is not ready")
        self.id = session_id
        self.kind = kind  # browser: the output goes back on the same connection; whip: publish only
        self.etag = f'"{uuid.uuid4().hex}"'  # RFC 9725: the ICE session's entity tag
        self.pc = pc
        self.prompt = prompt
        self.params = params or StreamParams()
        self.state: SessionState = "connecting"
        self.error: Optional[str] = None
        self.created_at = time.time()
        self._ctx = ctx
        self._clock = clock
        self._engine_info = info = ctx.engine.info
        self._model_w, self._model_h = info.width, info.height
        self.metrics = SessionMetrics(session_id, ctx.metrics, ctx.config.deadline_s, clock, info.stage_stats)
        self.output_track = GeneratedVideoTrack(
            PtsPacer(CLOCK_RATE, window_s=ctx.config.pacing_window_s, jitter_percentile=ctx.config.pacing_percentile),
            self._on_sent, lambda n: self.metrics.drop("late", n), clock
        )
        self.egress = SessionEgress(session_id, self.output_track)
        self._sampler: ChunkSampler[_Arrival] = ChunkSampler(PENDING_CHUNKS * info.max_chunk_frames)
        self._inputs: OrderedDict[int, _InputMeta] = OrderedDict()
        self._last_pts = -1
        self._chunk_frames = info.max_chunk_frames
        self._busy = False  # a push is with the engine: frames wait in the sampler
        self._pushed_at = 0.0
        self._pushed_completes = False  # the push with the engine completes a chunk (or is a fresh frame 0)
        self._pushed_chunk = False  # ... a chunk of 4, not frame 0 alone
        # the frames of the next chunk pushed ahead of it (--encode-ahead): its push marks them pushed
        self._ahead: list[int] = []
        self._pending_update: Optional[StreamUpdate] = None
        self._input_ring: Optional[FrameRing] = None
        self._output_ring: Optional[FrameRing] = None
        self._engine_open = False  # chunks may be pushed
        self._engine_held = False
        self._closed = False
        self._close_done = asyncio.Event()
        self._has_video = False
        self._channel: Optional[RTCDataChannel] = None
        self._camera_size: Optional[tuple[int, int]] = None
        self._output_size: Optional[tuple[int, int]] = None
        self._outputs: asyncio.Queue[list[tuple[np.ndarray, int]]] = asyncio.Queue()
        self._tasks = BackgroundTasks(self._task_failed)
        self._controls = RateLimiter(ctx.config.control_rate, ctx.config.control_burst, clock)
        self._opened_at = clock()
        self._last_input = self._opened_at
        self._answered = False  # the idle clock runs only once the client has our answer
        self.engine_chunk_s: Optional[float] = None  # engine time of a chunk (smoothed): admission control
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)

    # -- lifecycle --------------------------------------------------------------------------------------
    @property
    def has_video(self) -> bool:
        return self._has_video

    @property
    def closed(self) -> bool:
        return self._closed

    async def open_engine(self) -> None:
        """Create this session's frame rings and its engine-side session."""
        h, w = self._model_h, self._model_w
        chunk = self._engine_info.max_chunk_frames
        self._input_ring = FrameRing.create(INPUT_CHUNKS * chunk, h, w)
        self._output_ring = FrameRing.create(OUTPUT_CHUNKS * chunk, h, w)
        request = OpenSession(
            session_id=self.id,
            prompt=self.prompt,
            params=self.params,
            input_ring=self._input_ring.name,
            output_ring=self._output_ring.name,
        )
        self._engine_held = True  # from now on the engine may hold state for us: close() releases it
        opened = await self._ctx.engine.open_session(request, handler=self)
        self._chunk_frames = opened.chunk_frames
        self._engine_open = True
        self.egress.start()
        self._spawn(self._output_loop())
        self._spawn(self._stats_loop())
        self._spawn(self._watchdog())

    async def close(self, reason: Optional[str] = None, failed: bool = False) -> None:
        if self._closed:
            await self._close_done.wait()  # a close already under way: return when it is over
            return
        self._closed = True
        self.state = "failed" if failed else "closed"
        self.error = reason
        if failed:
            self._ctx.metrics.session_errors.inc()
            log.warning("session %s failed: %s", self.id, reason)
        else:
            log.info("session %s closed%s", self.id, f": {reason}" if reason else "")
        self._tasks.cancel_all()
        self.output_track.stop()
        await self.egress.close()  # viewers disconnected, recordings finished
        try:
            await self.pc.close()
        except Exception:
            log.exception("session %s: closing the peer connection failed", self.id)
        self._engine_open = False
        if self._engine_held:  # also after a failed or timed-out open, which the engine may finish late
            self._engine_held = False
            await self._ctx.engine.close_session(self.id)
        for ring in (self._input_ring, self._output_ring):
            if ring is not None:
                ring.close()
                ring.unlink()
        self._input_ring = self._output_ring = None
        self._ctx.on_closed(self)
        self._close_done.set()

    def _spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro)

    def _task_failed(self, exc: BaseException) -> None:
        log.error("session %s: task failed", self.id, exc_info=exc)
        if not self._closed:
            self._spawn(self.close(f"internal error: {exc}", failed=True))

    # -- WebRTC events ----------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and not self._has_video:
            self._has_video = True
            if install_for_track(self.pc, track) is not None:  # frames reach us a frame interval sooner
                log.info("session %s: the camera's receiver completes frames on the RTP marker bit", self.id)
            if self.kind == "browser":
                self.pc.addTrack(self.egress.sender_track())  # answers on the camera's transceiver (sendrecv)
            self._spawn(drain(track, self._on_camera_frame))
        else:
            # Audio (OBS sends Opus) and any extra video: accepted, received, discarded.
            self._spawn(drain(track, lambda frame: None))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != CONTROL_CHANNEL:
            log.info("session %s: ignoring data channel %r", self.id, channel.label)
            return
        self._channel = channel
        channel.on("message", self._on_channel_message)

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("session %s: connection %s", self.id, state)
        if state in ("failed", "closed"):
            await self.close(f"connection {state}", failed=state == "failed")

    # -- camera -> engine -------------------------------------------------------------------------------
    def _on_camera_frame(self, frame: VideoFrame) -> None:
        if self._closed:
            return
        now = self._clock()
        self._last_input = now
        self.metrics.input_arrived(now)
        self._camera_size = (frame.width, frame.height)
        if self.state == "connecting":
            self.state = "streaming"
        rgb = asyncio.get_running_loop().run_in_executor(None, to_model_rgb, frame, self._model_w, self._model_h)
        arrival = _Arrival(frame, self._next_pts(frame), now, rgb)
        self.metrics.drop("input", self._sampler.add(arrival))
        self._maybe_submit()

    def _next_pts(self, frame: VideoFrame) -> int:
        """The frame's pts in the 90 kHz clock, forced to increase (latency is matched by pts)."""
        pts = self._last_pts + 1
        if frame.pts is not None and frame.time_base is not None:
            pts = max(pts, int(frame.pts * frame.time_base * CLOCK_RATE))
        self._last_pts = pts
        return pts

    def _maybe_submit(self) -> None:
        """At a chunk boundary (engine free, enough frames), send evenly spaced frames. With encode ahead,
        send the frames that wait as soon as the engine is free, up to what completes its next chunk."""
        need = self._chunk_frames  # what completes the engine's next chunk
        have = len(self._sampler)
        ahead = self._ctx.config.encode_ahead
        if self._closed or not self._engine_open or self._busy or have < (1 if ahead else need):
            return
        chosen, skipped = self._sampler.take(min(have, need))
        self.metrics.drop("input", skipped)
        self._busy = True
        self._spawn(self._submit(chosen, completes=len(chosen) == need))

    async def _submit(self, chosen: list[_Arrival], completes: bool) -> None:
        try:
            frames = [await a.rgb for a in chosen]
            ring = self._input_ring
            if self._closed or ring is None:
                return
            first_seq = ring.write_seq
            for arrival, rgb in zip(chosen, frames):
                ring.write(rgb, arrival.pts)
                self._remember(arrival)
            self._flush_update()
            self._pushed_at = self._clock()
            # frame 0 of a fresh stream comes alone; a chunk's frames before its last came ahead
            self._pushed_completes = completes
            self._pushed_chunk = completes and (len(chosen) > 1 or bool(self._ahead))
            self._ahead.extend(a.pts for a in chosen)
            if completes:  # the chunk's fill ends here: its frames count as pushed now (the breakdown)
                for pts in self._ahead:
                    if (meta := self._inputs.get(pts)) is not None:
                        meta.pushed_at = self._pushed_at
                self._ahead = []
            self._ctx.engine.send(PushFrames(session_id=self.id, first_seq=first_seq, count=len(chosen)))
            self.metrics.pushes += 1
        except EngineUnavailable as exc:
            await self.close(f"engine unavailable: {exc}", failed=True)

    def _remember(self, arrival: _Arrival) -> None:
        self._inputs[arrival.pts] = _InputMeta(arrival.arrived_at, arrival.frame.width, arrival.frame.height)
        while len(self._inputs) > REMEMBERED_PTS:
            self._inputs.popitem(last=False)

    # -- engine -> output -------------------------------------------------------------------------------
    def on_engine_message(self, message: FramesOut | SessionError) -> None:
        if self._closed:
            return
        if isinstance(message, SessionError):
            if message.request == "push":
                self._busy = False
            if message.fatal:
                self._engine_open = False
                self._spawn(self.close(f"engine: {message.message}", failed=True))
            else:
                log.warning("session %s: engine %s failed: %s", self.id, message.request, message.message)
                self._send_channel(ChannelError(error=f"engine {message.request} failed: {message.message}"))
            return
        if message.partial:  # frames ahead of the push's reply (a fresh stream's first frame)
            self.metrics.drop("engine", message.dropped)
            self._queue_outputs(self._read_outputs(message))
            return
        roundtrip = self._clock() - self._pushed_at
        self._busy = False
        if self._pushed_chunk:  # frame 0 alone, or frames ahead of their chunk, are not a chunk's cost
            cost = chunk_cost_s(message, self._engine_info.stage_stats)  # the engine serves chunks one at a time: sessions add up
            self.engine_chunk_s = cost if self.engine_chunk_s is None else 0.7 * self.engine_chunk_s + 0.3 * cost
        if self._pushed_completes:
            self.metrics.engine_chunk(message.stats, roundtrip, message.prompt, message.updates_applied)
        self._chunk_frames = message.chunk_frames
        self.metrics.drop("engine", message.dropped)
        self._queue_outputs(self._read_outputs(message))
        self._maybe_submit()  # frames that came in meanwhile may already fill the next chunk

    def _queue_outputs(self, outputs: list[tuple[np.ndarray, int]]) -> None:
        if not outputs:
            return
        now = self._clock()
        for _, pts in outputs:
            if (meta := self._inputs.get(pts)) is not None:
                meta.returned_at = now
        self._outputs.put_nowait(outputs)

    def _read_outputs(self, message: FramesOut) -> list[tuple[np.ndarray, int]]:
        ring = self._output_ring
        if ring is None:
            return []
        outputs = []
        for i, expected_pts in enumerate(message.pts):
            try:
                frame, pts = ring.read(message.first_seq + i)
            except StaleSlot as exc:
                log.error("session %s: %s", self.id, exc)
                self.metrics.drop("engine")
                continue
            if pts != expected_pts:
                self.metrics.drop("engine")
                continue
            outputs.append((frame, pts))
        if message.count:
            ring.release(message.first_seq + message.count)
        return outputs

    async def _output_loop(self) -> None:
        """Scale generated frames back to the output size and hand them to the paced track, in order."""
        loop = asyncio.get_running_loop()
        mode = self._ctx.config.output_size
        while True:
            # one at a time: a burst's first frame is due first, and need not wait for the others' scaling
            for rgb, pts in await self._outputs.get():
                meta = self._inputs.get(pts)
                if meta is None:  # not a frame this session sent (or long forgotten): never show it
                    self.metrics.drop("engine")
                    continue
                w, h = output_size(mode, meta.width, meta.height, self._model_w, self._model_h)
                frame = await loop.run_in_executor(None, to_output_frame, rgb, w, h)
                self._output_size = (w, h)
                meta.delivered_at = self._clock()
                self.output_track.deliver([(pts, frame)])

    def _on_sent(self, pts: int, now: float) -> None:
        meta = self._inputs.get(pts)
        # Forget this pts and all older ones: older frames still unsent were dropped.
        while self._inputs:
            oldest = next(iter(self._inputs))
            if oldest > pts:
                break
            del self._inputs[oldest]
        if meta is not None:
            self.metrics.output_sent(meta.arrived_at, now, meta.times(pts, now))

    # -- controls ---------------------------------------------------------------------------------------
    def apply_update(self, update: StreamUpdate) -> dict[str, Any]:
        """Apply a live change at the next chunk boundary; returns what was applied."""
        if self._closed:
            raise EngineUnavailable("session is closed")
        if not self._controls.allow():
            raise ControlRejected(429, f"too many control messages (at most {self._ctx.config.control_rate:g} per second)")
        if update.prompt is not None and len(update.prompt) > self._ctx.config.max_prompt_chars:
            raise ControlRejected(422, f"the prompt is longer than {self._ctx.config.max_prompt_chars} characters")
        fields = {k: v for k, v in update.model_dump(exclude_none=True).items() if k in StreamParams.model_fields}
        self.params = self.params.model_copy(update=fields)
        if update.prompt is not None:
            self.prompt = update.prompt
        self._pending_update = merge_updates(self._pending_update, update)
        if not self._busy:
            self._flush_update()  # otherwise it goes with the next chunk
        return update.model_dump(exclude_defaults=True)  # the fields that were set

    def _flush_update(self) -> None:
        if self._pending_update is not None and self._engine_open:
            update, self._pending_update = self._pending_update, None
            self._ctx.engine.send(UpdateSession(session_id=self.id, update=update))

    def _on_channel_message(self, message: object) -> None:
        if not isinstance(message, str):
            self._send_channel(ChannelError(error="control messages are JSON text"))
            return
        try:
            data = parse_json(message)
        except ValueError as exc:
            self._send_channel(ChannelError(error=f"not JSON: {exc}"))
            return
        if isinstance(data, dict) and data.get("type") == "update":  # optional envelope
            data = {k: v for k, v in data.items() if k != "type"}
        try:
            update = StreamUpdate.model_validate(data)
        except ValidationError as exc:
            self._send_channel(ChannelError(error="invalid control message", details=validation_details(exc)))
            return
        try:
            applied = self.apply_update(update)
        except EngineUnavailable as exc:
            self._send_channel(ChannelError(error=str(exc)))
            return
        except ControlRejected as exc:
            self._send_channel(ChannelError(error=exc.message))
            return
        self._send_channel(ChannelAck(applied=applied))

    def _send_channel(self, message: BaseModel) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(message.model_dump_json())

    async def _watchdog(self) -> None:
        """Close a session whose input stopped (a vanished client: closed tab, lost network, whose
        ICE failure aiortc may notice only much later) or that ran past the longest allowed."""
        config = self._ctx.config
        while True:
            await asyncio.sleep(min(1.0, config.idle_timeout_s / 4))
            now = self._clock()
            if self._answered and now - self._last_input > config.idle_timeout_s:
                await self.close(f"no input for {config.idle_timeout_s:g} s", failed=True)
                return
            if config.max_session_s is not None and now - self._opened_at > config.max_session_s:
                await self.close(f"the session reached its maximum length of {config.max_session_s:g} s")
                return

    def answered(self) -> None:
        """The client has our answer: its input can start only now. Gathering ICE candidates for the
        answer can take seconds (aioice waits up to 5 s for a STUN server), which must not count as idle."""
        self._answered = True
        self._last_input = self._clock()

    async def _stats_loop(self) -> None:
        interval = self._ctx.config.stats_interval_s
        while True:
            await asyncio.sleep(interval)
            self._send_channel(self.metrics.snapshot())

    # -- engine loss / info -----------------------------------------------------------------------------
    def on_engine_lost(self, reason: str) -> None:
        self._engine_open = self._engine_held = False
        self._spawn(self.close(f"engine lost: {reason}", failed=True))

    @property
    def chunk_budget_s(self) -> float:
        """Time between two chunks of this session at the target frame rate (a steady chunk's at least:
        a fresh stream's frame-0 push is not a chunk, and its 1/fps must not tighten admission)."""
        return max(self._chunk_frames, self._engine_info.chunk_frames) / self._ctx.config.target_fps

    def info(self, with_frames: bool = False) -> SessionInfo:
        """with_frames: the stats carry the newest frames' stage times (GET /api/sessions/{id})."""
        return SessionInfo(
            session_id=self.id,
            kind=self.kind,
            state=self.state,
            created_at=self.created_at,
            prompt=self.prompt,
            params=self.params,
            camera=Size(width=self._camera_size[0], height=self._camera_size[1]) if self._camera_size else None,
            output=Size(width=self._output_size[0], height=self._output_size[1]) if self._output_size else None,
            error=self.error,
            stats=self.metrics.snapshot(with_frames),
            viewers=len(self.egress.viewers),
            viewers_connecting=len(self.egress.pending_viewers()),
            outputs=[o.info() for o in self.egress.outputs.values()],
        )
