"""WHIP ingest and WHEP egress end to end against `python -m server` (tiny model, CPU): an aiortc
publisher sends H.264 + Opus the way OBS 30+ does; aiortc viewers receive the generated video."""

from __future__ import annotations

import re

import aiohttp

from tests.conftest import TEST_TOKEN, ServerProcess, WhepClient, WhipClient

SDP = {"Content-Type": "application/sdp"}
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def _codecs(sdp: str, kind: str) -> set[str]:
    """Codec names of the first m-line of `kind` in an SDP."""
    section = re.split(r"(?m)^m=", sdp)
    media = next(s for s in section if s.startswith(kind))
    return {m.upper() for m in re.findall(r"a=rtpmap:\d+ ([\w-]+)/", media)}


async def test_obs_like_publisher_reaches_whep_viewers(server: ServerProcess, peers) -> None:
    publisher: WhipClient = peers(WhipClient(server.url))
    await publisher.publish(fps=12, query="?prompt=a%20charcoal%20sketch&noise_strength=0.7")
    sid = publisher.session_id
    assert publisher.location == f"/whip/{sid}" and re.fullmatch(r'"[0-9a-f]{32}"', publisher.etag)
    assert _codecs(publisher.answer, "video") == {"H264"}  # answered in the codec OBS sends
    assert "OPUS" in _codecs(publisher.answer, "audio")  # the audio m-line is accepted (and ignored)
    assert "a=recvonly" in publisher.answer

    info = server.get(f"/api/sessions/{sid}")
    assert info["kind"] == "whip" and info["prompt"] == "a charcoal sketch"
    assert info["params"]["noise_strength"] == 0.7

    # Two viewers of one session: both get frames, the engine still runs one stream.
    first, second = peers(WhepClient(server.url)), peers(WhepClient(server.url))
    await first.watch(sid)
    await second.watch("latest")  # the newest live session: this one
    await first.wait_frames(8, timeout=90)
    await second.wait_frames(8, timeout=30)
    assert first.location.startswith(f"/whep/{sid}/") and second.location.startswith(f"/whep/{sid}/")
    for viewer in (first, second):
        assert {(f.width, f.height) for f in viewer.frames} == {(320, 240)}  # the camera's size
        pts = [f.pts for f in viewer.frames]
        assert all(b > a for a, b in zip(pts, pts[1:]))
    info = server.get(f"/api/sessions/{sid}")
    assert info["viewers"] == 2 and info["stats"]["frames_out"] >= 8 and info["stats"]["chunks"] >= 2
    assert len(server.get("/api/sessions")["sessions"]) >= 1

    # Controls of a WHIP session go through the REST API.
    async with aiohttp.ClientSession() as http:
        async with http.patch(f"{server.url}/api/sessions/{sid}", json={"prompt": "a mosaic", "transition_chunks": 0}) as r:
            assert r.status == 200 and (await r.json())["prompt"] == "a mosaic"
        n = len(first.frames)
        await first.wait_frames(n + 8, timeout=30)
        assert server.get(f"/api/sessions/{sid}")["stats"]["engine_prompt"] == "a mosaic"

        # A viewer leaves; the other keeps watching.
        async with http.delete(server.url + second.location) as r:
            assert r.status == 200
        async with http.delete(server.url + second.location) as r:
            assert r.status == 404
        assert server.get(f"/api/sessions/{sid}")["viewers"] == 1
        n = len(first.frames)
        await first.wait_frames(n + 4, timeout=30)

    # DELETE on the WHIP resource ends the session: gone from the API, closed in the engine,
    # its viewer disconnected.
    assert await publisher.delete() == 200
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/sessions/{sid}") as r:
            assert r.status == 404
    assert sid not in {s["session_id"] for s in server.get("/api/sessions")["sessions"]}
    await _wait_log(server, f"session {sid} closed (", timeout=10)  # the engine worker's log line
    await _wait(lambda: first.pc.connectionState in ("closed", "failed"), 30, "the viewer to be disconnected")
    assert await publisher.delete() == 404


async def test_vp8_publisher_without_audio(server: ServerProcess, peers) -> None:
    publisher: WhipClient = peers(WhipClient(server.url))
    await publisher.publish(codec="VP8", audio=False, fps=10)
    assert _codecs(publisher.answer, "video") == {"VP8"}
    viewer: WhepClient = peers(WhepClient(server.url))
    await viewer.watch(publisher.session_id)
    await viewer.wait_frames(4, timeout=90)
    assert await publisher.delete() == 200


async def test_whip_auth_and_bad_requests(server: ServerProcess, peers) -> None:
    url = server.url
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    async with aiohttp.ClientSession() as http:

        async def expect(method: str, path: str, status: int, **kw) -> aiohttp.ClientResponse:
            async with http.request(method, url + path, **kw) as r:
                body = await r.text()
                assert r.status == status, (method, path, r.status, body)
                if status >= 400:
                    assert r.headers["Content-Type"].startswith("application/json") and "error" in body
                if path.startswith(("/whip", "/whep")):
                    assert r.headers["Access-Control-Allow-Origin"] == "*"
                return r

        # No token, a wrong one, another scheme: 401 with a challenge, before the body is looked at.
        r = await expect("POST", "/whip", 401, data=offer, headers=SDP)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        await expect("POST", "/whip", 401, data=offer, headers={**SDP, "Authorization": "Bearer wrong"})
        await expect("POST", "/whip", 401, data=offer, headers={**SDP, "Authorization": f"Basic {TEST_TOKEN}"})
        await expect("POST", "/whip", 401, data=b"junk", headers={"Authorization": "Bearer " + TEST_TOKEN[:-1]})
        # Authorized but malformed.
        r = await expect("POST", "/whip", 415, data=offer, headers={**AUTH, "Content-Type": "application/json"})
        assert r.headers["Accept-Post"] == "application/sdp"
        await expect("POST", "/whip", 400, data=b"not sdp", headers={**AUTH, **SDP})
        await expect("POST", "/whip", 400, data=b"\xff\xfe", headers={**AUTH, **SDP})
        await expect("POST", "/whip", 400, data=offer + "m=nonsense\r\n", headers={**AUTH, **SDP})
        await expect("POST", "/whip", 400, data=offer, headers={**AUTH, **SDP})  # no video m-line
        av1 = await _offer_in("AV1")  # what newer OBS versions can be set to send
        r = await expect("POST", "/whip", 400, data=av1, headers={**AUTH, **SDP})
        assert "AV1" in (await r.json())["error"] and "H.264" in (await r.json())["error"]
        await expect("POST", "/whip?steps=9", 422, data=offer, headers={**AUTH, **SDP})
        await expect("POST", "/whip?bogus=1", 422, data=offer, headers={**AUTH, **SDP})
        # The resource: token needed to end it, unknown ones are 404, PATCH (trickle) is 405.
        await expect("DELETE", "/whip/0123456789abcdef", 401)
        await expect("DELETE", "/whip/0123456789abcdef", 404, headers=AUTH)
        r = await expect("PATCH", "/whip/0123456789abcdef", 405, headers=AUTH, data="a=candidate")
        assert "DELETE" in r.headers["Allow"]
        # CORS preflight, no token needed.
        r = await expect("OPTIONS", "/whip", 204, headers={"Origin": "https://example.org",
                                                          "Access-Control-Request-Method": "POST"})
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert r.headers["Accept-Post"] == "application/sdp"
        assert "Location" in r.headers["Access-Control-Expose-Headers"]
        await expect("OPTIONS", "/whep/latest", 204)
        # WHEP: unknown session, bad body.
        await expect("POST", "/whep/not-a-session", 404, data=offer, headers=SDP)
        await expect("DELETE", "/whep/not-a-session/x", 404)

    # A session that is publishing is not disturbed by any of that, nor by a wrong-token DELETE.
    publisher: WhipClient = peers(WhipClient(server.url))
    await publisher.publish(fps=10)
    async with aiohttp.ClientSession() as http:
        async with http.delete(url + publisher.location, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.post(f"{url}/whep/{publisher.session_id}", data="v=0\r\n", headers=SDP) as r:
            assert r.status == 400
    await _wait(lambda: server.get(f"/api/sessions/{publisher.session_id}")["stats"]["frames_in"] > 0, 30, "frames in")
    assert server.get(f"/api/sessions/{publisher.session_id}")["state"] == "streaming"
    assert await publisher.delete() == 200


async def _offer_in(codec: str) -> str:
    """An H.264 offer with its codec renamed: the SDP of a client that only sends `codec`."""
    from aiortc import RTCPeerConnection, RTCRtpSender
    from aiortc.mediastreams import VideoStreamTrack

    pc = RTCPeerConnection()
    try:
        video = pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"])
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp.replace("H264/90000", f"{codec}/90000")
    finally:
        await pc.close()


async def _wait(predicate, timeout: float, what: str) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(0.2)


async def _wait_log(server: ServerProcess, text: str, timeout: float) -> None:
    await _wait(lambda: text in server.log.read_text(errors="replace"), timeout, repr(text))

