"""What a new user tripped on in the pages (issue 22), in headless Chromium: the token field only when
the server wants it, Stop that releases the camera at once, "Control" on a WHIP session behind a
token, and /view without its #token=."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import TEST_TOKEN, ServerProcess, WhipClient, run_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium").exists(),
        reason="chromium is not installed (apt-get install chromium)",
    ),
]

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
TEXT = "document.getElementById('{}').textContent"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose token guards everything (the default scope)."""
    with run_server(tmp_path_factory.mktemp("locked"), env={"STREAM_TOKEN": TEST_TOKEN}) as s:
        yield s


async def test_token_field_hidden_when_no_token_is_needed(server: ServerProcess) -> None:
    from playwright.async_api import async_playwright

    assert server.get("/api/info")["token_required"] is False  # the shared server's scope is publish
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(server.url + "/")
            await page.wait_for_function("!document.getElementById('start').disabled", timeout=30_000)
            assert await page.get_attribute("#token-row", "hidden") is not None
            assert await page.is_hidden("#token-row")  # hidden means not on screen, whatever the CSS
        finally:
            await browser.close()


async def test_stop_says_stopping_and_releases_the_camera_at_once(server: ServerProcess) -> None:
    from playwright.async_api import Route, async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FAKE_CAMERA)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(server.url + "/")
            await page.wait_for_function("!document.getElementById('start').disabled", timeout=30_000)
            await page.click("#start")
            await page.wait_for_function("!document.getElementById('stop').disabled", timeout=60_000)
            await page.evaluate("window.cam = document.getElementById('input-video').srcObject.getVideoTracks()[0]")
            assert await page.evaluate("cam.readyState") == "live"

            async def slow_delete(route: Route) -> None:  # the server's answer as slow as a busy engine's
                if route.request.method == "DELETE":
                    await asyncio.sleep(4)
                await route.continue_()

            await page.route("**/api/sessions/*", slow_delete)
            await page.click("#stop")
            t0 = time.monotonic()
            await page.wait_for_function(f"{TEXT.format('status')} === 'stopping…'", timeout=1_000)
            await page.wait_for_function("cam.readyState === 'ended'", timeout=1_000)
            assert time.monotonic() - t0 < 2, "the camera stayed on until the DELETE returned"
            assert await page.evaluate("document.getElementById('input-video').srcObject") is None
            await page.wait_for_function(f"{TEXT.format('status')} === 'idle'", timeout=15_000)
            assert not await page.is_disabled("#start")
            assert errors == []
        finally:
            await browser.close()


async def test_control_loads_a_whip_sessions_settings_behind_a_token(locked: ServerProcess, peers) -> None:
    from playwright.async_api import async_playwright

    publisher: WhipClient = peers(WhipClient(locked.url))
    await publisher.publish(width=192, height=144, fps=10,
                            query="?prompt=obs%20prompt&steps=1&noise_strength=0.5&seed=7&motion_control=false")
    sid = publisher.session_id
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(locked.url + "/")
            await page.wait_for_selector("#token-row", state="visible", timeout=30_000)
            # Not "none": the table says why it cannot list the sessions.
            await page.wait_for_function(f"{TEXT.format('sessions')}.includes('access token')", timeout=15_000)

            await page.fill("#token", TEST_TOKEN)
            await page.press("#token", "Tab")  # 'change'
            row = page.locator("#sessions tr", has_text=sid[:8])
            await row.wait_for(timeout=15_000)
            await page.wait_for_function("document.getElementById('steps-value').textContent === '2'")
            await row.locator("button", has_text="Control").click()
            # The session's own settings, not the page's defaults (tiny's default is 2 steps).
            await page.wait_for_function(f"{TEXT.format('steps-value')} === '1'", timeout=10_000)
            assert await page.input_value("#steps") == "1"
            assert await page.text_content("#strength-value") == "0.50"
            assert await page.input_value("#seed") == "7"
            assert not await page.is_checked("#motion")
            assert await page.input_value("#prompt") == "obs prompt"
            # Its output plays in the output pane (over WHEP, with the token).
            await page.wait_for_function("document.getElementById('output-video').videoWidth === 192", timeout=90_000)

            # Without the token the REST calls fail and say so; entering it clears that error.
            await page.fill("#token", "")
            await page.press("#token", "Tab")
            await page.wait_for_function(f"{TEXT.format('control-feedback')}.includes('Authorization')", timeout=10_000)
            await page.fill("#token", TEST_TOKEN)
            await page.press("#token", "Tab")
            await page.wait_for_function(f"!{TEXT.format('control-feedback')}.includes('Authorization')", timeout=3_000)
            await row.wait_for(timeout=15_000)
            assert errors == []
        finally:
            await browser.close()
    assert await publisher.delete() == 200


async def test_view_without_token_says_add_it_and_backs_off(locked: ServerProcess) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page()
            offers: list[float] = []
            page.on("request", lambda r: offers.append(time.monotonic()) if r.method == "POST" and "/whep/" in r.url else None)
            t0 = time.monotonic()
            await page.goto(locked.url + "/view/latest")
            await page.wait_for_function(f"{TEXT.format('status')}.includes('#token=')", timeout=15_000)
            await asyncio.sleep(max(0.0, t0 + 12 - time.monotonic()))
            assert "#token=" in (await page.text_content("#status") or "")  # still on screen
            # Backing off: 0, 2, 6 s (then 14, 30, 30...), not one offer every 2 s or faster.
            assert len(offers) <= 3, [round(t - t0, 1) for t in offers]
            gaps = [b - a for a, b in zip(offers, offers[1:])]
            assert gaps == sorted(gaps), gaps
        finally:
            await browser.close()
