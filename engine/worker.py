"""Engine process entry point: one StreamEngine serving many sessions for the server.

The server spawns `main` (multiprocessing 'spawn', by module path: interface.process) with one end of a
Pipe. Requests and replies
are `interface.messages` dicts; frames travel through per-session shared-memory rings that the
server creates. Requests are served one at a time, in arrival order, which interleaves sessions
fairly because the server keeps at most one chunk per session in flight. A failing request
answers SessionError for its session and the loop goes on serving the others.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from pydantic import BaseModel, ValidationError

from engine.build import EngineOptions
from engine.config import load_model_config
from engine.parallel.devices import parse_devices
from engine.errors import EngineFailure
from engine.protocol import RingStats
from engine.runtime import StreamEngine
from interface.frame_ring import FrameRing
from interface.catalogue import CODEC_NAMES, ConfigError
from interface.pauses import GcPauses, freeze_startup_objects
from interface.messages import (
    CloseSession,
    EngineFailed,
    EngineInfo,
    EngineReady,
    FramesOut,
    OpenSession,
    PipelineStats,
    PushFrames,
    RankStage,
    SessionClosed,
    SessionError,
    SessionOpened,
    Shutdown,
    ToEngine,
    UpdateSession,
    WorkerOptions,
    decode_to_engine,
    encode,
)

log = logging.getLogger("engine.worker")

# Between requests, how often the loop looks for frames an engine finished after a push returned (CUDA
# and pipeline-parallel engines): they leave at once instead of with the session's next push's reply.
OUTPUT_POLL_S = 0.002
# How often a pipeline-parallel engine's state may go to the server (only when it changed).
PIPELINE_STATS_S = 1.0

TEST_DELAY_ENV = "STREAMGEN_TEST_CHUNK_DELAY_S"


@dataclass
class _Session:
    stream: Any  # engine.session.Session
    input_ring: FrameRing
    output_ring: FrameRing
    prompt: str
    updates_applied: int = 0
    # the output ring's next slot to announce: the engine writes frames before the worker learns of
    # them, so the ring's write_seq may already be ahead of what the server was told
    announced: int = 0
    # a push not answered yet, and when it came: its reply goes once the engine has room for the next
    # chunk (the server sends a session's next chunk only after it), so the loop never waits on one session
    reply_due: Optional[float] = None

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self.input_ring.close()
            self.output_ring.close()


class Worker:
    """The request loop. Owns every engine-side session; nothing here is global."""

    def __init__(self, engine: Any, conn: Connection, chunk_delay_s: float = 0.0) -> None:
        self._engine = engine
        self._conn = conn
        self._chunk_delay_s = chunk_delay_s
        self._sessions: dict[str, _Session] = {}
        # the core's report (forwards, batch sizes, per rank); one device is a ring of one
        self._pipeline = callable(getattr(engine, "ring_stats", None))
        self._pipeline_sent: Optional[PipelineStats] = None
        self._pipeline_at = 0.0

    def serve(self) -> None:
        # CUDA and pipeline-parallel engines finish chunks after their push has returned
        background = bool(getattr(self._engine, "finishes_in_background", False))
        try:
            while True:
                try:
                    while (background or self._replies_due()) and not self._conn.poll(OUTPUT_POLL_S):
                        self._send_finished()
                        self._maybe_send_pipeline()
                    data = self._conn.recv()
                except (EOFError, OSError):
                    log.info("server went away; engine process exits")
                    return
                try:
                    message = decode_to_engine(data)
                except ValidationError as exc:
                    sid = data.get("session_id", "") if isinstance(data, dict) else ""
                    self._send(SessionError(session_id=str(sid), request="?", message=f"bad request: {exc}"))
                    continue
                if isinstance(message, Shutdown):
                    return
                try:
                    self._handle_safely(message)
                    self._maybe_send_pipeline()
                except EngineFailure as exc:
                    # A rank of a parallel engine died: no session can go on. Say so and exit, so the
                    # server tells its sessions and starts a fresh engine.
                    log.error("engine failed: %s", exc)
                    self._send(EngineFailed(message=f"engine failed: {exc}"))
                    return
        finally:
            for session_id in list(self._sessions):
                self._drop(session_id)

    def _handle_safely(self, message: ToEngine) -> None:
        self._guarded(getattr(message, "session_id", ""), message.kind, lambda: self._handle(message),
                      fatal=isinstance(message, OpenSession))

    def _guarded(self, session_id: str, kind: str, call: Callable[[], None], fatal: bool = False) -> None:
        """Run one session's part of the loop; its failure answers SessionError and the loop goes on."""
        try:
            call()
        except EngineFailure:
            raise
        except Exception as exc:  # one session's failure must not stop the others
            log.exception("session %s: %s request failed", session_id, kind)
            # A failed push may leave that session's stream half-updated: drop it.
            dropped = kind == "push" and session_id in self._sessions
            if dropped:
                self._drop(session_id)
            self._send(
                SessionError(
                    session_id=session_id,
                    request=kind,
                    message=f"{type(exc).__name__}: {exc}",
                    fatal=dropped or fatal,
                )
            )

    def _handle(self, message: ToEngine) -> None:
        if isinstance(message, OpenSession):
            self._open(message)
        elif isinstance(message, PushFrames):
            self._push(message)
        elif isinstance(message, UpdateSession):
            session = self._get(message.session_id)
            session.stream.update(message.update)
            if message.update.prompt is not None:
                session.prompt = message.update.prompt
            session.updates_applied += 1
        elif isinstance(message, CloseSession):
            self._drop(message.session_id)
            self._send(SessionClosed(session_id=message.session_id))

    def _get(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KeyError(f"no engine session {session_id!r}") from None

    def _open(self, message: OpenSession) -> None:
        if message.session_id in self._sessions:
            raise ValueError(f"session {message.session_id!r} is already open")
        input_ring = FrameRing.attach(message.input_ring)
        try:
            output_ring = FrameRing.attach(message.output_ring)
        except Exception:
            input_ring.close()
            raise
        try:
            # the engine's last stage writes the frames into the output ring itself
            stream = self._engine.open_session(message.prompt, message.params, output_ring=output_ring.name)
        except Exception:
            input_ring.close()
            output_ring.close()
            raise
        self._sessions[message.session_id] = _Session(stream, input_ring, output_ring, message.prompt,
                                                      announced=output_ring.write_seq)
        log.info("session %s opened (%d open)", message.session_id, len(self._sessions))
        self._send(SessionOpened(session_id=message.session_id, chunk_frames=stream.chunk_frames))

    def _push(self, message: PushFrames) -> None:
        session = self._get(message.session_id)
        started = time.perf_counter()
        frames, pts = session.input_ring.read_many(message.first_seq, message.count)
        session.input_ring.release(message.first_seq + message.count)
        if self._chunk_delay_s:
            time.sleep(self._chunk_delay_s)  # test-only: an engine slower than its input
        early = session.stream.offer(frames, pts)
        if early:  # a fresh stream's frame 0, ahead of the rest of its chunk
            self._send_frames(message.session_id, session, early, True, started)
        session.reply_due = started
        self._answer(message.session_id, session)

    def _replies_due(self) -> bool:
        return any(s.reply_due is not None for s in self._sessions.values())

    def _send_finished(self) -> None:
        """Frames that sessions finished since they were last answered, and the replies now due."""
        for session_id, session in list(self._sessions.items()):
            self._guarded(session_id, "push", lambda: self._answer(session_id, session))

    def _answer(self, session_id: str, session: _Session) -> None:
        """The push's reply with the frames finished so far, once the engine has room for the session's
        next chunk; until then, finished frames as partial replies."""
        outputs = session.stream.take_finished()
        if session.reply_due is not None and session.stream.has_room():
            started, session.reply_due = session.reply_due, None
            self._send_frames(session_id, session, outputs, False, started)
        elif outputs:
            self._send_frames(session_id, session, outputs, True, time.perf_counter())

    def _send_frames(self, session_id: str, session: _Session, outputs: list, partial: bool, started: float) -> None:
        """Announce frames the engine wrote into the session's output ring ((slot seq, pts) each, in
        order): the push's reply, or a partial one."""
        first_seq = outputs[0][0] if outputs else session.announced
        assert [seq for seq, _ in outputs] == list(range(first_seq, first_seq + len(outputs))), "output slots out of order"
        session.announced = first_seq + len(outputs)
        out_pts = [int(p) for _, p in outputs]
        dropped, session.stream.dropped = session.stream.dropped, 0  # the output ring had no room for these
        self._send(
            FramesOut(
                session_id=session_id,
                first_seq=first_seq,
                count=len(out_pts),
                pts=out_pts,
                dropped=dropped,
                partial=partial,
                chunk_frames=session.stream.chunk_frames,
                engine_ms=1000.0 * (time.perf_counter() - started),
                stats={k: float(v) for k, v in dict(session.stream.stats).items()},
                prompt=session.prompt,
                updates_applied=session.updates_applied,
            )
        )

    def _maybe_send_pipeline(self) -> None:
        now = time.monotonic()
        if not self._pipeline or now - self._pipeline_at < PIPELINE_STATS_S:
            return
        self._pipeline_at = now
        message = pipeline_stats(self._engine.ring_stats())
        if message is not None and message != self._pipeline_sent:
            self._pipeline_sent = message
            self._send(message)

    def _drop(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            try:
                session.close()
            except Exception:
                log.exception("session %s: close failed", session_id)
            log.info("session %s closed (%d open)", session_id, len(self._sessions))

    def _send(self, message: BaseModel) -> None:
        try:
            self._conn.send(encode(message))
        except (BrokenPipeError, OSError):
            log.info("server pipe closed; reply %s not sent", type(message).__name__)


def pipeline_stats(st: Optional[RingStats]) -> Optional[PipelineStats]:
    """The server's view of rank 0's report (None before its first)."""
    if st is None:
        return None
    stage = st.balance.stage_ms or []
    ranks = []
    for r, blocks in enumerate(st.split):
        times = stage[r] if r < len(stage) else None
        counts = st.graphs[r] if r < len(st.graphs) else None
        ranks.append(RankStage(blocks=blocks, dit_ms=times.dit if times else None,
                               other_ms=times.other if times else None,
                               graph_forwards=counts.replayed if counts else 0,
                               eager_forwards=counts.eager if counts else 0))
    decisions = st.balance.decisions[-8:]
    return PipelineStats(
        ranks=ranks, rebalance=st.balance.enabled, moves=st.moves_total, decisions=decisions,
        forwards=st.forwards, batched_forwards=st.batched_forwards, early_frames=st.early_frames, hop_ms=st.hop_ms,
        forwards_by_batch={int(b): int(c) for b, c in (st.batch.get("forwards") or {}).items()},
        batch_waits=int(st.batch.get("waits", 0)), batch_wait_ms=float(st.batch.get("wait_ms", 0.0)),
    )


def engine_options(options: WorkerOptions) -> EngineOptions:
    """The EngineOptions the server's engine runs with.

    On several ranks one session keeps as many chunks in flight as there are ranks (a push returns the
    outputs that are ready, and later chunks' outputs come with later replies), and a multi-step model
    defaults to a step lag of that many forwards, so that one stream keeps every rank busy; in one
    process both stay 1 (a push returns its own chunk's frames)."""
    ranks = parse_devices(options.device)
    world = ranks.world if ranks is not None else 1
    steps = load_model_config(options.model).stream.steps
    step_lag = options.step_lag or (world if world > 1 and steps > 1 else 1)
    parallel: dict = {"inflight": world} if world > 1 else {}
    parallel |= {"target_fps": options.target_fps, "deadline_ms": options.deadline_ms, "max_batch": options.max_batch}
    return EngineOptions(
        model=options.model,
        weights=Path(options.weights) if options.weights else None,
        device=options.device,  # "auto": the engine picks CUDA when present
        height=options.height,
        width=options.width,
        seed=options.seed,
        decoder=options.decoder,
        encoder=options.encoder,
        taehv_weights=Path(options.taehv_weights) if options.taehv_weights else None,
        lightvae_weights=Path(options.lightvae_weights) if options.lightvae_weights else None,
        step_lag=step_lag,
        kv_policy=options.kv_policy,
        dtype=options.dtype,
        parallel=parallel,
    )


def _create_engine(options: WorkerOptions) -> Any:
    return StreamEngine.create(engine_options(options))


def _warm_up(engine: Any, info: EngineInfo) -> None:
    """Run a throwaway session through the whole pipeline once, so that the first real session's
    TTFF is not spent on lazy initialisation (allocator, kernels, autotuning)."""
    started = time.perf_counter()
    session = engine.open_session("", None)
    pts = 0
    try:
        for _ in range(info.steps + 1):  # enough chunks for a decode to happen
            n = session.chunk_frames
            session.push(np.zeros((n, info.height, info.width, 3), dtype=np.uint8), list(range(pts, pts + n)))
            pts += n
    finally:
        session.close()
    log.info("engine warmed up in %.1f s", time.perf_counter() - started)


def main(conn: Connection, options: dict) -> None:
    """Entry point of the engine process."""
    worker_options = WorkerOptions.model_validate(options)
    # Ctrl+C reaches the whole process group; the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=worker_options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    delay: Optional[float] = worker_options.test_chunk_delay_s or float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    if delay:
        log.warning("test-only chunk delay of %.3f s is on", delay)
    try:
        engine = _create_engine(worker_options)
        info: EngineInfo = engine.info
        if worker_options.warmup:
            _warm_up(engine, info)
    except Exception as exc:
        if isinstance(exc, ConfigError):  # a bad option (e.g. fp8 on a GPU without FP8): its message says it all
            log.error("engine failed to start: %s", exc)
        else:
            log.exception("engine failed to start")
        try:
            conn.send(encode(EngineFailed(message=f"{type(exc).__name__}: {exc}")))
        finally:
            conn.close()
        return
    log.info(
        "engine ready: %s %dx%d, %d steps, %s %s, attention %s, %s encoder, %s decoder%s",
        info.model,
        info.width,
        info.height,
        info.steps,
        info.device,
        info.dtype,
        info.attention,
        CODEC_NAMES[info.encoder],
        CODEC_NAMES[info.decoder],
        " (RANDOM WEIGHTS)" if info.random_weights else "",
    )
    # the model, the warm-up's leftovers and the modules are never garbage: out of the collector's way
    log.debug("%d objects of start-up frozen out of garbage collection", freeze_startup_objects())
    pauses = GcPauses().install()
    conn.send(encode(EngineReady(info=info)))
    try:
        Worker(engine, conn, chunk_delay_s=delay or 0.0).serve()
    finally:
        pauses.uninstall()
        conn.close()
