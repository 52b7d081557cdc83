"""Reading and writing videos for the offline renderer (PyAV): frames in at the model's size (prepared as
the server prepares a camera's: interface/imaging.py), out at the input's size (as the server answers at
the camera's) or the model's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import av
import numpy as np

from interface.imaging import scale, to_model_rgb

OutputSize = Literal["input", "model"]
OUTPUT_SIZES: tuple[OutputSize, ...] = ("input", "model")


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int  # 0: unknown
    fps: float


def _unreadable(path: Path, exc: Exception) -> ValueError:
    reason = getattr(exc, "strerror", None) or str(exc)
    return ValueError(f"{path}: not a video file FFmpeg can read ({reason})")


def probe(path: Path) -> VideoInfo:
    """The first video stream's size, frame count and rate; ValueError (one line) for a file that is
    not a video or has no video stream."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if not stream.codec_context.width or not stream.codec_context.height:
                raise ValueError(f"{path}: its video stream has no frame size")
            return VideoInfo(stream.codec_context.width, stream.codec_context.height, int(stream.frames or 0),
                             float(stream.average_rate or 30))
    except av.FFmpegError as exc:
        raise _unreadable(path, exc) from None


def read_frames(path: Path, width: int, height: int) -> tuple[Iterator[np.ndarray], int, float]:
    """(frames iterator, frame count or 0 if unknown, frame rate)."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise _unreadable(path, exc) from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or 30)

    def gen() -> Iterator[np.ndarray]:
        with container:
            try:
                for frame in container.decode(stream):
                    yield to_model_rgb(frame, width, height)
            except av.FFmpegError as exc:
                raise _unreadable(path, exc) from None

    return gen(), int(stream.frames or 0), rate


def output_dims(path: Path, width: int, height: int) -> tuple[int, int]:
    """The written size: H.264 in yuv420p needs even sides (as the server's encoder does)."""
    if path.suffix == ".mp4":
        return max(2, width - width % 2), max(2, height - height % 2)
    return width, height


class VideoWriter:
    """`.mp4` (H.264) or `.npz` (lossless uint8 frames under key `frames`, [T, H, W, 3]), at
    width x height (see output_dims); frames of another size are scaled to it (libswscale, as the server
    scales its output to the camera's size)."""

    def __init__(self, path: Path, width: int, height: int, fps: float) -> None:
        width, height = output_dims(path, width, height)
        self.path, self.frames = path, []  # type: ignore[var-annotated]
        self.width, self.height = width, height
        self.container = None
        if path.suffix == ".mp4":
            self.container = av.open(str(path), mode="w")
            self.stream = self.container.add_stream("libx264", rate=max(1, round(fps)))
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            self.stream.options = {"crf": "18", "preset": "veryfast"}

    def write(self, frame: np.ndarray) -> None:
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if self.container is None:
            if frame.shape[:2] != (self.height, self.width):
                frame = scale(picture, self.width, self.height, "rgb24").to_ndarray()
            self.frames.append(frame)
            return
        picture = scale(picture, self.width, self.height, "yuv420p")
        for packet in self.stream.encode(picture):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is None:
            np.savez(self.path, frames=np.stack(self.frames) if self.frames else np.zeros((0, 0, 0, 3), np.uint8))
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
