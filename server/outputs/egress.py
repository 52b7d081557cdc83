"""Everything a session's output goes to, fed from its one paced track (docs/ARCHITECTURE.md §8: pacing is
decided once, in the output track).

aiortc's MediaRelay reads the track once and hands each frame to any number of subscribers: the
session's own peer connection (the page), WHEP viewers, recordings, restreams, the virtual camera.
A viewer costs one encoder, not one engine stream. Subscriptions are unbuffered (a slow consumer
skips to the newest frame instead of queuing), and a subscriber of our own keeps the track drained
while nobody watches, so pacing, latency and TTFF are measured the same with or without viewers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from aiortc import RTCPeerConnection
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame

from server.outputs.sinks import FrameSink
from server.media.tasks import BackgroundTasks
from server.media.tracks import drain

log = logging.getLogger(__name__)

KEEP_FINISHED = 8  # stopped or failed outputs kept listed (with their error) until deleted


class PrivateFrameTrack(MediaStreamTrack):
    """A relay subscription that returns its own copy of each frame.

    aiortc's encoders run in executor threads and the H.264 one writes `pict_type` on the frame it
    is given (keyframe requests), so encoders of several viewers must not share one frame object:
    a keyframe one viewer asked for could be reset by another's thread and never be sent.
    """

    kind = "video"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self._source = source

    async def recv(self) -> VideoFrame:
        frame = await self._source.recv()
        assert isinstance(frame, VideoFrame)
        copy = VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)  # to_ndarray copies once
        copy.pts, copy.time_base = frame.pts, frame.time_base
        return copy

    def stop(self) -> None:
        super().stop()
        self._source.stop()


@dataclass
class Viewer:
    id: str
    pc: RTCPeerConnection
    track: MediaStreamTrack
    etag: str
    created_at: float = field(default_factory=time.time)
    connected: bool = False  # ICE and DTLS done; until then the viewer is pending (docs/RELIABILITY.md)


class SessionEgress:
    def __init__(self, session_id: str, source: MediaStreamTrack) -> None:
        self.session_id = session_id
        self._source = source
        self._relay = MediaRelay()
        self.viewers: dict[str, Viewer] = {}  # pending and connected, oldest first
        self.joining = 0  # viewers being answered: they count as pending too
        self._expiry: dict[str, asyncio.Task] = {}  # pending viewer -> its connect timeout
        self._tasks = BackgroundTasks(lambda exc: log.error("session %s: viewer timeout failed", session_id, exc_info=exc))
        self.outputs: dict[str, FrameSink] = {}
        self._feeders: dict[str, asyncio.Task] = {}
        self._keepalive: Optional[asyncio.Task] = None
        self._closed = False

    def start(self) -> None:
        """Start reading the source now (see the module doc), whoever subscribes later."""
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(drain(self._subscribe(), lambda frame: None))

    def _subscribe(self) -> MediaStreamTrack:
        return self._relay.subscribe(self._source, buffered=False)

    def sender_track(self) -> MediaStreamTrack:
        """A track for an RTCPeerConnection to send (the page's own, or a WHEP viewer's)."""
        return PrivateFrameTrack(self._subscribe())

    # -- WHEP viewers -----------------------------------------------------------------------------------
    def add_viewer(self, viewer: Viewer, connect_timeout_s: float) -> None:
        """Register an answered viewer; unless it connects within `connect_timeout_s` it is
        dropped, so an offer whose ICE never completes cannot hold a slot."""
        self.viewers[viewer.id] = viewer
        if not viewer.connected:
            self._expiry[viewer.id] = self._tasks.spawn(self._expire(viewer.id, connect_timeout_s))

    def viewer_connected(self, viewer: Viewer) -> None:
        viewer.connected = True
        task = self._expiry.pop(viewer.id, None)
        if task is not None:
            task.cancel()

    def pending_viewers(self) -> list[Viewer]:
        """Viewers answered but not connected yet, oldest first."""
        return [v for v in self.viewers.values() if not v.connected]

    def connected_viewers(self) -> int:
        return sum(1 for v in self.viewers.values() if v.connected)

    async def _expire(self, viewer_id: str, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)
        viewer = self.viewers.get(viewer_id)
        if viewer is not None and not viewer.connected:
            self._expiry.pop(viewer_id, None)  # this task is ending: remove_viewer must not cancel it
            await self.remove_viewer(viewer_id, f"not connected within {timeout_s:g} s")

    async def remove_viewer(self, viewer_id: str, reason: str = "left") -> bool:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        task = self._expiry.pop(viewer_id, None)
        if task is not None:
            task.cancel()
        viewer.track.stop()
        await viewer.pc.close()
        log.info("session %s: viewer %s %s (%d watching, %d connecting)", self.session_id, viewer_id, reason,
                 self.connected_viewers(), len(self.viewers) - self.connected_viewers())
        return True

    # -- recordings, restreams, virtual camera --------------------------------------------------------
    @staticmethod
    def new_output_id() -> str:
        return uuid.uuid4().hex[:12]

    def add_output(self, sink: FrameSink) -> None:
        """Start a sink and feed it every frame the session sends from now on."""
        if self._closed:
            raise RuntimeError("the session is closed")
        finished = [k for k, s in self.outputs.items() if s.done]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:  # keep the latest few to read back
            self.outputs.pop(key, None)
            self._feeders.pop(key, None)
        self.outputs[sink.id] = sink
        sink.start()
        self._feeders[sink.id] = asyncio.ensure_future(self._feed(sink, self._subscribe()))

    async def _feed(self, sink: FrameSink, track: MediaStreamTrack) -> None:
        try:
            while not sink.done:
                frame = await track.recv()
                assert isinstance(frame, VideoFrame)
                sink.offer(frame)
        except MediaStreamError:  # the session's output ended
            pass
        finally:
            track.stop()

    async def remove_output(self, output_id: str) -> Optional[FrameSink]:
        """Stop an output; returns it once it has finished (file complete, stream closed)."""
        sink = self.outputs.pop(output_id, None)
        if sink is None:
            return None
        feeder = self._feeders.pop(output_id, None)
        if feeder is not None:
            feeder.cancel()
        await sink.stop()
        return sink

    def live_outputs(self) -> int:
        return sum(1 for s in self.outputs.values() if not s.done)

    # -- the end ----------------------------------------------------------------------------------------
    async def close(self) -> None:
        """Disconnect every viewer and finish every output. Call once the source has stopped."""
        self._closed = True
        self._tasks.cancel_all()
        if self._keepalive is not None:
            self._keepalive.cancel()
        results = await asyncio.gather(
            *(self.remove_viewer(v) for v in list(self.viewers)),
            *(self.remove_output(o) for o in list(self.outputs)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("session %s: closing an output failed", self.session_id, exc_info=result)
