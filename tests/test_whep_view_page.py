"""The /view page (an OBS Browser Source) in headless Chromium: it plays a WHIP session's output
over WHEP, full window, and under /view/latest follows the next session when OBS publishes again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, WhipClient

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
VIDEO = "document.getElementById('output')"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")
async def test_view_page_plays_and_follows_the_latest_session(server: ServerProcess, peers) -> None:
    from playwright.async_api import async_playwright

    first: WhipClient = peers(WhipClient(server.url))
    await first.publish(width=320, height=240, fps=12)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 640, "height": 360})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{server.url}/view/latest")

            await page.wait_for_function(f"{VIDEO}.videoWidth === 320", timeout=90_000)
            t0 = await page.evaluate(f"{VIDEO}.currentTime")
            await page.wait_for_function(f"{VIDEO}.currentTime > {t0} + 1", timeout=30_000)  # it plays
            assert await page.is_hidden("#status")  # nothing on screen but the video
            box = await page.evaluate(f"[{VIDEO}.clientWidth, {VIDEO}.clientHeight]")
            assert box == [640, 360]  # full window
            assert server.get(f"/api/sessions/{first.session_id}")["viewers"] == 1

            # OBS stops and publishes again: a new session, which the page picks up by itself.
            assert await first.delete() == 200
            second: WhipClient = peers(WhipClient(server.url))
            await second.publish(width=192, height=144, fps=12)
            await page.wait_for_function(f"{VIDEO}.videoWidth === 192", timeout=90_000)
            t1 = await page.evaluate(f"{VIDEO}.currentTime")
            await page.wait_for_function(f"{VIDEO}.currentTime > {t1} + 1", timeout=30_000)
            assert server.get(f"/api/sessions/{second.session_id}")["viewers"] == 1
            assert errors == []
            await page.close()  # pagehide: the page's DELETE frees its viewer
            await _until(lambda: server.get(f"/api/sessions/{second.session_id}")["viewers"] == 0, 30)
            assert await second.delete() == 200
        finally:
            await browser.close()


async def _until(predicate, timeout: float) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")
async def test_main_page_controls_a_whip_session(server: ServerProcess, peers) -> None:
    """The page lists the server's sessions; "Control" points its controls at one published over
    WHIP, which then change through the REST API."""
    from playwright.async_api import async_playwright

    publisher: WhipClient = peers(WhipClient(server.url))
    await publisher.publish(width=192, height=144, fps=10, query="?prompt=obs%20prompt")
    sid = publisher.session_id
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server.url + "/")
            row = page.locator("#sessions tr", has_text=sid[:8])
            await row.wait_for(timeout=30_000)
            assert "WHIP" in await row.inner_text() and "obs prompt" in await row.inner_text()
            assert await row.locator("a", has_text="View").get_attribute("href") == f"/view/{sid}"
            assert (await page.inner_text("#whip-url")).endswith("/whip")

            await row.locator("button", has_text="Control").click()
            assert sid[:8] in (await page.text_content("#control-target") or "")
            assert await page.input_value("#prompt") == "obs prompt"
            await page.wait_for_function("/\\d/.test(document.getElementById('stat-fps-in').textContent)",
                                         timeout=30_000)  # its stats, polled over REST
            await page.fill("#prompt", "a pixel-art castle")
            await page.click("#apply-prompt")
            await page.wait_for_function(
                "document.getElementById('control-feedback').textContent.includes('prompt')", timeout=10_000
            )
            info = server.get(f"/api/sessions/{sid}")
            assert info["prompt"] == "a pixel-art castle"
            await _until(lambda: server.get(f"/api/sessions/{sid}")["stats"]["engine_prompt"] == "a pixel-art castle", 30)
            assert errors == []
        finally:
            await browser.close()
    assert await publisher.delete() == 200
