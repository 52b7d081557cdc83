"""Pages of other origins in headless Chromium: one allowed with --cors-origin drives the API, one
that is not gets nothing done, including the reported attack (a no-cors POST of an untyped Blob,
which a browser sends without a preflight) (docs/RELIABILITY.md, "Host, Origin and content types")."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ServerProcess, _free_port, run_server
from tests.test_reliability import make_offer
from tests.test_security import Http

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@contextlib.contextmanager
def static_site(root: Path) -> Iterator[str]:
    """A page of its own origin (another loopback port) that the test drives."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("<!doctype html><title>another site</title>")
    port = _free_port()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")
async def test_allowed_origin_works_and_others_get_nothing_done(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    with static_site(tmp_path / "studio") as studio, static_site(tmp_path / "evil") as evil, \
            run_server(tmp_path, "--cors-origin", studio, "--idle-timeout", "120") as server:
        api = Http(server.url)
        status, _, body = api("POST", "/api/offer", json.dumps({"sdp": await make_offer(), "type": "offer"}),
                              {"Content-Type": "application/json"})
        assert status == 200, body
        sid = json.loads(body)["session_id"]
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                allowed = await browser.new_page()
                await allowed.goto(studio)
                result = await allowed.evaluate("""async ([url, sid]) => {
                    const r = await fetch(`${url}/api/sessions/${sid}`, {method: 'PATCH',
                        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({seed: 7})});
                    return [r.status, (await r.json()).params.seed];
                }""", [server.url, sid])
                assert result == [200, 7]

                other = await browser.new_page()
                await other.goto(evil)
                blocked = await other.evaluate("""async ([url, sid]) => {
                    try {
                        await fetch(`${url}/api/sessions/${sid}`, {method: 'PATCH',
                            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({seed: 9})});
                        return 'sent';
                    } catch (e) { return 'blocked'; }
                }""", [server.url, sid])
                assert blocked == "blocked"
                # The reported attack: no preflight, so the browser does send it, with its Origin.
                await other.evaluate("""async ([url, sid]) => {
                    await fetch(`${url}/api/sessions/${sid}/outputs`, {method: 'POST', mode: 'no-cors',
                        body: new Blob([JSON.stringify({kind: 'restream', url: 'tcp://127.0.0.1:9'})])});
                }""", [server.url, sid])
            finally:
                await browser.close()
        info = server.get(f"/api/sessions/{sid}")
        assert info["params"]["seed"] == 7 and info["outputs"] == []
        log = server.log.read_text()
        assert f'"POST /api/sessions/{sid}/outputs HTTP/1.1" 403' in log  # it arrived, and was refused
