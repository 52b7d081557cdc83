"""Attacks from an adversarial test, replayed against a real `python -m server`: cross-site
requests and DNS rebinding against the default server (no token, loopback), TURN credentials on
open endpoints, and hostile JSON. Each gets the answer docs/RELIABILITY.md promises ("Host,
Origin and content types", "ICE servers")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import make_mocked_request
from aiohttp import web

from server.config import ServerConfig, parse_args, worker_options
from server.ops.guard import HostPolicy, OriginPolicy, same_origin, split_host
from server.media.ice import turn_rest_credentials
from server.state import STATE, AppState
from server.outputs.whip import sdp_created
from tests.conftest import REPO, ServerProcess, run_server
from tests.test_security import Http, _offer_sdp

EVIL = "https://evil.example"
JSON = {"Content-Type": "application/json"}
RESTREAM = b'{"kind":"restream","url":"tcp://127.0.0.1:9"}'
TOKEN = "tok-8d1c0e77"
TURN_PASSWORD = "pw-5e1f9a"
TURN_SECRET = "rest-secret-3b7c21"


@pytest.fixture(scope="module")
def dserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server as `make run` starts it: no token, no --cors-origin, loopback."""
    with run_server(tmp_path_factory.mktemp("attacks"), "--idle-timeout", "300") as s:
        yield s


@pytest.fixture(scope="module")
def dhttp(dserver: ServerProcess) -> Http:
    return Http(dserver.url)


@pytest.fixture(scope="module")
def session_id(dhttp: Http) -> str:
    status, _, body = dhttp("POST", "/api/offer", json.dumps({"sdp": _offer_sdp(), "type": "offer"}), JSON)
    assert status == 200, body
    return json.loads(body)["session_id"]


def test_cross_site_requests_are_refused(dserver: ServerProcess, dhttp: Http, session_id: str) -> None:
    outputs = f"/api/sessions/{session_id}/outputs"
    own = f"http://127.0.0.1:{urlsplit(dserver.url).port}"
    # The reported attack: a no-cors fetch of an untyped Blob sends no Content-Type and no preflight.
    status, _, body = dhttp("POST", outputs, RESTREAM, {"Origin": EVIL})
    assert status == 403, body
    for headers in ({"Origin": EVIL, **JSON}, {"Origin": EVIL, "Content-Type": "text/plain"}, {"Origin": "null", **JSON}):
        status, _, body = dhttp("POST", outputs, RESTREAM, headers)
        assert status == 403, (headers, body)
    assert dhttp("PATCH", f"/api/sessions/{session_id}", b'{"steps":1}', {"Origin": EVIL, **JSON})[0] == 403
    assert dhttp("DELETE", f"/api/sessions/{session_id}", None, {"Origin": EVIL})[0] == 403
    assert dhttp("POST", "/api/offer", json.dumps({"sdp": _offer_sdp(), "type": "offer"}), {"Origin": EVIL, **JSON})[0] == 403
    # Without an Origin (not a page: curl, OBS) a body must still say it is JSON.
    status, _, body = dhttp("POST", outputs, RESTREAM)
    assert status == 415, body
    assert dhttp("POST", outputs, RESTREAM, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    # Nothing was started, and the session lives on.
    status, _, body = dhttp("GET", outputs)
    assert status == 200 and json.loads(body)["outputs"] == [], body
    # The server's own page may (browsers send Origin with every PATCH), with or without a port.
    status, _, body = dhttp("PATCH", f"/api/sessions/{session_id}", b'{"steps":1}', {"Origin": own, **JSON})
    assert status == 200, body
    assert dhttp("PATCH", f"/api/sessions/{session_id}", b'{"steps":1}',
                 {"Origin": own.replace("127.0.0.1", "localhost"), "Host": f"localhost:{urlsplit(own).port}", **JSON})[0] == 200


def test_dns_rebinding_is_refused(dserver: ServerProcess, dhttp: Http, session_id: str) -> None:
    port = urlsplit(dserver.url).port
    for path in ("/api/sessions", "/api/info", "/", "/metrics", f"/api/sessions/{session_id}"):
        status, _, body = dhttp("GET", path, headers={"Host": f"attacker.example:{port}"})
        assert status == 421, (path, status, body)
        assert "--public-host" in json.loads(body)["error"]
    # A rebound page is same-origin with itself, so its Origin matches its Host: still refused.
    rebound = {"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}", **JSON}
    assert dhttp("POST", f"/api/sessions/{session_id}/outputs", RESTREAM, rebound)[0] == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", f"app.localhost:{port}"):
        status, _, body = dhttp("GET", "/api/sessions", headers={"Host": host})
        assert status == 200, (host, body)
        assert session_id in body.decode()
    for host in (f"127.0.0.1.attacker.example:{port}", "[::1", "a b", "localhost.:x"):
        assert dhttp("GET", "/api/sessions", headers={"Host": host})[0] in (400, 421), host


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 60_000, b"[" * 5000 + b"]" * 5000,
                                  b"9" * 20_000, b'{"sdp": NaN, "type": "offer"}', b"\xff\xfe\x00{"])
def test_hostile_json_gets_400(dserver: ServerProcess, dhttp: Http, session_id: str, body: bytes) -> None:
    for method, path in (("POST", "/api/offer"), ("PATCH", f"/api/sessions/{session_id}"),
                         ("POST", f"/api/sessions/{session_id}/outputs")):
        status, _, text = dhttp(method, path, body, JSON)
        assert status == 400, (method, path, status, text)
    assert "Traceback" not in dserver.log.read_text()


# -- ICE servers and their credentials ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A token in publish scope (the API open, WHIP and outputs guarded), a TURN server with its
    own credentials and one whose credentials are minted from a shared secret. No session is
    opened here, so the server's peer connections never try the unreachable TURN addresses."""
    with run_server(tmp_path_factory.mktemp("turn"), "--token-scope", "publish",
                    "--ice-server", "stun:127.0.0.1:3478",
                    "--ice-server", f"turn:alice:{TURN_PASSWORD}@127.0.0.1:3478?transport=udp",
                    "--ice-server", "turn:127.0.0.1:3479",
                    env={"STREAM_TOKEN": TOKEN, "STREAM_TURN_SECRET": TURN_SECRET}) as s:
        yield s


def test_turn_credentials_only_for_authenticated_callers(tserver: ServerProcess) -> None:
    http = Http(tserver.url)
    status, _, body = http("GET", "/api/info")
    assert status == 200
    info = json.loads(body)
    assert info["ice_servers"] == [{"urls": ["stun:127.0.0.1:3478"]}] and info["turn"] is True
    for secret in (TURN_PASSWORD, TURN_SECRET, "alice", TOKEN):
        assert secret not in body.decode()
    assert http("GET", "/api/ice-servers")[0] == 401  # open API in publish scope, but not this
    assert http("GET", "/api/ice-servers", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, headers, body = http("GET", "/api/ice-servers", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["cache-control"] == "no-store"
    stun, static, minted = json.loads(body)["ice_servers"]
    assert stun == {"urls": ["stun:127.0.0.1:3478"]}
    assert (static["username"], static["credential"]) == ("alice", TURN_PASSWORD)
    expiry, _, tag = minted["username"].partition(":")
    assert abs(int(expiry) - (time.time() + 86400)) < 120 and tag
    expected = base64.b64encode(hmac.new(TURN_SECRET.encode(), minted["username"].encode(), hashlib.sha1).digest())
    assert minted["credential"] == expected.decode() and TURN_SECRET not in body.decode()
    again = json.loads(http("GET", "/api/ice-servers", headers={"Authorization": f"Bearer {TOKEN}"})[2])
    assert again["ice_servers"][2]["username"] != minted["username"]  # each peer its own
    log = tserver.log.read_text()
    for secret in (TURN_PASSWORD, TURN_SECRET, TOKEN, minted["credential"]):
        assert secret not in log


def test_turn_rest_credentials() -> None:
    user, password = turn_rest_credentials("north", 100, "alice", now=1_599_999_900)
    assert user == "1600000000:alice"
    assert password == base64.b64encode(hmac.digest(b"north", b"1600000000:alice", "sha1")).decode()


def test_whep_link_headers_carry_turn_credentials_only_with_the_token(tmp_path: Path) -> None:
    config = ServerConfig(token=TOKEN, token_scope="publish", turn_secret=TURN_SECRET,
                          ice_servers=["stun:s.example:3478", f"turn:bob:{TURN_PASSWORD}@t.example:3478", "turn:u.example:3478"])
    app = web.Application()
    app[STATE] = AppState(config, worker_options(config), REPO / "web")

    def links(headers: dict[str, str]) -> list[str]:
        request = make_mocked_request("POST", "/whep/x", headers=headers, app=app)
        return sdp_created(request, "v=0\r\n", "/whep/x/y", '"e"').headers.getall("Link")

    anonymous = links({})
    assert anonymous == ['<stun:s.example:3478>; rel="ice-server"']
    authed = links({"Authorization": f"Bearer {TOKEN}"})
    assert len(authed) == 3 and f'credential="{TURN_PASSWORD}"' in authed[1] and "username=" in authed[2]


def test_turn_configuration_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAM_TURN_SECRET", raising=False)
    with pytest.raises(SystemExit):  # a TURN server needs credentials or a secret to mint them from
        parse_args(["--ice-server", "turn:t.example:3478"])
    config = parse_args(["--ice-server", "turn:t.example:3478", "--turn-secret", TURN_SECRET])
    assert TURN_SECRET not in repr(config)
    monkeypatch.setenv("STREAM_TURN_SECRET", "from-env")
    assert parse_args(["--ice-server", "turn:t.example:3478"]).turn_secret.get_secret_value() == "from-env"


# -- the rules, one by one -----------------------------------------------------------------------------


def test_host_and_origin_rules() -> None:
    assert split_host("[::1]:8080") == ("::1", 8080) and split_host("Example.COM.") == ("example.com", None)
    assert split_host("a:b:c") == ("a:b:c", None) and split_host("h:99999") is None and split_host("[::1") is None
    loopback = HostPolicy("127.0.0.1", [])
    assert all(loopback.allows(h) for h in ("127.0.0.1:1", "localhost", "[::1]", "x.localhost", "127.8.0.1"))
    assert not any(loopback.allows(h) for h in ("10.0.0.5", "evil.example", "localhost.evil.example", ""))
    everywhere = HostPolicy("0.0.0.0", ["studio.example"])
    assert all(everywhere.allows(h) for h in ("10.0.0.5:8080", "[2001:db8::1]", "studio.example:443"))
    assert not everywhere.allows("evil.example")
    assert HostPolicy("127.0.0.1", ["*"]).allows("anything.example")
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("https://studio.example", "studio.example")  # behind a TLS proxy
    assert not same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not same_origin("null", "127.0.0.1:8080") and not same_origin("file://", "127.0.0.1")
    origins = OriginPolicy(["https://studio.example/"])
    assert origins.allows("https://studio.example", "127.0.0.1:8080")
    assert not origins.allows("https://evil.example", "127.0.0.1:8080")
    assert OriginPolicy(["*"]).allows("https://evil.example", None)
