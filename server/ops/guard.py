"""Which requests the server answers at all: the Host it is asked for and the Origin of the page
that asks (docs/RELIABILITY.md, "Host, Origin and content types").

- Host (DNS rebinding): a page of attacker.example whose name is rebound to 127.0.0.1 is
  same-origin with itself, so the browser lets it read and drive the API. Its requests still
  say `Host: attacker.example`. The server answers only to loopback names, its own address,
  IP literals when it listens on every address (a rebinding needs a name), and the names given
  with `--public-host`; any other Host gets 421.
- Origin (cross-site requests): browsers send Origin with every POST, PUT, PATCH and DELETE, so
  a state-changing request that carries one comes from a page, and the page must be the
  server's own or one allowed with `--cors-origin`; otherwise 403. OBS, GStreamer and curl send
  no Origin and pass (the token, where one is set, still applies to them).
"""

from __future__ import annotations

import ipaddress
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

from aiohttp import web

from server.errors import ApiError

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(host: str) -> Optional[tuple[str, Optional[int]]]:
    """(lower-case name without a trailing dot or IPv6 brackets, port or None) of a Host header
    value, or None when it is malformed."""
    host = host.strip().lower()
    port: Optional[str] = None
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif host.count(":") == 1:
        name, port = host.split(":")
    else:
        name = host
    name = name.rstrip(".")
    if not name or any(c in name for c in "/@\\ "):
        return None
    if port is None or port == "":
        return name, None
    if not port.isdigit() or int(port) > 65535:
        return None
    return name, int(port)


def _ip(name: str) -> Optional[ipaddress._BaseAddress]:
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return None


class HostPolicy:
    """The Host names this server answers to."""

    def __init__(self, bind_host: str, public_hosts: list[str]) -> None:
        self.any = "*" in public_hosts
        self.every_address = bind_host in WILDCARD_ADDRESSES
        names = {h for h in public_hosts if h != "*"}
        if not self.every_address:
            names.add(bind_host)
        self.names = {parsed[0] for parsed in map(split_host, names) if parsed is not None}

    def allows(self, host_header: str) -> bool:
        parsed = split_host(host_header)
        if parsed is None:
            return False
        name = parsed[0]
        if self.any or name in self.names or name == "localhost" or name.endswith(".localhost"):
            return True  # *.localhost always resolves to loopback in browsers (RFC 6761)
        ip = _ip(name)
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback or self.every_address


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a page of `origin` is the server itself as reached through `host_header`."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False
    host = split_host(host_header)
    if host is None:
        return False
    default = DEFAULT_PORTS[parts.scheme]  # behind a TLS proxy the Host has no port either
    return parts.hostname.rstrip(".") == host[0] and (origin_port or default) == (host[1] or default)


class OriginPolicy:
    """Which pages may change state: the server's own, and the configured CORS origins."""

    def __init__(self, cors_origins: list[str]) -> None:
        self.any = "*" in cors_origins
        self.allowed = frozenset(o.rstrip("/").lower() for o in cors_origins)

    def listed(self, origin: str) -> bool:
        """Configured with --cors-origin (what CORS answers echo too)."""
        return self.any or origin.rstrip("/").lower() in self.allowed

    def allows(self, origin: str, host_header: Optional[str]) -> bool:
        return self.listed(origin) or (host_header is not None and same_origin(origin, host_header))


def guard_middleware(hosts: HostPolicy, origins: OriginPolicy) -> Callable:
    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        host = request.headers.get("Host")  # absent only from HTTP/1.0 clients, never from a browser
        if host is not None and not hosts.allows(host):
            raise ApiError(
                421,
                "this server does not answer to that host name; start it with --public-host NAME to allow one",
            )
        origin = request.headers.get("Origin")
        if request.method in STATE_CHANGING and origin is not None and not origins.allows(origin, host):
            raise ApiError(
                403,
                "cross-origin request refused: only the server's own pages and origins given with --cors-origin "
                "may change anything",
            )
        return await handler(request)

    return guard
