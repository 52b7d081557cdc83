"""The aiohttp application: signaling, session API, health, metrics and the web page."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from interface.controls import StreamUpdate
from interface.messages import WorkerOptions
from server.config import ServerConfig, worker_options
from server.engine_client import EngineClient, EngineUnavailable
from server.errors import ApiError, validation_details
from server.metrics import ServerMetrics
from server.prometheus import CONTENT_TYPE
from server.schemas import (
    ErrorBody,
    OfferRequest,
    OfferResponse,
    ServerInfo,
    SessionList,
)
from server.session import Session, SessionContext
from server.signaling import accept_offer

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
MAX_BODY = 1 << 20
MAX_ENGINE_RESTARTS = 5
M = TypeVar("M", bound=BaseModel)


class AppState:
    """Everything the handlers share: one per application, nothing global."""

    def __init__(self, config: ServerConfig, options: WorkerOptions, web_root: Path) -> None:
        self.config = config
        self.web_root = web_root.resolve()
        self.engine = EngineClient(options, config.engine_start_timeout_s)
        self.metrics = ServerMetrics(config.deadline_s)
        self.sessions: dict[str, Session] = {}
        self.opening = 0
        self.context = SessionContext(config, self.engine, self.metrics, self._forget)
        self.metrics.add_gauges(
            sessions=lambda: float(len(self.sessions)),
            fps=lambda d: sum(s.metrics.fps(d) for s in self.sessions.values()),
            engine=self._engine_labels,
            engine_up=lambda: 1.0 if self.engine.state == "ready" else 0.0,
        )
        self.engine_task: Optional[asyncio.Task] = None

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def _engine_labels(self) -> dict[tuple[str, ...], float]:
        i = self.engine.info
        if i is None:
            return {}
        key = (i.model, i.device, i.dtype, i.attention, str(i.random_weights).lower(), str(i.height), str(i.width))
        return {key: 1.0}

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f"no session {session_id!r}")
        return session

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
        )


STATE = web.AppKey("state", AppState)


def _json(model: BaseModel, status: int = 200, exclude_none: bool = False) -> web.Response:
    text = model.model_dump_json(exclude_none=exclude_none)
    return web.Response(text=text, status=status, content_type="application/json")


def _error(status: int, message: str, details: Optional[list] = None) -> web.Response:
    return _json(ErrorBody(error=message, details=details), status, exclude_none=True)


async def _read(request: web.Request, model: type[M]) -> M:
    """The request body as `model`: 400 when it is not JSON, 422 when it does not validate."""
    try:
        data = json.loads(await request.read())
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, f"invalid {model.__name__}", validation_details(exc)) from None


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error leaves as JSON {error, details?}, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal server error")


# -- handlers ------------------------------------------------------------------------------------------


async def offer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _read(request, OfferRequest)
    if len(state.sessions) + state.opening >= state.config.max_sessions:
        raise ApiError(503, f"the server is full ({state.config.max_sessions} sessions)")
    state.opening += 1  # offers being answered count too, or concurrent ones could overfill
    try:
        session, answer = await accept_offer(state.context, body)
    finally:
        state.opening -= 1
    state.sessions[session.id] = session
    state.metrics.sessions_started.inc()
    return _json(OfferResponse(sdp=answer.sdp, session_id=session.id))


async def list_sessions(request: web.Request) -> web.Response:
    sessions = request.app[STATE].sessions.values()
    return _json(SessionList(sessions=[s.info() for s in sessions]))


async def get_session(request: web.Request) -> web.Response:
    return _json(request.app[STATE].session(request.match_info["session_id"]).info())


async def patch_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = state.session(request.match_info["session_id"])
    update = await _read(request, StreamUpdate)
    try:
        session.apply_update(update)
    except EngineUnavailable as exc:
        raise ApiError(409, str(exc)) from None
    return _json(session.info())


async def delete_session(request: web.Request) -> web.Response:
    session = request.app[STATE].session(request.match_info["session_id"])
    await session.close("deleted by the API")
    return web.Response(status=204)


async def info(request: web.Request) -> web.Response:
    return _json(request.app[STATE].server_info())


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.engine.state == "ready"
    body = {
        "status": "ok" if ok else state.engine.state,
        "engine": state.engine.state,
        "error": state.engine.error,
        "sessions": len(state.sessions),
    }
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[STATE].metrics.render()
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


async def index(request: web.Request) -> web.FileResponse:
    return _file(request.app[STATE].web_root / "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """A file under web/, nothing else: resolved path must stay inside, no dot-files."""
    root = request.app[STATE].web_root
    try:
        target = (root / request.match_info["path"]).resolve()
    except (OSError, ValueError):  # e.g. a NUL byte
        raise web.HTTPNotFound() from None
    if not target.is_relative_to(root) or not target.is_file():
        raise web.HTTPNotFound()
    if any(part.startswith(".") for part in target.relative_to(root).parts):
        raise web.HTTPNotFound()
    return _file(target)


def _file(path: Path) -> web.FileResponse:
    return web.FileResponse(path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# -- lifecycle -----------------------------------------------------------------------------------------


async def _supervise_engine(state: AppState) -> None:
    """Start the engine, and restart it (with backoff) when it dies. Not when it failed to load:
    missing weights or a bad device will not fix themselves."""
    crashes = 0
    while True:
        started = asyncio.get_running_loop().time()
        try:
            info = await state.engine.start()
        except EngineUnavailable as exc:
            log.error("engine unavailable: %s", exc)
        else:
            if info.random_weights:
                log.warning(
                    "model %s runs with RANDOM WEIGHTS: the output is not a real restyling (give --weights DIR)",
                    info.model,
                )
            log.info("engine ready: %s on %s (%s), %dx%d", info.model, info.device, info.dtype, info.width, info.height)
            await state.engine.wait_lost()
        if state.engine.fatal:
            log.error("the engine cannot start; fix the configuration and restart the server")
            return
        ran_for = asyncio.get_running_loop().time() - started
        crashes = 1 if ran_for > 120 else crashes + 1
        if crashes > MAX_ENGINE_RESTARTS:
            log.error("the engine died %d times in a row; giving up", crashes)
            return
        delay = min(30.0, 2.0 ** (crashes - 1))
        log.warning("restarting the engine in %.0f s", delay)
        await asyncio.sleep(delay)


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Run the engine in the background (the page and /healthz answer while it loads); on
    shutdown close every session, then stop the engine."""
    state = app[STATE]
    state.engine_task = asyncio.ensure_future(_supervise_engine(state))
    yield
    state.engine_task.cancel()
    await asyncio.gather(*(s.close("server shutting down") for s in list(state.sessions.values())))
    await state.engine.stop()


def create_app(
    config: ServerConfig, options: Optional[WorkerOptions] = None, web_root: Path = WEB_ROOT
) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app[STATE] = AppState(config, options or worker_options(config), web_root)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.router.add_post("/api/offer", offer)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{session_id}", get_session)
    app.router.add_patch("/api/sessions/{session_id}", patch_session)
    app.router.add_delete("/api/sessions/{session_id}", delete_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_get("/{path:.+}", static_file)  # last: everything else is a file of web/
    return app
