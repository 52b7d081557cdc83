"""WHEP viewer slots against a real `python -m server` (tiny model, CPU): offers whose ICE never
completes (issue #18, item 2) must not lock real viewers out, and are dropped after
`--viewer-connect-timeout`. docs/RELIABILITY.md reports what this saw."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.conftest import RtcClient, WhepClient, run_server
from tests.test_reliability import record, wait_until

CONNECT_TIMEOUT_S = 4.0
MAX_VIEWERS = 2
MAX_PENDING = 2
STALE_OFFERS = 6  # more than both limits together
SDP = {"Content-Type": "application/sdp"}


async def stale_viewer_offer(candidates: bool) -> str:
    """A real aiortc recvonly offer whose peer is closed before any answer: ICE never completes.
    With `candidates`, the offer names the closed peer's (dead) ports; without, it names none."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    if not candidates:
        sdp = "".join(line for line in sdp.splitlines(keepends=True)
                      if not line.startswith(("a=candidate", "a=end-of-candidates")))
    return sdp


async def test_whep_offers_that_never_connect_do_not_lock_out_viewers(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-viewers", str(MAX_VIEWERS), "--max-pending-viewers", str(MAX_PENDING),
                    "--viewer-connect-timeout", str(CONNECT_TIMEOUT_S), "--idle-timeout", "120") as server:
        publisher = RtcClient(server.url)
        viewers: list[WhepClient] = []
        try:
            sid = await publisher.connect(width=160, height=120, fps=12)
            await publisher.wait_for(lambda: len(publisher.frames) >= 2, 90, "the session's first frames")
            info = lambda: server.get(f"/api/sessions/{sid}")  # noqa: E731

            # The attack: more never-connecting offers than there are slots, by plain HTTP.
            locations, pending_seen = [], []
            async with aiohttp.ClientSession() as http:
                for i in range(STALE_OFFERS):
                    offer = await stale_viewer_offer(candidates=i % 2 == 0)
                    async with http.post(f"{server.url}/whep/{sid}", data=offer, headers=SDP) as r:
                        assert r.status == 201, (i, r.status, await r.text())
                        locations.append(r.headers["Location"])
                    pending_seen.append(info()["viewers_connecting"])
                last_stale_at = time.monotonic()
                assert max(pending_seen) == MAX_PENDING, pending_seen  # the oldest made room for the newer
                # The evicted ones are gone: their resource no longer exists.
                async with http.delete(server.url + locations[0]) as r:
                    assert r.status == 404

                # A real viewer still gets in at once, and receives the output.
                real = WhepClient(server.url)
                viewers.append(real)
                started = time.monotonic()
                await real.watch(sid)
                await real.wait_frames(3, timeout=60)
                real_frames_s = time.monotonic() - started

                # The stale ones are dropped once their connect timeout has passed.
                await wait_until(lambda: info()["viewers_connecting"] == 0, CONNECT_TIMEOUT_S + 10,
                                 "the pending viewers to be dropped")
                dropped_s = time.monotonic() - last_stale_at
                assert info()["viewers"] == 1
                async with http.delete(server.url + locations[-1]) as r:
                    assert r.status == 404

                # Connected viewers have their own limit: a second real viewer fits, a third does not.
                second = WhepClient(server.url)
                viewers.append(second)
                await second.watch(sid)
                await second.wait_frames(3, timeout=60)
                await wait_until(lambda: info()["viewers_connecting"] == 0, 10, "the second viewer to connect")
                async with http.post(f"{server.url}/whep/{sid}", data=await stale_viewer_offer(True), headers=SDP) as r:
                    full_status, full_body, retry_after = r.status, await r.text(), r.headers.get("Retry-After")
                assert full_status == 503 and "maximum of 2 viewers" in full_body and retry_after, (full_status, full_body)
                n = len(real.frames)
                await real.wait_frames(n + 3, timeout=30)  # the connected viewers kept watching
            record("WHEP viewer slots", stale_offers=STALE_OFFERS, max_pending=MAX_PENDING, max_viewers=MAX_VIEWERS,
                   pending_seen=pending_seen, real_viewer_frames_s=f"{real_frames_s:.1f}",
                   connect_timeout_s=CONNECT_TIMEOUT_S, stale_dropped_after_s=f"{dropped_s:.1f}",
                   third_viewer=full_status)
            assert dropped_s <= CONNECT_TIMEOUT_S + 10
        finally:
            await asyncio.gather(*(v.close() for v in viewers), publisher.close(), return_exceptions=True)
