"""The access log without the page's polling: successful reads go to DEBUG.

Every open page asks for /api/sessions every 2 s and for its controlled session's stats every
second; at INFO that buries what matters. Requests that change something (POST, PATCH, DELETE) and
every error stay at INFO, in aiohttp's usual format.
"""

from __future__ import annotations

import logging

from aiohttp.abc import BaseRequest, StreamResponse
from aiohttp.web_log import AccessLogger

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class QuietReadsAccessLogger(AccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.method in READS and response.status < 400:
            if self.logger.isEnabledFor(logging.DEBUG):
                # the path without its query: a query may carry a prompt, never worth a debug line
                self.logger.debug("%s %s %d %.1f ms", request.method, request.path, response.status, 1000 * time)
            return
        super().log(request, response, time)
