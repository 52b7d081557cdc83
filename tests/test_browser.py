"""The web page in headless Chromium with a fake camera: start a session, see generated video play
and the stats panel fill in, change the prompt live, stop."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]

VIDEO = "document.getElementById('output-video')"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")
def test_page_streams_generated_video(server: ServerProcess) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")

            page.wait_for_function("!document.getElementById('start').disabled", timeout=30_000)
            assert "RANDOM WEIGHTS" in page.inner_text("#banner") and page.is_visible("#banner")
            assert "tiny" in page.inner_text("#engine-badge")

            page.click("#start")
            page.wait_for_function(f"{VIDEO}.videoWidth > 0", timeout=90_000)
            # The square model output comes back at the fake camera's 4:3 (Chrome may scale the
            # camera down when the machine is busy, so only the aspect is fixed).
            width, height = page.evaluate(f"[{VIDEO}.videoWidth, {VIDEO}.videoHeight]")
            assert width * 3 == height * 4, (width, height)
            t0 = page.evaluate(f"{VIDEO}.currentTime")
            page.wait_for_function(f"{VIDEO}.currentTime > {t0} + 1", timeout=30_000)  # it plays

            page.wait_for_function("/\\d/.test(document.getElementById('stat-ttff').textContent)", timeout=30_000)
            for stat in ("stat-fps-in", "stat-fps-out", "stat-p50", "stat-frames"):
                assert re.search(r"\d", page.inner_text(f"#{stat}")), stat
            assert float(page.inner_text("#stat-fps-in")) > 0

            page.fill("#prompt", "a stained glass window")
            page.click("#apply-prompt")
            page.wait_for_function(
                "document.getElementById('control-feedback').textContent.includes('prompt')", timeout=10_000
            )
            sessions = server.get("/api/sessions")["sessions"]
            assert "a stained glass window" in [s["prompt"] for s in sessions if s["state"] == "streaming"]

            page.click("#stop")
            page.wait_for_function("document.getElementById('start').disabled === false", timeout=10_000)
            assert errors == []
        finally:
            browser.close()
