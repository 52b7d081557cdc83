"""Is the listening address free? Asked before the engine starts (minutes with a real model), so
that a port in use is one line, not a traceback after the wait."""

from __future__ import annotations

import errno
import socket
from typing import Optional


def port_problem(host: str, port: int) -> Optional[str]:
    """Why the server could not listen on host:port, or None. Port 0 (any free port) is always free."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # as aiohttp binds: a port with connections in TIME_WAIT is free, one with a listener is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue  # that family is not enabled here; asyncio skips it too
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} on {host} is already in use (another server running?): choose another with --port"
                return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None
