"""What the handlers share: one AppState per application, nothing global."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Coroutine, Optional

from aiohttp import web

from interface.messages import WorkerOptions
from interface.pauses import GcPauses, LoopLag
from server.config import ServerConfig
from server.media.engine_client import EngineClient
from server.errors import ApiError
from server.media.ice import public_servers
from server.ops.metrics import ServerMetrics
from server.ops.prometheus import Gauge
from server.schemas import ServerInfo
from server.media.session import Session, SessionContext
from server.media.tasks import BackgroundTasks
from server.outputs.virtual_camera import CameraOpener, VirtualCamera, open_camera

log = logging.getLogger(__name__)

LATEST = "latest"  # /whep/latest, /view/latest: the newest live session (a Browser Source URL that survives restarts)


class AppState:
    def __init__(
        self, config: ServerConfig, options: WorkerOptions, web_root: Path, camera_opener: CameraOpener = open_camera
    ) -> None:
        self.config = config
        self.web_root = web_root.resolve()
        self.engine = EngineClient(options, config.engine_start_timeout_s)
        self.metrics = ServerMetrics(config.deadline_s)
        self.sessions: dict[str, Session] = {}
        self.opening = 0
        self.draining = False  # SIGTERM: no new sessions
        self.stop = asyncio.Event()  # SIGINT/SIGTERM or give_up: the server drains and exits (server/cli.py)
        self.exit_code = 0
        self.exit_reason: Optional[str] = None
        self.context = SessionContext(config, self.engine, self.metrics, self._forget)
        self.virtual_camera: Optional[VirtualCamera] = None
        if config.virtual_camera:
            self.virtual_camera = VirtualCamera(config.virtual_camera_device, config.virtual_camera_fps, camera_opener)
        self.metrics.add_gauges(
            sessions=lambda: float(len(self.sessions)),
            fps=lambda d: sum(s.metrics.fps(d) for s in self.sessions.values()),
            engine=self._engine_labels,
            engine_up=lambda: 1.0 if self.engine.state == "ready" else 0.0,
        )
        self.metrics.add_pipeline_gauges(lambda: self.engine.pipeline)
        # pauses that hold up every session at once (interface/pauses.py)
        self.gc_pauses, self.loop_lag = GcPauses(), LoopLag()
        self.metrics.registry.add(
            Gauge("streamgen_server_gc_long_pauses", "garbage collections of the server process of 20 ms or more",
                  read=lambda: {(): float(self.gc_pauses.long)})
        )
        self.metrics.registry.add(
            Gauge("streamgen_server_loop_late", "times the server's event loop ran 50 ms or more late",
                  read=lambda: {(): float(self.loop_lag.long)})
        )
        self.metrics.add_session_gauges(lambda: [s.metrics for s in self.sessions.values() if not s.closed])
        self.metrics.registry.add(
            Gauge("streamgen_viewers", "WHEP viewers, all sessions",
                  read=lambda: {(): float(sum(len(s.egress.viewers) for s in self.sessions.values()))})
        )
        self.metrics.registry.add(
            Gauge("streamgen_outputs", "running recordings, restreams and virtual cameras",
                  read=lambda: {(): float(sum(s.egress.live_outputs() for s in self.sessions.values()))})
        )
        self.engine_task: Optional[asyncio.Task] = None
        self._tasks = BackgroundTasks(lambda exc: log.error("virtual camera: %s", exc, exc_info=exc))

    def give_up(self, reason: str, exit_code: int) -> None:
        """Stop serving for good: drain and exit with `exit_code` (non-zero), so that Docker's
        restart policy or systemd starts a fresh server, instead of answering 503 forever."""
        if self.exit_reason is None:
            self.exit_code, self.exit_reason = exit_code, reason
            log.error("giving up: %s; the server exits with code %d", reason, exit_code)
        self.stop.set()

    # -- sessions ---------------------------------------------------------------------------------------
    def add_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.metrics.sessions_started.inc()
        if self.virtual_camera is not None:
            self._spawn(self.virtual_camera.session_started(session))

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        if self.virtual_camera is not None:
            self._spawn(self.virtual_camera.session_closed(session, list(self.sessions.values())))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def session(self, session_id: str) -> Session:
        session = self.newest_session() if session_id == LATEST else self.sessions.get(session_id)
        if session is None or session.closed:
            raise ApiError(404, "no live session" if session_id == LATEST else f"no session {session_id!r}")
        return session

    def newest_session(self) -> Optional[Session]:
        live = [s for s in self.sessions.values() if not s.closed]
        return max(live, key=lambda s: s.created_at) if live else None

    def check_capacity(self) -> None:
        """Admission control: 503 + Retry-After when the server drains, holds its maximum of
        sessions, or when the engine time the running sessions need per chunk (measured, smoothed)
        plus one more session's would overrun the chunk budget at the target frame rate: a new
        session must not take the SLO of those already running."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "30"})
        if len(self.sessions) + self.opening >= self.config.max_sessions:
            raise ApiError(503, f"the server is full ({self.config.max_sessions} sessions)", headers={"Retry-After": "10"})
        load = self.engine_load() if self.config.admission == "measured" else None
        if load is not None and load[0] > self.config.capacity_headroom * load[1]:
            running = len([s for s in self.sessions.values() if not s.closed]) + self.opening
            raise ApiError(
                503,
                capacity_message(load[0], load[1], running, self.config.target_fps, self.config.capacity_headroom),
                headers={"Retry-After": "10"},
            )

    def engine_load(self) -> Optional[tuple[float, float]]:
        """(engine seconds per chunk period with one more session, chunk budget in seconds), or
        None before any session has measured a chunk."""
        live = [s for s in self.sessions.values() if not s.closed]
        costs = [s.engine_chunk_s for s in live if s.engine_chunk_s is not None]
        if not costs:
            return None
        mean = sum(costs) / len(costs)
        unmeasured = len(live) - len(costs) + self.opening
        need = sum(costs) + mean * (unmeasured + 1)
        return need, min(s.chunk_budget_s for s in live)

    def _engine_labels(self) -> dict[tuple[str, ...], float]:
        i = self.engine.info
        if i is None:
            return {}
        key = (i.model, i.device, i.dtype, i.attention, str(i.random_weights).lower(), str(i.height), str(i.width),
               i.decoder, i.encoder)
        return {key: 1.0}

    def server_info(self) -> ServerInfo:
        info = self.engine.info
        notice = None
        if info is not None and info.random_weights:
            notice = (
                f"The output comes from RANDOM WEIGHTS (model {info.model}): it is not a real restyling. "
                "Start the server with --weights DIR for real output."
            )
        return ServerInfo(
            engine_state=self.engine.state,
            engine_error=self.engine.error,
            engine=info,
            random_weights=None if info is None else info.random_weights,
            notice=notice,
            deadline_s=self.config.deadline_s,
            max_sessions=self.config.max_sessions,
            sessions=len(self.sessions),
            default_prompt=self.config.default_prompt,
            output_size=self.config.output_size,
            ice_servers=[s.model_dump(exclude_none=True) for s in public_servers(self.config.ice_servers)],
            turn=any(s.is_turn for s in self.config.ice_servers),
            whip_token_required=self.config.token is not None,
            token_required=self.config.token is not None and self.config.token_scope == "all",
            virtual_camera=self.virtual_camera is not None,
        )

    async def close(self) -> None:
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())))
        self._tasks.cancel_all()


def capacity_message(need_s: float, budget_s: float, running: int, target_fps: float, headroom: float) -> str:
    """Why a session is refused, with what the sessions already running get (they may be far over
    the budget already, e.g. a big model on a small GPU) and what the user can change."""
    now_s = need_s * running / (running + 1)  # the estimate gives each session the same mean cost
    budget_ms, fps = 1000 * budget_s, target_fps
    if now_s > budget_s:
        load = (f"the {running} running session{'s' if running != 1 else ''} already need{'s' if running == 1 else ''} "
                f"{1000 * now_s:.0f} ms of engine time per chunk, {now_s / budget_s:.1f}x the {budget_ms:.0f} ms a chunk "
                f"may take at {fps:g} fps (they get about {fps * budget_s / now_s:.1f} fps)")
    else:
        load = (f"with one more session a chunk would need {1000 * need_s:.0f} ms of engine time, over "
                f"{100 * headroom:.0f}% of the {budget_ms:.0f} ms a chunk may take at {fps:g} fps")
    return (f"the engine is at capacity: {load}. To make room, end a session, or run at a smaller size "
            "(--height/--width) or with fewer steps (steps=1); --target-fps sets the frame rate each session must keep")


STATE = web.AppKey("state", AppState)
