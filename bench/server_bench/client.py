"""One aiortc client: offers the camera with a `control` data channel, records what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench.server_bench import BenchError
from bench.server_bench.camera import CameraTrack


@dataclass
class Client:
    url: str
    camera: CameraTrack
    # aiortc's own receive buffer holds each frame until the next one's first packet; by default the
    # client gets the server's (server/media/jitter_buffer.py), which completes a frame on its marker
    # bit as a browser's receiver does.
    stock_receiver: bool = False
    jitter_buffer: Any = None
    received_at: list[float] = field(default_factory=list)
    received_pts: list[int] = field(default_factory=list)
    sizes: set = field(default_factory=set)
    messages: list[dict] = field(default_factory=list)
    session_id: str = ""
    pc: Any = None
    channel: Any = None
    _tasks: list = field(default_factory=list)

    async def connect(self, http: Any, prompt: str, params: dict, timeout: float) -> dict:
        from aiortc import RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError

        self.pc = pc = RTCPeerConnection()  # no ICE servers: host candidates only
        self.channel = pc.createDataChannel("control")

        @self.channel.on("message")
        def on_message(m: Any) -> None:
            with contextlib.suppress(ValueError, TypeError):
                self.messages.append(json.loads(m))

        pc.addTrack(self.camera.make())

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind != "video":
                return
            if not self.stock_receiver:
                from server.media.jitter_buffer import install_for_track

                self.jitter_buffer = install_for_track(pc, track)

            async def receive() -> None:
                while True:
                    try:
                        f = await track.recv()
                    except MediaStreamError:
                        return
                    self.received_at.append(time.monotonic())
                    self.received_pts.append(int(f.pts) if f.pts is not None else -1)
                    if len(self.sizes) < 8:
                        self.sizes.add((f.width, f.height))

            self._tasks.append(asyncio.ensure_future(receive()))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "prompt": prompt, "params": params}
        async with http.post(self.url + "/api/offer", json=body, timeout=http_timeout(timeout)) as r:
            answer = await r.json()
            if r.status != 200:
                raise BenchError(f"offer refused: HTTP {r.status}: {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))  # fires "track"
        self.session_id = answer["session_id"]
        if not self.stock_receiver and self.jitter_buffer is None:
            raise BenchError("could not give the receiver the marker-bit jitter buffer (see the log); try --stock-receiver")
        return answer

    async def close(self) -> None:
        self.camera.stopped = True
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 10)
        for t in self._tasks:
            t.cancel()

def http_timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)
