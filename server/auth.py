"""Who may publish (WHIP) and start outputs (recordings write files, restreams connect out).

With a token configured (`--token` or $STREAM_TOKEN) those requests need `Authorization: Bearer
TOKEN` (RFC 9725 §4.5 / RFC 6750), from anywhere. Without one they are open to loopback clients
only: a fresh server on a laptop works with OBS on the same machine, while a server started with
`--host 0.0.0.0` and no token does not hand the machine's disk and uplink to its network.
Watching (WHEP, /view) needs no token: a session id is 128 random bits.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Optional

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
