"""Command-line entry point: parse the configuration, run the app until interrupted."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from aiohttp import web

from interface.shm_owner import remove_orphans
from server.app import create_app
from server.auth import check_exposure, is_loopback
from server.config import ServerConfig, parse_args, worker_options
from server.virtual_camera import VirtualCameraUnavailable, check_available

log = logging.getLogger("server")


def _announce_ingest(config: ServerConfig) -> None:
    if config.token is None:
        local = is_loopback(config.host) or config.host == "localhost"
        log.info("WHIP ingest at /whip: no token set, so open to loopback clients only%s",
                 "" if local else " (set --token or STREAM_TOKEN to publish from other machines)")
    else:
        log.info("WHIP ingest at /whip: Bearer token required")
    for server in config.ice_servers:
        log.info("ICE server %s%s", server.public_url(), " (with credentials)" if server.username else "")


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
    # SIGINT and SIGTERM: stop listening, then the app's cleanup closes sessions and the engine.
    web.run_app(app, host=config.host, port=config.port, shutdown_timeout=config.drain_timeout_s / 4,
                print=lambda msg: log.info("%s", msg.strip()))
    log.info("server stopped")
