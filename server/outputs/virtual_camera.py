"""A session's output as a virtual webcam, through pyvirtualcam (an optional extra:
`pip install 'streamgen[virtualcam]'`): v4l2loopback on Linux, OBS Virtual Camera on Windows and
macOS.

`open_camera` is the one place that touches pyvirtualcam, so tests put a fake behind it. A device
is one picture, so one session feeds it at a time; `VirtualCamera` decides which (the newest
session, unless one was chosen through the API) and moves it when that session ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import numpy as np
from av import VideoFrame

from interface.imaging import scale
from server.outputs.sinks import FrameSink

if TYPE_CHECKING:
    from server.media.session import Session

log = logging.getLogger(__name__)

HINTS = {
    "Linux": "load v4l2loopback: sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=streamgen",
    "Windows": "install OBS Studio 26+ (its Virtual Camera), and do not have OBS use it at the same time",
    "Darwin": "install OBS Studio 30+ and start its Virtual Camera once so that the system extension is allowed",
}


class VirtualCameraUnavailable(RuntimeError):
    """pyvirtualcam is missing or found no virtual camera device."""


class CameraLike(Protocol):
    def send(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


CameraOpener = Callable[[int, int, int, Optional[str]], CameraLike]


def _hint() -> str:
    import platform

    return HINTS.get(platform.system(), "install a virtual camera that pyvirtualcam supports")


def open_camera(width: int, height: int, fps: int, device: Optional[str]) -> CameraLike:
    """A pyvirtualcam camera taking RGB frames of this size, or VirtualCameraUnavailable saying why."""
    try:
        import pyvirtualcam
    except ImportError as exc:
        raise VirtualCameraUnavailable(
            f"pyvirtualcam is not installed ({exc}); pip install 'streamgen[virtualcam]'"
        ) from None
    try:
        camera: Any = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device)
    except Exception as exc:  # pyvirtualcam raises RuntimeError/ValueError listing what each backend said
        where = f"device {device}" if device else "a virtual camera device"
        raise VirtualCameraUnavailable(f"cannot open {where}: {exc}. To fix: {_hint()}") from None
    log.info("virtual camera %s open at %dx%d, %d fps", getattr(camera, "device", device or "?"), width, height, fps)
    return camera


def check_available(device: Optional[str], fps: int, opener: CameraOpener = open_camera) -> None:
    """At startup: open and close the device once, so `--virtual-camera` fails before the model
    loads, with the reason, instead of at the first session."""
    camera = opener(640, 480, fps, device)
    camera.close()


class VirtualCameraSink(FrameSink):
    kind = "virtual_camera"

    def __init__(self, output_id: str, device: Optional[str], fps: int, opener: CameraOpener = open_camera) -> None:
        super().__init__(output_id, device or "virtual camera", queue_frames=4)  # a camera shows now, not a queue
        self._device = device
        self._fps = fps
        self._opener = opener
        self._camera: Optional[CameraLike] = None

    def _open(self, width: int, height: int) -> None:
        self._camera = self._opener(width, height, self._fps, self._device)

    def _write(self, frame: VideoFrame) -> None:
        assert self._camera is not None and self.size is not None
        width, height = self.size  # a device keeps its size: later frames are scaled to it
        rgb = scale(frame, width, height, "rgb24").to_ndarray()  # a new frame
        self._camera.send(rgb)

    def _close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.close()


class VirtualCamera:
    """The server's one virtual camera and the session feeding it."""

    def __init__(self, device: Optional[str], fps: int, opener: CameraOpener = open_camera) -> None:
        self.device = device
        self.fps = fps
        self._opener = opener
        self._owner: Optional["Session"] = None
        self._sink: Optional[VirtualCameraSink] = None
        self._pinned = False  # chosen through the API: newer sessions do not take it over
        self._lock = asyncio.Lock()

    @property
    def owner(self) -> Optional["Session"]:
        return self._owner

    async def attach(self, session: "Session", pinned: bool = False) -> VirtualCameraSink:
        """Move the camera to `session` (stopping it on its previous one)."""
        async with self._lock:
            if self._owner is session and self._sink is not None and not self._sink.done:
                self._pinned = self._pinned or pinned
                return self._sink
            await self._detach_locked()
            if session.closed:  # it ended while the camera was being moved
                raise VirtualCameraUnavailable(f"session {session.id} has ended")
            sink = VirtualCameraSink(session.egress.new_output_id(), self.device, self.fps, self._opener)
            session.egress.add_output(sink)
            self._owner, self._sink, self._pinned = session, sink, pinned
            log.info("virtual camera now shows session %s", session.id)
            return sink

    async def session_started(self, session: "Session") -> None:
        """Follow the newest session, unless the camera was pinned to one that is still live."""
        if session.closed or (self._pinned and self._owner is not None and not self._owner.closed):
            return
        await self.attach(session)

    async def session_closed(self, session: "Session", remaining: list["Session"]) -> None:
        """When the camera's session ends, hand it to the newest live one."""
        if self._owner is not session:
            return
        async with self._lock:
            self._owner = self._sink = None
            self._pinned = False
        live = [s for s in remaining if not s.closed and s is not session]
        if live:
            try:
                await self.attach(max(live, key=lambda s: s.created_at))
            except VirtualCameraUnavailable:  # that one ended meanwhile; the next start takes it
                pass

    def output_removed(self, sink: FrameSink) -> None:
        """The API deleted the camera output: the camera stays off until the next session."""
        if sink is self._sink:
            self._owner = self._sink = None
            self._pinned = False

    async def _detach_locked(self) -> None:
        owner, sink = self._owner, self._sink
        self._owner = self._sink = None
        if owner is not None and sink is not None:
            await owner.egress.remove_output(sink.id)
