"""The virtual camera, tested at the pyvirtualcam boundary: a fake `pyvirtualcam` module stands in
for the real one (which needs v4l2loopback or OBS), in process and in a `python -m server
--virtual-camera` process. Without a device the server refuses to start, saying why."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from av import VideoFrame

from server.outputs.virtual_camera import VirtualCameraSink, VirtualCameraUnavailable, check_available, open_camera
from tests.conftest import REPO, RtcClient, ServerProcess, WhipClient, run_server

FAKE_PYVIRTUALCAM = '''
"""A stand-in for pyvirtualcam: logs what the server does with the camera to $FAKE_VCAM_LOG."""
import json, os
import numpy as np

class PixelFormat:
    RGB = "RGB"

class Camera:
    def __init__(self, width, height, fps, *, fmt=PixelFormat.RGB, device=None, **kw):
        if os.environ.get("FAKE_VCAM_MISSING"):
            raise RuntimeError("'v4l2loopback' backend: no v4l2 loopback device found at /dev/video[0-99]")
        self.width, self.height, self.fps, self.device = width, height, fps, device or "/dev/video9"
        self._log = open(os.environ["FAKE_VCAM_LOG"], "a", buffering=1)
        self._write(event="open", width=width, height=height, fps=fps, fmt=fmt)

    def _write(self, **record):
        self._log.write(json.dumps(record) + "\\n")

    def send(self, frame):
        assert frame.dtype == np.uint8 and frame.shape == (self.height, self.width, 3), frame.shape
        self._write(event="frame", mean=float(frame.mean()))

    def close(self):
        self._write(event="close")
        self._log.close()
'''


def _fake_module_dir(root: Path) -> Path:
    package = root / "fake_pyvirtualcam" / "pyvirtualcam"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_PYVIRTUALCAM))
    return package.parent


class FakeCamera:
    def __init__(self, width: int, height: int, fps: int, device: Optional[str]) -> None:
        self.width, self.height, self.fps, self.device = width, height, fps, device
        self.frames: list[np.ndarray] = []
        self.closed = False

    def send(self, frame: np.ndarray) -> None:
        assert frame.shape == (self.height, self.width, 3) and frame.dtype == np.uint8
        self.frames.append(frame)

    def close(self) -> None:
        self.closed = True


def _frame(width: int, height: int, value: int, pts: int) -> VideoFrame:
    frame = VideoFrame.from_ndarray(np.full((height, width, 3), value, np.uint8), format="rgb24").reformat(format="yuv420p")
    frame.pts = pts
    return frame


# -- in process ------------------------------------------------------------------------------------------


async def test_sink_sends_rgb_frames_at_the_first_frames_size() -> None:
    cameras: list[FakeCamera] = []

    def opener(width: int, height: int, fps: int, device: Optional[str]) -> FakeCamera:
        cameras.append(FakeCamera(width, height, fps, device))
        return cameras[-1]

    sink = VirtualCameraSink("cam", "/dev/video7", 25, opener)
    sink.start()
    sink.offer(_frame(96, 64, 200, 0))
    await _wait(lambda: sink.frames_written == 1, 5, "the first frame")
    sink.offer(_frame(160, 120, 100, 3000))  # another size: scaled to the device's
    await _wait(lambda: sink.frames_written == 2, 5, "the second frame")
    assert sink.state == "running"
    await sink.stop()
    (camera,) = cameras
    assert (camera.width, camera.height, camera.fps, camera.device) == (96, 64, 25, "/dev/video7")
    assert [f.shape for f in camera.frames] == [(64, 96, 3), (64, 96, 3)]
    assert abs(camera.frames[0].mean() - 200) < 3 and abs(camera.frames[1].mean() - 100) < 3
    assert camera.closed and sink.state == "stopped" and sink.info().frames_written == 2


async def test_sink_without_a_device_fails_with_the_reason() -> None:
    def opener(width: int, height: int, fps: int, device: Optional[str]) -> FakeCamera:
        raise VirtualCameraUnavailable("cannot open a virtual camera device: none found")

    sink = VirtualCameraSink("cam", None, 30, opener)
    sink.start()
    sink.offer(_frame(64, 64, 0, 0))
    await _wait(lambda: sink.state == "failed", 5, "the sink to fail")
    assert "none found" in (sink.error or "")
    sink.offer(_frame(64, 64, 0, 1))  # ignored, no error
    await sink.stop()
    assert sink.state == "failed"


async def test_a_slow_camera_drops_old_frames_instead_of_queuing() -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    class SlowCamera(FakeCamera):
        def send(self, frame: np.ndarray) -> None:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
            super().send(frame)

    cameras: list[FakeCamera] = []
    sink = VirtualCameraSink("cam", None, 30, lambda w, h, f, d: cameras.append(SlowCamera(w, h, f, d)) or cameras[-1])
    sink.start()
    for i in range(20):
        sink.offer(_frame(32, 32, i * 10, i))
        await asyncio.sleep(0.01)
    release.set()
    await sink.stop()
    assert sink.dropped > 0 and sink.frames_written + sink.dropped == 20
    assert len(cameras[0].frames) == sink.frames_written <= 6  # one in flight + its queue of 4, + the newest


def test_open_camera_explains_a_missing_package_and_a_missing_device(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # import fails, as when the extra is not installed
    with pytest.raises(VirtualCameraUnavailable, match=r"pip install 'streamgen\[virtualcam\]'"):
        open_camera(64, 64, 30, None)
    monkeypatch.delitem(sys.modules, "pyvirtualcam")
    monkeypatch.syspath_prepend(str(_fake_module_dir(tmp_path)))
    monkeypatch.setenv("FAKE_VCAM_MISSING", "1")
    with pytest.raises(VirtualCameraUnavailable, match="no v4l2 loopback device") as err:
        check_available("/dev/video3", 30)
    assert "/dev/video3" in str(err.value) and "modprobe v4l2loopback" in str(err.value)
    monkeypatch.delenv("FAKE_VCAM_MISSING")
    monkeypatch.setenv("FAKE_VCAM_LOG", str(tmp_path / "cam.log"))
    camera = open_camera(64, 48, 30, None)
    camera.send(np.zeros((48, 64, 3), np.uint8))
    camera.close()
    events = [json.loads(line)["event"] for line in (tmp_path / "cam.log").read_text().splitlines()]
    assert events == ["open", "frame", "close"]
    sys.modules.pop("pyvirtualcam", None)


@pytest.mark.parametrize("missing", ["package", "device"])
def test_server_refuses_to_start_without_a_virtual_camera(tmp_path: Path, missing: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if missing == "device":
        env["PYTHONPATH"] = f"{_fake_module_dir(tmp_path)}{os.pathsep}{REPO}"
        env["FAKE_VCAM_MISSING"] = "1"
    else:  # a module that fails to import, whatever the machine has installed
        blocker = tmp_path / "blocker" / "pyvirtualcam"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('No module named pyvirtualcam')\n")
        env["PYTHONPATH"] = f"{blocker.parent}{os.pathsep}{REPO}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "server", "--virtual-camera", "--model", "tiny", "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30  # before any model is loaded
    expected = "pip install 'streamgen[virtualcam]'" if missing == "package" else "modprobe v4l2loopback"
    assert expected in done.stderr and "--virtual-camera" in done.stderr
    assert "Traceback" not in done.stderr


# -- a server with --virtual-camera --------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("vcam")
    log = tmp / "camera.log"
    env = {"PYTHONPATH": f"{_fake_module_dir(tmp)}{os.pathsep}{REPO}", "FAKE_VCAM_LOG": str(log)}
    with run_server(tmp, "--virtual-camera", "--virtual-camera-device", "/dev/video9", env=env) as server:
        yield server, log


def _camera_events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def test_the_camera_follows_the_newest_session(camera_server, peers) -> None:
    server, log = camera_server
    assert [e["event"] for e in _camera_events(log)] == ["open", "close"]  # the startup check
    assert server.get("/api/info")["virtual_camera"] is True

    whip: WhipClient = peers(WhipClient(server.url, token=None))  # no token set: loopback may publish
    await whip.publish(width=320, height=240, fps=12)

    def opened() -> list[dict]:
        return [e for e in _camera_events(log) if e["event"] == "open"][1:]

    def frames_since(n_open: int) -> int:
        events = _camera_events(log)
        opens = [i for i, e in enumerate(events) if e["event"] == "open"]
        return sum(1 for e in events[opens[n_open]:] if e["event"] == "frame") if len(opens) > n_open else 0

    await _wait(lambda: frames_since(1) >= 8, 90, "frames of the WHIP session on the camera")
    assert opened()[0]["width"] == 320 and opened()[0]["height"] == 240 and opened()[0]["fps"] == 30
    (output,) = server.get(f"/api/sessions/{whip.session_id}")["outputs"]
    assert output["kind"] == "virtual_camera" and output["target"] == "/dev/video9" and output["state"] == "running"

    # A newer session takes the camera over (at its own size)...
    browser: RtcClient = peers(RtcClient(server.url))
    await browser.connect(width=192, height=144, fps=10)
    await _wait(lambda: frames_since(2) >= 4, 90, "frames of the newer session on the camera")
    assert (opened()[1]["width"], opened()[1]["height"]) == (192, 144)
    assert server.get(f"/api/sessions/{whip.session_id}")["outputs"] == []
    # ...and when it ends, the camera goes back to the one still live.
    await browser.close()
    async with __import__("aiohttp").ClientSession() as http:
        async with http.delete(f"{server.url}/api/sessions/{browser.session_id}") as r:
            assert r.status in (204, 404)
    await _wait(lambda: frames_since(3) >= 4, 90, "the camera back on the WHIP session")
    assert (opened()[2]["width"], opened()[2]["height"]) == (320, 240)
    assert await whip.delete() == 200
    await _wait(lambda: _camera_events(log)[-1]["event"] == "close", 10, "the camera to close")


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(0.05)
