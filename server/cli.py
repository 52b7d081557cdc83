"""Command-line entry point: parse the configuration, run the app until interrupted."""

from __future__ import annotations

import logging
from typing import Optional

from aiohttp import web

from server.app import create_app
from server.config import parse_args, worker_options

log = logging.getLogger("server")


def main(argv: Optional[list[str]] = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)  # chatty at INFO
    options = worker_options(config)  # decides the model once (and logs a fallback to tiny)
    log.info("model %s, weights %s, devices %s", options.model, options.weights or "none (random weights)", options.device)
    app = create_app(config, options)
    web.run_app(app, host=config.host, port=config.port, print=lambda msg: log.info("%s", msg.strip()))
