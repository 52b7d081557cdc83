"""A synthetic camera whose frames can be recognised on their way back (pts codes)."""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Any, Optional

import numpy as np

CLOCK_RATE = 90_000


class CameraTrack:
    """Factory for an aiortc video track: moving stripes + a frame counter (16 bits as 16x16 blocks
    in the top-left corner) at a fixed rate. Frame n has pts n*step + code[n] (90 kHz), code[n] a
    seeded multiple of 10 ticks below 100 (< 1.2 ms), so received pts can be matched to sent ones."""

    def __init__(self, width: int, height: int, fps: int, seed: int = 1234) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.step = CLOCK_RATE // fps
        self._rng = np.random.default_rng(seed)
        self.codes: list[int] = []
        self.pts: list[int] = []
        self.sent_at: list[float] = []  # when frame n was handed to the encoder (time.monotonic)
        self.started_at: Optional[float] = None
        self.stopped = False
        x = np.arange(width, dtype=np.int32)[None, :]
        y = np.arange(height, dtype=np.int32)[:, None]
        self._x, self._y = np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width))

    def code(self, n: int) -> int:
        while len(self.codes) <= n:
            self.codes.extend((self._rng.integers(0, 10, 1024) * 10).tolist())
        return self.codes[n]

    def image(self, n: int) -> np.ndarray:
        x = self._x + 6 * n
        y = self._y + 3 * n
        img = np.empty((self.height, self.width, 3), dtype=np.uint8)
        img[..., 0] = (x * 2) % 256
        img[..., 1] = (y * 3) % 256
        img[..., 2] = ((x // 32 + y // 32) % 2) * 180 + 40
        block = 16
        for bit in range(16):
            x0 = bit * block
            if x0 + block <= self.width and block <= self.height:
                img[:block, x0 : x0 + block] = 255 if (n >> bit) & 1 else 0
        return img

    def make(self) -> Any:
        from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
        from av import VideoFrame

        from interface.imaging import scale

        camera = self

        class _Track(MediaStreamTrack):
            kind = "video"

            async def recv(self) -> VideoFrame:
                if self.readyState != "live" or camera.stopped:
                    raise MediaStreamError
                n = len(camera.sent_at)
                if camera.started_at is None:
                    camera.started_at = time.monotonic()
                await asyncio.sleep(max(0.0, camera.started_at + n / camera.fps - time.monotonic()))
                # A camera hands over YUV 4:2:0; an RGB frame would be converted inside the encoder, on
                # the timed path, by a scaler with a thread per CPU (server/media/imaging.py).
                rgb = VideoFrame.from_ndarray(camera.image(n), format="rgb24")
                frame = scale(rgb, camera.width, camera.height, "yuv420p")
                pts = n * camera.step + camera.code(n)
                frame.pts, frame.time_base = pts, fractions.Fraction(1, CLOCK_RATE)
                camera.pts.append(pts)
                camera.sent_at.append(time.monotonic())
                return frame

        return _Track()
