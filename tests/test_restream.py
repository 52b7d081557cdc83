"""Recording and restreaming a session's output (H.264 through PyAV, off the event loop), against
`python -m server` (tiny model, CPU) and sinks the test runs itself: an MP4 file, an MPEG-TS
listener over TCP and an RTMP listener, both PyAV on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import aiohttp
import av
import pytest

from tests.conftest import TEST_TOKEN, ServerProcess, WhipClient

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
FRAMES = 12  # generated frames each output should get before it is stopped


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode(source: str, **kw: Any) -> list[av.VideoFrame]:
    with av.open(source, **kw) as container:
        return list(container.decode(video=0))


class Listener(threading.Thread):
    """A live ingest on loopback (what an RTMP server or a relay would be): decodes what arrives."""

    def __init__(self, url: str, fmt: str, options: Optional[dict[str, str]] = None) -> None:
        super().__init__(daemon=True)
        self.url, self.fmt, self.options = url, fmt, options or {}
        self.frames: list[tuple[int, int, int]] = []  # (pts, width, height)
        self.error: Optional[str] = None

    def run(self) -> None:
        try:
            with av.open(self.url, format=self.fmt, options=self.options, timeout=60) as container:
                for frame in container.decode(video=0):
                    self.frames.append((frame.pts, frame.width, frame.height))
        except Exception as exc:  # RTMP ends with an I/O error when the publisher hangs up
            self.error = f"{type(exc).__name__}: {exc}"


async def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(0.2)


async def _start(http: aiohttp.ClientSession, url: str, sid: str, body: dict, status: int = 201) -> dict:
    async with http.post(f"{url}/api/sessions/{sid}/outputs", json=body, headers=AUTH) as r:
        info = await r.json()
        assert r.status == status, (r.status, info)
        if status == 201:
            assert r.headers["Location"] == f"/api/sessions/{sid}/outputs/{info['output_id']}"
        return info


def _output(server: ServerProcess, sid: str, oid: str) -> dict:
    return server.get(f"/api/sessions/{sid}/outputs/{oid}")


@pytest.fixture
async def publisher(server: ServerProcess) -> Any:
    client = WhipClient(server.url)
    await client.publish(width=320, height=240, fps=12)
    yield client
    await client.delete()
    await client.close()


async def test_recordings_are_complete_mp4s(server: ServerProcess, publisher: WhipClient) -> None:
    sid = publisher.session_id
    async with aiohttp.ClientSession() as http:
        stopped = await _start(http, server.url, sid, {"kind": "record", "path": "rec/stopped.mp4"})
        ended = await _start(http, server.url, sid, {"kind": "record", "path": "rec/session-end.mp4"})
        assert stopped["kind"] == "record" and stopped["state"] == "starting"
        await _wait(lambda: _output(server, sid, stopped["output_id"])["frames_written"] >= FRAMES, 90, "frames recorded")
        assert {o["output_id"] for o in server.get(f"/api/sessions/{sid}")["outputs"]} == {
            stopped["output_id"], ended["output_id"]
        }
        # DELETE answers once the file is finished.
        async with http.delete(f"{server.url}/api/sessions/{sid}/outputs/{stopped['output_id']}", headers=AUTH) as r:
            final = await r.json()
            assert r.status == 200, final
    assert final["state"] == "stopped" and final["error"] is None and final["size"] == {"width": 320, "height": 240}
    frames = _decode(final["target"])
    assert len(frames) == final["frames_written"] >= FRAMES
    assert {(f.width, f.height) for f in frames} == {(320, 240)}
    span = float((frames[-1].pts - frames[0].pts) * frames[0].time_base)
    assert abs(span - final["duration_s"]) < 0.01, (span, final["duration_s"])
    assert 0.5 < span < 60

    # The other one is finished by the end of its session.
    assert await publisher.delete() == 200
    path = Path(stopped["target"]).with_name("session-end.mp4")
    frames = _decode(str(path))
    assert len(frames) >= FRAMES


async def test_restream_to_tcp_and_rtmp_listeners(server: ServerProcess, publisher: WhipClient) -> None:
    sid = publisher.session_id
    tcp_port, rtmp_port = _port(), _port()
    ts = Listener(f"tcp://127.0.0.1:{tcp_port}?listen=1", "mpegts")
    rtmp = Listener(f"rtmp://127.0.0.1:{rtmp_port}/live/secret-key", "flv", {"listen": "1"})
    ts.start()
    rtmp.start()
    await asyncio.sleep(0.5)  # both listening
    async with aiohttp.ClientSession() as http:
        to_ts = await _start(http, server.url, sid, {"kind": "restream", "url": f"tcp://127.0.0.1:{tcp_port}"})
        to_rtmp = await _start(
            http, server.url, sid,
            {"kind": "restream", "url": f"rtmp://127.0.0.1:{rtmp_port}/live/secret-key", "bitrate_kbps": 800},
        )
        assert to_rtmp["target"] == f"rtmp://127.0.0.1:{rtmp_port}/live/***"  # the stream key stays secret
        for out in (to_ts, to_rtmp):
            await _wait(lambda: _output(server, sid, out["output_id"])["frames_written"] >= FRAMES, 90, "frames sent")
        finals = []
        for out in (to_ts, to_rtmp):
            async with http.delete(f"{server.url}/api/sessions/{sid}/outputs/{out['output_id']}", headers=AUTH) as r:
                finals.append(await r.json())
                assert r.status == 200 and finals[-1]["state"] == "stopped", finals[-1]
    ts.join(20)
    rtmp.join(20)
    assert not ts.is_alive() and not rtmp.is_alive()
    ts_final, rtmp_final = finals
    # MPEG-TS over TCP: every frame sent arrives, in order, at the session's size.
    assert len(ts.frames) == ts_final["frames_written"] >= FRAMES, (len(ts.frames), ts_final, ts.error)
    assert {(w, h) for _, w, h in ts.frames} == {(320, 240)}
    assert all(b[0] > a[0] for a, b in zip(ts.frames, ts.frames[1:]))
    # RTMP: FFmpeg's listener may lose the last frames when the publisher hangs up.
    assert rtmp_final["frames_written"] - 3 <= len(rtmp.frames) <= rtmp_final["frames_written"], (
        len(rtmp.frames), rtmp_final, rtmp.error
    )
    assert "secret-key" not in server.log.read_text()


async def test_outputs_reject_bad_requests_and_failures_stay_contained(
    server: ServerProcess, publisher: WhipClient
) -> None:
    sid = publisher.session_id
    url = server.url
    async with aiohttp.ClientSession() as http:

        async def expect(status: int, body: Any, headers: Optional[dict] = AUTH, method: str = "POST",
                         path: str = "") -> dict:
            async with http.request(method, f"{url}/api/sessions/{sid}/outputs{path}", json=body, headers=headers) as r:
                data = await r.json()
                assert r.status == status, (body, r.status, data)
                return data

        await expect(401, {"kind": "record"}, headers={})
        await expect(401, {"kind": "record"}, headers={"Authorization": "Bearer wrong"})
        await expect(422, {"kind": "stream"})
        await expect(422, {"kind": "record", "url": "rtmp://x/y"})
        for bad in ("../escape.mp4", "/tmp/abs.mp4", ".hidden.mp4", "a/../../b.mp4", "x.txt", "a\x00.mp4", ""):
            await expect(422, {"kind": "record", "path": bad})
        for bad in ("http://example.org/live", "file:///etc/passwd", "rtmp:///nohost", "rtmp://h:99999/x", "nonsense"):
            await expect(422, {"kind": "restream", "url": bad})
        await expect(409, {"kind": "virtual_camera"})  # this server runs without --virtual-camera
        if not av_has_srt():
            error = await expect(422, {"kind": "restream", "url": "srt://127.0.0.1:9000?mode=caller"})
            assert "SRT" in error["error"]
        await expect(404, None, method="DELETE", path="/nope")
        await expect(404, None, method="GET", path="/nope")
        first = await expect(201, {"kind": "record", "path": "dup.mp4"})
        await expect(409, {"kind": "record", "path": "dup.mp4"})
        await expect(200, None, method="DELETE", path=f"/{first['output_id']}")

        # Nothing listens on this port: the output fails with a reason, the session goes on.
        dead = await expect(201, {"kind": "restream", "url": f"tcp://127.0.0.1:{_port()}/live/k?x=1"})
        await _wait(lambda: _output(server, sid, dead["output_id"])["state"] == "failed", 60, "the restream to fail")
        failed = _output(server, sid, dead["output_id"])
        assert "refused" in failed["error"].lower() and "/live/k" not in failed["error"], failed
        frames_out = server.get(f"/api/sessions/{sid}")["stats"]["frames_out"]
        await _wait(lambda: server.get(f"/api/sessions/{sid}")["stats"]["frames_out"] > frames_out + 4, 30, "more output")
        assert server.get(f"/api/sessions/{sid}")["state"] == "streaming"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/sessions/not-a-session/outputs", json={"kind": "record"}, headers=AUTH) as r:
            assert r.status == 404


def av_has_srt() -> bool:
    from server.outputs.restream import has_protocol

    return has_protocol("srt")
