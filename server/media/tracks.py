"""Media tracks: draining the camera, and the generated output paced by pts."""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import time
from typing import Awaitable, Callable

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame

from server.media.pacing import CLOCK_RATE, PtsPacer

log = logging.getLogger(__name__)

TIME_BASE = fractions.Fraction(1, CLOCK_RATE)


async def drain(track: MediaStreamTrack, on_frame: Callable[[object], None]) -> None:
    """Receive every frame of a track as it comes (aiortc's receive queue is unbounded, so a
    track nobody reads grows without limit), handing each to `on_frame`."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        on_frame(frame)


class GeneratedVideoTrack(MediaStreamTrack):
    """The session's output: generated frames released at their input pts spacing.

    `deliver` queues a burst from the engine; `recv` (called by the RTP sender whenever it is
    ready for the next frame) returns the frame that is due now, dropping stale ones.
    """

    kind = "video"

    def __init__(
        self,
        pacer: PtsPacer[VideoFrame],
        on_sent: Callable[[int, float], None],
        on_dropped: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._pacer = pacer
        self._on_sent = on_sent
        self._on_dropped = on_dropped
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._dropped_seen = 0

    def deliver(self, frames: list[tuple[int, VideoFrame]]) -> None:
        self._pacer.push(frames, self._clock())
        self._report_drops()
        self._wakeup.set()

    async def recv(self) -> VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            ready, wait = self._pacer.poll(self._clock())
            self._report_drops()
            if ready is not None:
                pts, frame = ready
                frame.pts, frame.time_base = pts, TIME_BASE
                self._on_sent(pts, self._clock())
                return frame
            self._wakeup.clear()
            await _wait(self._wakeup.wait(), None if math.isinf(wait) else wait)

    def stop(self) -> None:
        super().stop()
        self._wakeup.set()

    def _report_drops(self) -> None:
        total = self._pacer.dropped_late + self._pacer.dropped_out_of_order
        if total > self._dropped_seen:
            self._on_dropped(total - self._dropped_seen)
            self._dropped_seen = total


async def _wait(awaitable: Awaitable[object], timeout: float | None) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        pass
