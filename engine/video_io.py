"""Reading and writing videos for the offline renderer (PyAV), resized to the model's size."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import av
import numpy as np


def fit(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """Center-crop to the target aspect, then scale: uint8 [height, width, 3]."""
    src_w, src_h = frame.width, frame.height
    target = width / height
    if src_w / src_h > target:  # too wide: crop the sides
        crop_w, crop_h = round(src_h * target), src_h
    else:
        crop_w, crop_h = src_w, round(src_w / target)
    rgb = frame.to_ndarray(format="rgb24")
    x0, y0 = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    cropped = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[y0 : y0 + crop_h, x0 : x0 + crop_w]), format="rgb24")
    return cropped.reformat(width=width, height=height, format="rgb24").to_ndarray()


def read_frames(path: Path, width: int, height: int) -> tuple[Iterator[np.ndarray], int, float]:
    """(frames iterator, frame count or 0 if unknown, frame rate)."""
    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or 30)

    def gen() -> Iterator[np.ndarray]:
        with container:
            for frame in container.decode(stream):
                yield fit(frame, width, height)

    return gen(), int(stream.frames or 0), rate


class VideoWriter:
    """`.mp4` (H.264) or `.npz` (lossless uint8 frames under key `frames`, [T, H, W, 3])."""

    def __init__(self, path: Path, width: int, height: int, fps: float) -> None:
        self.path, self.frames = path, []  # type: ignore[var-annotated]
        self.container = None
        if path.suffix == ".mp4":
            self.container = av.open(str(path), mode="w")
            self.stream = self.container.add_stream("libx264", rate=max(1, round(fps)))
            self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
            self.stream.options = {"crf": "18", "preset": "veryfast"}

    def write(self, frame: np.ndarray) -> None:
        if self.container is None:
            self.frames.append(frame)
            return
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is None:
            np.savez(self.path, frames=np.stack(self.frames) if self.frames else np.zeros((0, 0, 0, 3), np.uint8))
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
