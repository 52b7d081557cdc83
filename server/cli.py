"""Command-line entry point: parse the configuration, run the app until interrupted."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Optional

from aiohttp import web

from interface.shm_owner import remove_orphans
from interface.pauses import freeze_startup_objects
from server.ops.access_log import QuietReadsAccessLogger
from server.app import EXIT_CONFIGURATION, create_app
from server.ops.auth import check_exposure, is_loopback
from server.config import ServerConfig, parse_args, worker_options
from server.ops.port_check import port_problem
from server.state import STATE
from server.outputs.virtual_camera import VirtualCameraUnavailable, check_available

log = logging.getLogger("server")


def _announce_ingest(config: ServerConfig) -> None:
    if config.token is None:
        local = is_loopback(config.host) or config.host == "localhost"
        log.info("WHIP ingest at /whip: no token set, so open to loopback clients only%s",
                 "" if local else " (set --token or STREAM_TOKEN to publish from other machines)")
    else:
        log.info("WHIP ingest at /whip: Bearer token required")
    for server in config.ice_servers:
        how = " (with credentials)" if server.username else " (credentials minted per peer)" if server.is_turn else ""
        log.info("ICE server %s%s", server.public_url(), how)


def _remove_orphaned_memory() -> None:
    """Frame rings of servers killed with their engine (kill -9 of the group, OOM) stay in /dev/shm
    until someone unlinks them: a starting server does, for owners that are gone."""
    removed = remove_orphans()
    if removed:
        log.warning("removed %d shared-memory segments (%.1f MB) left by servers that died without closing them",
                    len(removed), sum(size for _, size in removed) / 1e6)


def main(argv: Optional[list[str]] = None) -> None:
    config = parse_args(argv)
    refusal = check_exposure(config.host, config.token, config.allow_anonymous)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    busy = port_problem(config.host, config.port)
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)  # chatty at INFO
    if config.virtual_camera:
        try:  # before the model loads: a missing device is a configuration error
            check_available(config.virtual_camera_device, config.virtual_camera_fps)
        except VirtualCameraUnavailable as exc:
            print(f"--virtual-camera: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    _remove_orphaned_memory()
    _announce_ingest(config)
    options = worker_options(config)  # decides the model once (and logs a fallback to tiny)
    log.info("model %s, weights %s, devices %s", options.model, options.weights or "none (random weights)", options.device)
    app = create_app(config, options)
    log.debug("%d objects of start-up frozen out of garbage collection", freeze_startup_objects())
    code = asyncio.run(serve(app, config))
    if code:
        print(f"error: {app[STATE].exit_reason}", file=sys.stderr)  # the one line a user of `make run` reads
        raise SystemExit(code)
    log.info("server stopped")


async def serve(app: web.Application, config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until the server gives up on its engine
    (AppState.give_up: its code), then drain: stop listening, let requests in flight finish (a
    quarter of `drain_timeout_s`), and the app's cleanup closes the sessions and the engine."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, state.stop.set)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.drain_timeout_s / 4,
                           access_log_class=QuietReadsAccessLogger)
    await runner.setup()  # starts the engine in the background
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            state.give_up(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", EXIT_CONFIGURATION)
        else:
            log.info("listening on %s", site.name)
        await state.stop.wait()
    finally:
        await runner.cleanup()
    return state.exit_code
