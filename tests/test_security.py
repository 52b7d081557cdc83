"""Access and bad input against a real `python -m server` with a token (default scope: the API,
WHIP and WHEP need it): token checks, CORS, static files that cannot leave web/, refusing to
listen on 0.0.0.0 without a token, and property-based (hypothesis) signaling and control inputs:
never a 5xx, and the server alive after each."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from server.ops import auth
from server.app import resolve_static
from server.ops.auth import check_exposure, needs_token
from tests.conftest import REPO, ServerProcess, _free_port, run_server

# The data-channel test's aiortc thread uses `random` while hypothesis draws: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

TOKEN = "sec-token-5f2b9c1e8a"
ORIGIN = "https://studio.example"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("SECURITY_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Http:
    """Plain synchronous HTTP (hypothesis tests are synchronous), one connection per request."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def __call__(self, method: str, path: str, body: bytes | str | None = None,
                 headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def sserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with run_server(tmp_path_factory.mktemp("security"), "--cors-origin", ORIGIN, "--idle-timeout", "300",
                    env={"STREAM_TOKEN": TOKEN}) as s:
        yield s


@pytest.fixture(scope="module")
def request_(sserver: ServerProcess) -> Http:
    return Http(sserver.url)


def _offer_sdp(video: str = "sendrecv") -> str:
    async def make() -> str:
        from aiortc import RTCPeerConnection

        pc = RTCPeerConnection()
        pc.createDataChannel("control")
        pc.addTransceiver("video", direction=video)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


@pytest.fixture(scope="module")
def offer_sdp() -> str:
    return _offer_sdp()


def alive(server: ServerProcess, request_: Http) -> None:
    assert server.process.poll() is None, server.log.read_text()[-2000:]
    status, _, body = request_("GET", "/healthz")
    assert status == 200, body


# -- tokens ------------------------------------------------------------------------------------------


def test_token_missing_wrong_right(sserver: ServerProcess, request_: Http, offer_sdp: str) -> None:
    offer = json.dumps({"sdp": offer_sdp, "type": "offer"})
    json_ct = {"Content-Type": "application/json"}
    sdp_ct = {"Content-Type": "application/sdp"}
    protected = [("GET", "/api/sessions", None, {}), ("POST", "/api/offer", offer, json_ct),
                 ("PATCH", "/api/sessions/x", "{}", json_ct), ("DELETE", "/api/sessions/x", None, {}),
                 ("POST", "/whip", offer_sdp, sdp_ct), ("POST", "/whep/latest", offer_sdp, sdp_ct),
                 ("DELETE", "/whep/a/b", None, {}), ("GET", "/metrics", None, {}), ("GET", "/api/pipeline", None, {})]
    for method, path, body, headers in protected:
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            status, h, text = request_(method, path, body, {**headers, **bad})
            assert status == 401, (method, path, bad, status, text)
            assert h["www-authenticate"].startswith("Bearer") and b"error" in text
    # Spellings of a protected path that might slip past a prefix check: refused or not found.
    for path in ("/%61pi/sessions", "/api/%73essions", "//api/sessions", "/API/sessions", "/api/sessions/",
                 "/api//sessions", "/./api/sessions", "/whip/../api/sessions", "/metrics/"):
        status, _, text = request_("GET", path)
        assert status in (401, 404, 405), (path, status, text)
    # Right token: the API answers.
    status, _, body = request_("GET", "/api/sessions", headers=AUTH)
    assert status == 200 and json.loads(body) == {"sessions": []}
    status, _, body = request_("POST", "/api/offer", offer, {**json_ct, **AUTH})
    assert status == 200, body
    sid = json.loads(body)["session_id"]
    assert request_("GET", f"/api/sessions/{sid}", headers=AUTH)[0] == 200
    assert request_("GET", "/metrics", headers=AUTH)[0] == 200
    # the engine core's report (one device: a ring of one), once the engine process has sent one
    status, _, body = request_("GET", "/api/pipeline", headers=AUTH)
    assert (status == 200 and len(json.loads(body)["ranks"]) == 1) or (status == 404 and b"yet" in body), body
    assert request_("DELETE", f"/api/sessions/{sid}", headers=AUTH)[0] == 204
    # Open: the pages, what the page needs first, health, CORS preflights.
    status, _, body = request_("GET", "/api/info")
    assert status == 200 and json.loads(body)["token_required"] is True
    for path in ("/", "/view/latest", "/js/app.js", "/healthz"):
        assert request_("GET", path)[0] == 200, path
    assert request_("OPTIONS", "/api/offer", headers={"Origin": ORIGIN})[0] == 204
    # A page of another site cannot post a form (no preflight) that passes for a JSON call.
    status, _, _ = request_("POST", "/api/offer", offer, {"Content-Type": "text/plain", **AUTH})
    assert status == 415


def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    token = SecretStr("abc")
    auth.authorize(token, "Bearer abc", "203.0.113.1")
    with pytest.raises(auth.ApiError):
        auth.authorize(token, "Bearer abd", "127.0.0.1")
    assert calls == [(b"abc", b"abc"), (b"abd", b"abc")]


def test_which_requests_need_the_token() -> None:
    t = SecretStr("x")
    assert needs_token(t, "all", "GET", "/api/sessions") and needs_token(t, "all", "POST", "/whep/latest")
    assert not needs_token(t, "all", "GET", "/api/info") and not needs_token(t, "all", "OPTIONS", "/whip")
    assert not needs_token(t, "all", "GET", "/js/app.js") and not needs_token(None, "all", "GET", "/api/sessions")
    assert not needs_token(t, "publish", "GET", "/api/sessions")  # WHIP/outputs check it themselves


def test_cors_only_for_configured_origins(request_: Http) -> None:
    _, h, _ = request_("GET", "/api/sessions", headers={**AUTH, "Origin": ORIGIN})
    assert h["access-control-allow-origin"] == ORIGIN and "Origin" in h["vary"]
    for origin in ("https://evil.example", "null", ORIGIN + ".evil.example"):
        _, h, _ = request_("GET", "/api/sessions", headers={**AUTH, "Origin": origin})
        assert "access-control-allow-origin" not in h, origin
        _, h, _ = request_("OPTIONS", "/whip", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in h, origin


# -- static files --------------------------------------------------------------------------------------


TRAVERSALS = [
    "/../server/app.py", "/..%2fserver%2fapp.py", "/%2e%2e/%2e%2e/etc/passwd", "/js/..%2f..%2fserver%2fauth.py",
    "/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "//etc/passwd", "/%2fetc%2fpasswd", "/..%5cserver%5capp.py",
    "/js/%2e%2e/%2e%2e/README.md", "/..%252fserver%252fapp.py", "/%00", "/js/app.js%00.html",
    "/.git/config", "/js/../../pyproject.toml", "/web/../../etc/passwd", "/%c0%ae%c0%ae/etc/passwd",
]


def test_static_serving_cannot_leave_web(request_: Http) -> None:
    for path in TRAVERSALS:
        status, _, body = request_("GET", path)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and b"def create_app" not in body and b"[project]" not in body, path


def test_resolve_static_follows_no_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "web"
    (root / "js").mkdir(parents=True)
    (root / "index.html").write_text("ok")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (root / "leak.txt").symlink_to(secret)
    (root / "js" / "up").symlink_to(tmp_path)
    (root / "alias.html").symlink_to(root / "index.html")  # a link that stays inside is fine
    (root / ".env").write_text("x")
    root = root.resolve()
    assert resolve_static(root, "index.html") == root / "index.html"
    assert resolve_static(root, "alias.html") == root / "index.html"
    for path in ("leak.txt", "js/up/secret.txt", "../secret.txt", str(secret), "/etc/passwd", "js/../../secret.txt",
                 ".env", "js", "index.html\x00", "..\\secret.txt", "nope.html"):
        assert resolve_static(root, path) is None, path


# -- refusing to listen openly without a token ------------------------------------------------------


def test_exposure_rule() -> None:
    assert check_exposure("0.0.0.0", None, False) is not None
    assert check_exposure("::", None, False) is not None and check_exposure("192.168.1.4", None, False)
    assert check_exposure("0.0.0.0", SecretStr("t"), False) is None
    assert check_exposure("0.0.0.0", None, True) is None
    for host in ("127.0.0.1", "localhost", "::1"):
        assert check_exposure(host, None, False) is None


def test_refuses_to_start_on_0000_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "STREAM_TOKEN"}
    cmd = [sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", str(_free_port()), "--model", "tiny",
           "--devices", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--allow-anonymous" in done.stderr, (done.returncode, done.stderr[-1000:])
    # With --allow-anonymous it starts (the engine need not be ready: /healthz answers at once).
    port = _free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    proc = subprocess.Popen(cmd + ["--allow-anonymous"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                Http(f"http://127.0.0.1:{port}")("GET", "/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# -- property-based: signaling and control inputs ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
# What a parser chokes on: nesting deeper than its recursion limit, integers longer than Python
# converts, NaN/Infinity, and the encodings JSON may come in (and broken ones).
hostile_json = st.one_of(
    st.integers(1, 200_000).map(lambda n: "[" * n),
    st.integers(1, 60_000).map(lambda n: '{"prompt":' * n),
    st.integers(900, 20_000).map(lambda n: "[" * n + "]" * n),
    st.integers(300, 20_000).map(lambda n: "9" * n),
    st.integers(300, 5000).map(lambda n: '{"seed": 1' + "0" * n + "}"),
    st.sampled_from(["NaN", "-Infinity", "1e999", '{"noise_strength": NaN}', '{"steps": 1e400}',
                     '{"sdp": "v=0", "type": "offer", "params": {"seed": -1e999}}']),
)
encodings = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32", "latin-1"])
hostile_bodies = st.one_of(
    hostile_json.map(str.encode),
    st.tuples(json_values, encodings).map(lambda ve: json.dumps(ve[0], ensure_ascii=False).encode(ve[1], "replace")),
    st.binary(max_size=64).map(lambda b: b"\xff\xfe" + b),
)
update_fields = ["prompt", "transition_chunks", "steps", "noise_strength", "seed", "motion_control", "reset", "type"]


@st.composite
def mutated_sdp(draw: Any, base: str) -> str:
    """A real offer with lines dropped, duplicated or garbled."""
    lines = base.split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "garble", "insert"]))
        if op == "drop":
            lines.pop(i)
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "garble":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))] + draw(st.text(max_size=20))
        else:
            lines.insert(i, draw(st.sampled_from(["m=video 9 UDP/TLS/RTP/SAVPF 96", "a=rtpmap:96 VP8/90000",
                                                  "a=fingerprint:sha-256 00", "m=audio 0 RTP/AVP 0", "c=IN IP4 x"])))
        if not lines:
            lines = [""]
    return "\r\n".join(lines)


def _closing(request_: Http, status: int, body: bytes) -> None:
    """Sessions that a fuzzed offer opened are ended again."""
    if status in (200, 201):
        request_("DELETE", f"/api/sessions/{json.loads(body)['session_id']}", headers=AUTH)


def test_fuzz_offers(sserver: ServerProcess, request_: Http, offer_sdp: str) -> None:
    seen: dict[int, int] = {}

    @FUZZ
    @given(body=st.one_of(
        st.binary(max_size=300),
        hostile_bodies,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"sdp": st.one_of(st.text(max_size=200), mutated_sdp(offer_sdp)), "type": st.sampled_from(["offer", "answer", ""])},
            optional={"prompt": st.one_of(st.none(), st.text(max_size=300)), "params": json_values,
                      "extra": json_values},
        ).map(lambda d: json.dumps(d).encode()),
    ))
    def check(body: bytes) -> None:
        status, _, text = request_("POST", "/api/offer", body, {"Content-Type": "application/json", **AUTH})
        seen[status] = seen.get(status, 0) + 1
        assert status < 500 or status == 503, (status, text)
        _closing(request_, status, text)
        alive(sserver, request_)

    check()
    print(f"[reliability] fuzzed /api/offer: {sum(seen.values())} requests, statuses {sorted(seen.items())}")


def test_fuzz_whip_and_whep(sserver: ServerProcess, request_: Http, offer_sdp: str) -> None:
    seen: dict[int, int] = {}

    @FUZZ
    @given(
        sdp=st.one_of(st.binary(max_size=300), mutated_sdp(offer_sdp).map(str.encode), hostile_bodies,
                      st.tuples(mutated_sdp(offer_sdp), encodings).map(lambda se: se[0].encode(se[1], "replace"))),
        query=st.dictionaries(st.sampled_from(["prompt", "steps", "noise_strength", "seed", "motion_control", "x"]),
                              st.text(max_size=30), max_size=3),
        where=st.sampled_from(["/whip", "/whep/latest", "/whep/0123"]),
        content_type=st.sampled_from(["application/sdp", "application/sdp; charset=utf-8", "text/plain"]),
    )
    def check(sdp: bytes, query: dict[str, str], where: str, content_type: str) -> None:
        from urllib.parse import urlencode

        path = where + ("?" + urlencode(query) if query else "")
        status, headers, text = request_("POST", path, sdp, {"Content-Type": content_type, **AUTH})
        seen[status] = seen.get(status, 0) + 1
        assert status < 500 or status == 503, (status, text)
        if status == 201:
            request_("DELETE", headers["location"], headers=AUTH)
        alive(sserver, request_)

    check()
    print(f"[reliability] fuzzed WHIP/WHEP: {sum(seen.values())} requests, statuses {sorted(seen.items())}")


def test_fuzz_patch_controls(sserver: ServerProcess, request_: Http, offer_sdp: str) -> None:
    status, _, body = request_("POST", "/api/offer", json.dumps({"sdp": offer_sdp, "type": "offer"}),
                               {"Content-Type": "application/json", **AUTH})
    assert status == 200, body
    sid = json.loads(body)["session_id"]
    seen: dict[int, int] = {}

    @FUZZ
    @given(body=st.one_of(
        st.dictionaries(st.sampled_from(update_fields + ["bogus"]), json_values, max_size=4).map(json.dumps).map(str.encode),
        st.text(max_size=100).map(str.encode),
        hostile_bodies,
    ))
    def check(body: bytes) -> None:
        status, _, text = request_("PATCH", f"/api/sessions/{sid}", body,
                                   {"Content-Type": "application/json", **AUTH})
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400, 422, 429), (status, text)
        alive(sserver, request_)

    try:
        check()
        assert request_("GET", f"/api/sessions/{sid}", headers=AUTH)[0] == 200  # the session lives on
    finally:
        request_("DELETE", f"/api/sessions/{sid}", headers=AUTH)
    print(f"[reliability] fuzzed PATCH: {sum(seen.values())} requests, statuses {sorted(seen.items())}")


def test_fuzz_outputs(sserver: ServerProcess, request_: Http, offer_sdp: str) -> None:
    """Output requests (they start encoders and write files): never a 5xx, nothing started by
    a body that is not a valid request."""
    status, _, body = request_("POST", "/api/offer", json.dumps({"sdp": offer_sdp, "type": "offer"}),
                               {"Content-Type": "application/json", **AUTH})
    assert status == 200, body
    sid = json.loads(body)["session_id"]
    seen: dict[int, int] = {}
    output_fields = st.fixed_dictionaries({"kind": st.sampled_from(["record", "restream", "virtual_camera", "x"])},
                                          optional={"url": json_values, "path": json_values, "bitrate_kbps": json_values})

    @FUZZ
    @given(body=st.one_of(hostile_bodies, json_values.map(json.dumps).map(str.encode),
                          output_fields.map(json.dumps).map(str.encode)))
    def check(body: bytes) -> None:
        status, headers, text = request_("POST", f"/api/sessions/{sid}/outputs", body,
                                         {"Content-Type": "application/json", **AUTH})
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, text)
        if status == 201:
            request_("DELETE", headers["location"], headers=AUTH)
        alive(sserver, request_)

    try:
        check()
    finally:
        request_("DELETE", f"/api/sessions/{sid}", headers=AUTH)
    print(f"[reliability] fuzzed outputs: {sum(seen.values())} requests, statuses {sorted(seen.items())}")


class _LoopThread:
    """An event loop in a thread, so a synchronous hypothesis test can drive one live connection."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_fuzz_data_channel_controls(sserver: ServerProcess, request_: Http) -> None:
    """Arbitrary text and JSON on the live `control` channel: each gets an ack or an error back,
    the session keeps streaming."""
    from tests.conftest import RtcClient

    runner = _LoopThread()

    class AuthedClient(RtcClient):
        async def connect(self, **kw: Any) -> str:  # the conftest client posts without a token
            import aiohttp

            orig = aiohttp.ClientSession

            def with_token(*a: Any, **k: Any) -> Any:
                return orig(*a, headers=AUTH, **k)

            aiohttp.ClientSession = with_token  # type: ignore[misc]
            try:
                return await super().connect(**kw)
            finally:
                aiohttp.ClientSession = orig  # type: ignore[misc]

    client = AuthedClient(sserver.url)
    sid = runner.run(client.connect(width=160, height=120, fps=12))
    runner.run(client.wait_for(lambda: client.channel.readyState == "open" and len(client.frames) >= 2, 60, "streaming"))
    sent = [0]

    async def send_and_wait(message: str) -> None:
        replies = lambda: [m for m in client.messages if m.get("type") in ("ack", "error")]  # noqa: E731
        before = len(replies())
        client.channel.send(message)
        await client.wait_for(lambda: len(replies()) > before, 10, "a reply on the control channel")

    @FUZZ
    @given(message=st.one_of(
        st.text(max_size=200),
        st.dictionaries(st.sampled_from(update_fields + ["bogus"]), json_values, max_size=4).map(json.dumps),
        hostile_json.map(lambda m: m[:60_000]),  # within an SCTP message
    ))
    def check(message: str) -> None:
        runner.run(send_and_wait(message))
        sent[0] += 1
        alive(sserver, request_)

    try:
        check()
        n = len(client.frames)
        runner.run(client.wait_for(lambda: len(client.frames) > n + 2, 30, "frames after the fuzzing"))
        assert request_("GET", f"/api/sessions/{sid}", headers=AUTH)[0] == 200
    finally:
        runner.run(client.close())
        runner.stop()
    print(f"[reliability] fuzzed data channel: {sent[0]} messages, session {sid[:8]} still streaming")
