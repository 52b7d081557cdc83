"""Command-line entry point: parse the configuration, run the app until interrupted."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from aiohttp import web

from server.access_log import QuietReadsAccessLogger
from server.app import create_app
from server.auth import check_exposure, is_loopback
from server.config import ServerConfig, parse_args, worker_options
from server.port_check import port_problem
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
        how = " (with credentials)" if server.username else " (credentials minted per peer)" if server.is_turn else ""
        log.info("ICE server %s%s", server.public_url(), how)


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
    _announce_ingest(config)
    options = worker_options(config)  # decides the model once (and logs a fallback to tiny)
    log.info("model %s, weights %s, devices %s", options.model, options.weights or "none (random weights)", options.device)
    app = create_app(config, options)
    # SIGINT and SIGTERM: stop listening, then the app's cleanup closes sessions and the engine.
    web.run_app(app, host=config.host, port=config.port, shutdown_timeout=config.drain_timeout_s / 4,
                access_log_class=QuietReadsAccessLogger,
                print=lambda msg: log.info("%s", msg.strip()))
    log.info("server stopped")
