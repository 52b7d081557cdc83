"""The aiohttp application: signaling, session API, WHIP/WHEP, outputs, health, metrics and the
web pages."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator, Optional

from aiohttp import web

from interface.controls import StreamUpdate
from interface.catalogue import CODEC_NAMES
from interface.messages import WorkerOptions
from server.outputs import outputs_api, whip
from server.ops.auth import authorize, token_middleware
from server.config import ServerConfig, worker_options
from server.media.engine_client import EngineUnavailable
from server.errors import ApiError
from server.ops.guard import HostPolicy, OriginPolicy, guard_middleware
from server.http import cors_middleware, json_errors, json_response, preflight, read_json
from server.ops.prometheus import CONTENT_TYPE
from server.schemas import IceServerList, OfferRequest, OfferResponse, SessionList
from server.media.controls import ControlRejected
from server.media.signaling import accept_offer
from server.state import STATE, AppState
from server.outputs.virtual_camera import CameraOpener, open_camera

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
# Exit codes when the server gives up (docs/RELIABILITY.md): an engine that cannot load (weights,
# device) or a port it cannot listen on is a configuration error, as a bad flag is (2).
EXIT_CONFIGURATION = 2
EXIT_ENGINE_KEEPS_DYING = 1


# -- handlers ------------------------------------------------------------------------------------------


async def offer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request, OfferRequest)
    if len(body.sdp) > state.config.max_sdp_bytes:
        raise ApiError(413, f"the SDP offer is larger than {state.config.max_sdp_bytes} bytes")
    if body.prompt is not None and len(body.prompt) > state.config.max_prompt_chars:
        raise ApiError(422, f"the prompt is longer than {state.config.max_prompt_chars} characters")
    state.check_capacity()
    state.opening += 1  # offers being answered count too, or concurrent ones could overfill
    try:
        session, answer = await accept_offer(state.context, body)
    finally:
        state.opening -= 1
    state.add_session(session)
    return json_response(OfferResponse(sdp=answer.sdp, session_id=session.id))


async def list_sessions(request: web.Request) -> web.Response:
    sessions = request.app[STATE].sessions.values()
    return json_response(SessionList(sessions=[s.info() for s in sessions]))


async def get_session(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].session(request.match_info["session_id"]).info(with_frames=True))


async def patch_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = state.session(request.match_info["session_id"])
    update = await read_json(request, StreamUpdate)
    try:
        session.apply_update(update)
    except EngineUnavailable as exc:
        raise ApiError(409, str(exc)) from None
    except ControlRejected as exc:
        raise ApiError(exc.status, exc.message, headers={"Retry-After": "1"} if exc.status == 429 else None) from None
    return json_response(session.info())


async def delete_session(request: web.Request) -> web.Response:
    session = request.app[STATE].session(request.match_info["session_id"])
    await session.close("deleted by the API")
    return web.Response(status=204)


async def info(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].server_info())


async def ice_servers(request: web.Request) -> web.Response:
    """The STUN/TURN servers for the caller's next peer connection, with TURN credentials
    (minted per call with --turn-secret): for authenticated callers only, whatever the token scope."""
    config = request.app[STATE].config
    if config.token is not None:
        authorize(config.token, request.headers.get("Authorization"), request.remote)
    servers = config.ice_for_peer()
    return json_response(IceServerList(ice_servers=[s.model_dump(exclude_none=True) for s in servers]),
                         headers={"Cache-Control": "no-store"})


async def pipeline(request: web.Request) -> web.Response:
    """The engine core's report: its ranks (blocks, stage times, CUDA graph use; one device is a ring of
    one), forwards and how many carried several sessions, the block scheduler's latest decisions, as the
    engine process last reported them (about once a second while they change)."""
    state = request.app[STATE]
    report = state.engine.pipeline
    if report is None:
        devices = state.engine.info.device if state.engine.info else "not started"
        raise ApiError(404, f"no pipeline report yet from the engine ({devices})")
    return web.json_response(report.model_dump(mode="json"))


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


async def view(request: web.Request) -> web.FileResponse:
    """The full-window player of one session's output (an OBS Browser Source); the page reads
    the session id from its own URL."""
    return _file(request.app[STATE].web_root / "view.html")


async def api_options(request: web.Request) -> web.Response:
    return preflight("GET, POST, PATCH, DELETE, OPTIONS")


def resolve_static(root: Path, path: str) -> Optional[Path]:
    """The file of web/ that `path` names, or None: the resolved path (symlinks followed) must
    stay inside `root`, be a regular file, and no part of it may be a dot-file."""
    if "\x00" in path or "\\" in path or path.startswith("/"):
        return None
    try:
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return None
    except (OSError, ValueError):  # e.g. a NUL byte, a symlink loop
        return None
    if any(part.startswith(".") for part in target.relative_to(root).parts):
        return None
    return target


async def static_file(request: web.Request) -> web.FileResponse:
    """A file under web/, nothing else."""
    target = resolve_static(request.app[STATE].web_root, request.match_info["path"])
    if target is None:
        raise web.HTTPNotFound()
    return _file(target)


def _file(path: Path) -> web.FileResponse:
    return web.FileResponse(path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# -- lifecycle -----------------------------------------------------------------------------------------


async def _supervise_engine(state: AppState) -> None:
    """Start the engine, and restart it (with backoff) when it dies. Not when it failed to load:
    missing weights or a bad device will not fix themselves. Where it cannot go on, the server
    gives up: it drains and exits non-zero, for its supervisor to restart it."""
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
            log.info("engine ready: %s on %s (%s), %dx%d, %s encoder, %s decoder", info.model, info.device, info.dtype,
                     info.width, info.height, CODEC_NAMES[info.encoder], CODEC_NAMES[info.decoder])
            await state.engine.wait_lost()
        if state.engine.fatal:
            state.give_up(f"{state.engine.error} (fix the configuration)", EXIT_CONFIGURATION)
            return
        ran_for = asyncio.get_running_loop().time() - started
        crashes = 1 if ran_for > 120 else crashes + 1
        if crashes > state.config.engine_max_restarts:
            times = "once" if crashes == 1 else f"{crashes} times in a row"
            state.give_up(f"the engine died {times}, last: {state.engine.error}", EXIT_ENGINE_KEEPS_DYING)
            return
        delay = min(30.0, 2.0 ** (crashes - 1))
        log.warning("restarting the engine in %.0f s", delay)
        await asyncio.sleep(delay)


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Run the engine in the background (the page and /healthz answer while it loads); on
    shutdown (SIGINT/SIGTERM: the listener is closed first) close every session, then stop the
    engine, within `drain_timeout_s`."""
    state = app[STATE]
    state.engine_task = asyncio.ensure_future(_supervise_engine(state))
    state.gc_pauses.install()
    state.loop_lag.start()
    yield  # on_shutdown (_stop_accepting) has set draining already
    state.loop_lag.stop()
    state.gc_pauses.uninstall()
    state.engine_task.cancel()
    timeout = state.config.drain_timeout_s
    try:
        await asyncio.wait_for(state.close(), timeout / 2)
    except asyncio.TimeoutError:
        log.warning("sessions did not close within %.0f s", timeout / 2)
    await state.engine.stop(timeout_s=timeout / 4)
    log.info("drained: sessions closed, engine stopped")


async def _stop_accepting(app: web.Application) -> None:
    app[STATE].draining = True  # requests still in flight get 503 for new sessions
    log.info("shutting down: no new sessions, closing %d", len(app[STATE].sessions))


def create_app(
    config: ServerConfig,
    options: Optional[WorkerOptions] = None,
    web_root: Path = WEB_ROOT,
    camera_opener: CameraOpener = open_camera,
) -> web.Application:
    origins = OriginPolicy(config.cors_origins)
    guard = guard_middleware(HostPolicy(config.host, config.public_hosts), origins)
    middlewares = [cors_middleware(origins), json_errors, guard, token_middleware(config.token, config.token_scope)]
    max_body = max(config.max_body_bytes, config.max_sdp_bytes + 4096)  # an /api/offer carries SDP in JSON
    app = web.Application(middlewares=middlewares, client_max_size=max_body)
    app[STATE] = AppState(config, options or worker_options(config), web_root, camera_opener)
    app.on_shutdown.append(_stop_accepting)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.router.add_post("/api/offer", offer)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/ice-servers", ice_servers)
    app.router.add_get("/api/pipeline", pipeline)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{session_id}", get_session)
    app.router.add_patch("/api/sessions/{session_id}", patch_session)
    app.router.add_delete("/api/sessions/{session_id}", delete_session)
    app.router.add_route("OPTIONS", "/api/{tail:.*}", api_options)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    whip.add_routes(app)
    outputs_api.add_routes(app)
    app.router.add_get("/", index)
    app.router.add_get("/view/{session_id}", view)
    app.router.add_get("/{path:.+}", static_file)  # last: everything else is a file of web/
    return app
