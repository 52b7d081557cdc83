"""Shared fixtures for the server tests: a real `python -m server` (tiny model, CPU) and an aiortc
client that streams a synthetic camera and records what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_SIZE = 64  # tiny at 64x64: the server tests exercise the server, and two cores are few
TEST_TOKEN = "test-token-0123456789"  # the shared server's WHIP/outputs Bearer token


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(tmp: Path, *args: str, env: Optional[dict[str, str]] = None,
               new_group: bool = False) -> Iterator[ServerProcess]:
    """Start `python -m server` and wait until /healthz says the engine is ready. `new_group`: in a
    process group of its own (with its engine), which a test may kill as a whole."""
    port = _free_port()
    log = tmp / f"server-{port}.log"
    config = tmp / f"server-{port}.yaml"
    # Two cores run tiny far below 12 fps, and its engine time per chunk swings with whatever else
    # runs (seconds under a full test run): admission control judges against 0.1 fps here, so
    # tests that run several sessions are not refused (a --target-fps flag overrides it;
    # tests/test_reliability.py tests the refusal).
    config.write_text(f"height: {MODEL_SIZE}\nwidth: {MODEL_SIZE}\nrecordings_dir: {tmp / 'recordings'}\n"
                      "target_fps: 0.1\n")
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--devices", "cpu", "--model", "tiny",
           "--config", str(config), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=new_group)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if server.get("/healthz")["status"] == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # The token guards WHIP and outputs only (token_scope publish) and any origin may call: these
    # tests exercise streaming; tests/test_security.py runs servers with the default scope (all).
    with run_server(tmp_path_factory.mktemp("server"), "--token-scope", "publish", "--cors-origin", "*",
                    env={"STREAM_TOKEN": TEST_TOKEN}) as s:
        yield s


# -- an aiortc client with a synthetic camera -------------------------------------------------------


def _make_pattern_track(width: int, height: int, fps: int, color: Optional[tuple[int, int, int]]) -> Any:
    from aiortc.mediastreams import VideoStreamTrack
    from av import VideoFrame

    class PatternTrack(VideoStreamTrack):
        """Moving stripes (or one solid colour) at a fixed rate, pts in the 90 kHz clock."""

        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.start: Optional[float] = None

        async def recv(self) -> VideoFrame:
            self.start = self.start or time.monotonic()
            await asyncio.sleep(max(0.0, self.start + self.n / fps - time.monotonic()))
            if color is None:
                x = np.arange(width)[None, :] + 9 * self.n
                y = np.arange(height)[:, None] + 5 * self.n
                img = np.stack([(x * 3) % 256 + 0 * y, (y * 3) % 256 + 0 * x, ((x ^ y) * 2) % 256], -1)
            else:
                img = np.broadcast_to(np.array(color), (height, width, 3))
            frame = VideoFrame.from_ndarray(np.ascontiguousarray(img, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = self.n * (90_000 // fps), fractions.Fraction(1, 90_000)
            self.n += 1
            return frame

    return PatternTrack()


@dataclass
class Received:
    at: float
    pts: int
    width: int
    height: int
    mean_rgb: np.ndarray


@dataclass
class RtcClient:
    url: str
    frames: list[Received] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    session_id: str = ""
    pc: Any = None
    channel: Any = None

    async def connect(
        self, width: int = 320, height: int = 240, fps: int = 12, color: Optional[tuple[int, int, int]] = None,
        prompt: Optional[str] = None, params: Optional[dict] = None,
    ) -> str:
        import aiohttp
        from aiortc import RTCPeerConnection, RTCSessionDescription

        self.pc = pc = RTCPeerConnection()
        self.channel = pc.createDataChannel("control")
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        pc.addTrack(_make_pattern_track(width, height, fps, color))

        pc.on("track", _receive_into(self.frames))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "prompt": prompt, "params": params}
        async with aiohttp.ClientSession() as http:
            async with http.post(self.url + "/api/offer", json=body) as r:
                answer = await r.json()
                assert r.status == 200, answer
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        self.session_id = answer["session_id"]
        return self.session_id

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
            await asyncio.sleep(0.2)

    def stats(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "stats"]

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()


@pytest.fixture
async def rtc_clients(server: ServerProcess) -> Any:
    """A factory of connected-on-demand clients; closes them all at the end."""
    made: list[RtcClient] = []

    def make(url: Optional[str] = None) -> RtcClient:
        made.append(RtcClient(url or server.url))
        return made[-1]

    yield make
    await asyncio.gather(*(c.close() for c in made))


# -- WHIP publisher (the way OBS publishes) and WHEP viewer, both aiortc --------------------------------


def _receive_into(frames: list[Received]) -> Callable[[Any], None]:
    from aiortc.mediastreams import MediaStreamError

    def on_track(track: Any) -> None:
        if track.kind != "video":
            return

        async def receive() -> None:
            while True:
                try:
                    f = await track.recv()
                except MediaStreamError:
                    return
                rgb = f.to_ndarray(format="rgb24")
                frames.append(Received(time.monotonic(), f.pts, f.width, f.height, rgb.mean((0, 1))))

        asyncio.ensure_future(receive())

    return on_track


@dataclass
class WhipClient:
    """Publishes like OBS 30+: sendonly H.264 video (forced by codec preferences) and Opus audio,
    every ICE candidate in the offer, Bearer token."""

    url: str
    token: Optional[str] = TEST_TOKEN
    pc: Any = None
    location: str = ""
    etag: str = ""
    answer: str = ""

    @property
    def session_id(self) -> str:
        return self.location.rsplit("/", 1)[-1]

    async def publish(self, width: int = 320, height: int = 240, fps: int = 12, codec: str = "H264",
                      audio: bool = True, query: str = "") -> None:
        import aiohttp
        from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
        from aiortc.mediastreams import AudioStreamTrack

        self.pc = pc = RTCPeerConnection()
        video = pc.addTransceiver(_make_pattern_track(width, height, fps, None), direction="sendonly")
        video.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == f"video/{codec}"]
        )
        if audio:
            pc.addTransceiver(AudioStreamTrack(), direction="sendonly")  # silence, encoded as Opus
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Content-Type": "application/sdp"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/whip{query}", data=pc.localDescription.sdp, headers=headers) as r:
                body = await r.text()
                assert r.status == 201, (r.status, body)
                assert r.headers["Content-Type"].startswith("application/sdp")
                self.location, self.etag, self.answer = r.headers["Location"], r.headers["ETag"], body
        await pc.setRemoteDescription(RTCSessionDescription(self.answer, "answer"))

    async def delete(self) -> int:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession() as http:
            async with http.delete(self.url + self.location, headers=headers) as r:
                return r.status

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()


@dataclass
class WhepClient:
    """A recvonly viewer of a session's output."""

    url: str
    frames: list[Received] = field(default_factory=list)
    pc: Any = None
    location: str = ""

    async def watch(self, session_id: str) -> None:
        import aiohttp
        from aiortc import RTCPeerConnection, RTCSessionDescription

        self.pc = pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.on("track", _receive_into(self.frames))
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/whep/{session_id}", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                body = await r.text()
                assert r.status == 201, (r.status, body)
                self.location = r.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))

    async def wait_frames(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < n:
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {n} frames"
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()


@pytest.fixture
async def peers() -> Any:
    """Closes every WHIP/WHEP client a test registers with `peers(client)`."""
    made: list[Any] = []

    def keep(client: Any) -> Any:
        made.append(client)
        return client

    yield keep
    await asyncio.gather(*(c.close() for c in made), return_exceptions=True)
