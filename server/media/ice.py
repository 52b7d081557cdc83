"""STUN/TURN servers: parsed once from the configuration, handed to aiortc, to the pages and to
WHIP/WHEP clients (RFC 9725 Link headers).

On the command line a server is one URL, `--ice-server stun:stun.l.google.com:19302` or
`--ice-server turn:USER:PASSWORD@turn.example.com:3478?transport=udp`: TURN credentials ride in
front of the host because TURN URIs (RFC 7065) have no user part, and one flag per server is what
a shell script can carry. Percent-encode a ':' or '@' inside the user name or password (TURN REST
user names look like `1700000000:alice`, so `1700000000%3Aalice`). A config file may also give
the mapping form `{urls: [...], username: ..., credential: ...}`.

With a shared secret (`--turn-secret`, coturn's `use-auth-secret`) TURN URLs carry no credentials:
each peer is handed its own time-limited pair (the TURN REST scheme: username `EXPIRY:TAG`,
password base64(HMAC-SHA1(secret, username))), and the secret never leaves the server.
Credentials of either kind go only to authenticated callers (docs/RELIABILITY.md, "ICE servers").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from typing import Any, Optional
from urllib.parse import unquote

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_URL = re.compile(r"^(?P<scheme>stuns?|turns?):(?:(?P<user>[^:@/]*):(?P<password>[^@/]*)@)?(?P<rest>[^@\s]+)$")


class IceServer(BaseModel):
    """One STUN or TURN server, as RTCIceServer (W3C) spells it."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(min_length=1)
    username: Optional[str] = None
    credential: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_ice_url(value)
        if isinstance(value, dict) and isinstance(value.get("urls"), str):
            return {**value, "urls": [value["urls"]]}
        return value

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            match = _URL.match(url)
            if match is None or match["user"] is not None:
                raise ValueError(f"not a stun:/stuns:/turn:/turns: URL without credentials: {url!r}")
        return urls

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> "IceServer":
        if (self.username is None) != (self.credential is None):
            raise ValueError("give both a username and a credential, or neither")
        return self

    @property
    def is_turn(self) -> bool:
        return any(u.startswith("turn") for u in self.urls)

    @property
    def is_public(self) -> bool:
        """Whether anyone may be shown this server: it carries no credentials and needs none."""
        return not self.is_turn and self.username is None

    def public_url(self) -> str:
        """The first URL, for logs (no credentials)."""
        return self.urls[0]


def check_turn_credentials(servers: list[IceServer], have_secret: bool) -> None:
    """A TURN server needs its own credentials or a shared secret to mint them from."""
    for server in servers:
        if server.is_turn and server.username is None and not have_secret:
            raise ValueError(
                f"the TURN server {server.public_url()} needs credentials (turn:USER:PASSWORD@host:port) "
                "or a shared secret (--turn-secret)"
            )


def turn_rest_credentials(secret: str, ttl_s: int, tag: str, now: Optional[float] = None) -> tuple[str, str]:
    """The TURN REST scheme's (username, password), valid for `ttl_s` seconds from `now`."""
    username = f"{int(time.time() if now is None else now) + ttl_s}:{tag}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def servers_for_peer(servers: list[IceServer], secret: Optional[SecretStr], ttl_s: int,
                     tag: Optional[str] = None) -> list[IceServer]:
    """The servers as one peer uses them: TURN servers without credentials get a fresh
    time-limited pair minted from `secret` (tagged `tag`, random by default)."""
    out = []
    for server in servers:
        if server.is_turn and server.username is None and secret is not None:
            username, password = turn_rest_credentials(
                secret.get_secret_value(), ttl_s, tag or secrets.token_hex(6)
            )
            server = server.model_copy(update={"username": username, "credential": password})
        out.append(server)
    return out


def public_servers(servers: list[IceServer]) -> list[IceServer]:
    """What an unauthenticated caller may see: servers that carry and need no credentials."""
    return [s for s in servers if s.is_public]


def parse_ice_url(text: str) -> dict[str, Any]:
    """`turn:USER:PASSWORD@host:port?transport=udp` -> {urls, username, credential}."""
    match = _URL.match(text.strip())
    if match is None:
        raise ValueError(f"not a STUN/TURN URL (stun:host:port, turn:USER:PASSWORD@host:port): {text!r}")
    url = f"{match['scheme']}:{match['rest']}"
    if match["user"] is None:
        return {"urls": [url]}
    return {"urls": [url], "username": unquote(match["user"]), "credential": unquote(match["password"])}


def rtc_configuration(servers: list[IceServer]) -> Optional[RTCConfiguration]:
    if not servers:
        return None  # aiortc's default (a public STUN server)
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in servers]
    )


def peer_connection(servers: list[IceServer]) -> RTCPeerConnection:
    return RTCPeerConnection(rtc_configuration(servers))


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link_headers(servers: list[IceServer]) -> list[str]:
    """RFC 9725 §4.6: one `Link: <url>; rel="ice-server"` per URL, TURN credentials as attributes."""
    links = []
    for server in servers:
        for url in server.urls:
            link = f'<{url}>; rel="ice-server"'
            if server.username is not None and server.credential is not None:
                link += f"; username={_quote(server.username)}; credential={_quote(server.credential)}"
                link += '; credential-type="password"'
            links.append(link)
    return links
