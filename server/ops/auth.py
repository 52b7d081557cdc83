"""Who may use the server.

With a token configured (`--token` or $STREAM_TOKEN) and `token_scope: all` (the default), the
API (all of /api/ but /api/info), WHIP, WHEP and /metrics need `Authorization: Bearer TOKEN`
(RFC 9725 §4.5 / RFC 6750), from anywhere, loopback included (a reverse proxy makes every client
look local); the token is compared in constant time. The pages, /api/info and /healthz stay open:
the page asks for the token and sends it as a Bearer header. With `token_scope: publish` only
WHIP and outputs need it (the rest is open, for trusted networks).

Without a token, WHIP and outputs are open to loopback clients only, and the server refuses to
listen on a non-loopback address unless started with `--allow-anonymous`.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Awaitable, Callable, Optional

from aiohttp import web
from pydantic import SecretStr

from server.errors import ApiError

REALM = 'Bearer realm="streamgen"'


def is_loopback(remote: Optional[str]) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def bearer(header: Optional[str]) -> Optional[str]:
    """The token of an `Authorization: Bearer TOKEN` header, None when absent or another scheme."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


def authorize(token: Optional[SecretStr], authorization: Optional[str], remote: Optional[str]) -> None:
    """Raise ApiError 401 (bad or missing token) or 403 (no token configured, not loopback)."""
    if token is None:
        if is_loopback(remote):
            return
        raise ApiError(
            403,
            "no token is configured, so WHIP and outputs are open to loopback clients only; "
            "start the server with --token TOKEN (or STREAM_TOKEN) to publish from elsewhere",
        )
    given = bearer(authorization)
    if given is None:
        raise ApiError(401, "missing Authorization: Bearer token", headers={"WWW-Authenticate": REALM})
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(
            401, "invalid token", headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'}
        )


def is_authenticated(token: Optional[SecretStr], authorization: Optional[str]) -> bool:
    """Whether the caller may be handed secrets such as TURN credentials: it carries the token,
    or the server has none (it then listens on loopback, or was told --allow-anonymous)."""
    if token is None:
        return True
    given = bearer(authorization)
    return given is not None and hmac.compare_digest(given.encode(), token.get_secret_value().encode())


PROTECTED_PREFIXES = ("/api/", "/whip", "/whep", "/metrics")
PUBLIC_PATHS = frozenset({"/api/info"})


def needs_token(token: Optional[SecretStr], scope: str, method: str, path: str) -> bool:
    """Whether a request must carry the token (CORS preflights never do: browsers send none)."""
    if token is None or scope != "all" or method == "OPTIONS":
        return False
    return path.startswith(PROTECTED_PREFIXES) and path not in PUBLIC_PATHS


def is_local_host(host: str) -> bool:
    return host == "localhost" or is_loopback(host)


def check_exposure(host: str, token: Optional[SecretStr], allow_anonymous: bool) -> Optional[str]:
    """Why the server must not start (a non-loopback address and no token), or None."""
    if token is not None or allow_anonymous or is_local_host(host):
        return None
    return (
        f"refusing to listen on {host} without a token: anyone who can reach it could use the GPU, "
        "publish and record; set --token TOKEN (or STREAM_TOKEN), or pass --allow-anonymous"
    )


def token_middleware(token: Optional[SecretStr], scope: str) -> Callable:
    @web.middleware
    async def require_token(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if needs_token(token, scope, request.method, request.path):
            authorize(token, request.headers.get("Authorization"), request.remote)
        return await handler(request)

    return require_token
