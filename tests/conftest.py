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
def run_server(tmp: Path, *args: str, env: Optional[dict[str, str]] = None) -> Iterator[ServerProcess]:
    """Start `python -m server` and wait until /healthz says the engine is ready."""
    port = _free_port()
    log = tmp / f"server-{port}.log"
    config = tmp / f"server-{port}.yaml"
    config.write_text(f"height: {MODEL_SIZE}\nwidth: {MODEL_SIZE}\n")
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--devices", "cpu", "--model", "tiny",
           "--config", str(config), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
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
    with run_server(tmp_path_factory.mktemp("server")) as s:
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
        from aiortc.mediastreams import MediaStreamError

        self.pc = pc = RTCPeerConnection()
        self.channel = pc.createDataChannel("control")
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        pc.addTrack(_make_pattern_track(width, height, fps, color))

        @pc.on("track")
        def on_track(track: Any) -> None:
            async def receive() -> None:
                while True:
                    try:
                        f = await track.recv()
                    except MediaStreamError:
                        return
                    rgb = f.to_ndarray(format="rgb24")
                    self.frames.append(Received(time.monotonic(), f.pts, f.width, f.height, rgb.mean((0, 1))))

            asyncio.ensure_future(receive())

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
