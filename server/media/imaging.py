"""Camera frame <-> model frame geometry: center-crop to the model's aspect, then resize.

Both directions go through libswscale (PyAV `reformat`, here always through `scale`); numpy only slices
the crop.
"""

from __future__ import annotations

from typing import Literal

import av
import numpy as np

OutputMode = Literal["camera", "crop", "model"]

# PyAV keeps a scaler per frame object (so each new frame builds one), and libswscale's automatic thread
# count gives it a thread per CPU: on a many-core host each frame paid for starting them all, on the critical
# path of every chunk (docs/BENCHMARKS.md, twelfth round). Frames and sessions are already converted
# side by side on executor threads, so one conversion runs on one thread.
SCALER_THREADS = 1


def scale(frame: av.VideoFrame, width: int, height: int, format: str) -> av.VideoFrame:
    """The frame at width x height in `format` (the frame itself when nothing changes)."""
    return frame.reformat(width=width, height=height, format=format, threads=SCALER_THREADS)


def crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """(x, y, w, h): the largest centered region of the source with the destination's aspect."""
    if src_w * dst_h > src_h * dst_w:  # source is wider: crop the sides
        w, h = max(1, round(src_h * dst_w / dst_h)), src_h
    else:  # source is taller (or equal): crop top and bottom
        w, h = src_w, max(1, round(src_w * dst_h / dst_w))
    return (src_w - w) // 2, (src_h - h) // 2, w, h


def to_model_rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: the frame center-cropped to the model aspect and resized."""
    _, _, crop_w, crop_h = crop_box(frame.width, frame.height, width, height)
    # Scale the whole frame so that the crop region becomes exactly width x height, then slice:
    # one swscale pass, no intermediate full-resolution RGB copy.
    factor = max(width / crop_w, height / crop_h)
    scaled_w = max(width, round(frame.width * factor))
    scaled_h = max(height, round(frame.height * factor))
    rgb = scale(frame, scaled_w, scaled_h, "rgb24").to_ndarray()
    x, y = (scaled_w - width) // 2, (scaled_h - height) // 2
    return np.ascontiguousarray(rgb[y : y + height, x : x + width])


def _even(n: int) -> int:
    return max(2, n - n % 2)  # yuv420p needs even sizes


def output_size(mode: OutputMode, cam_w: int, cam_h: int, model_w: int, model_h: int) -> tuple[int, int]:
    if mode == "camera":
        return _even(cam_w), _even(cam_h)
    if mode == "crop":
        _, _, w, h = crop_box(cam_w, cam_h, model_w, model_h)
        return _even(w), _even(h)
    return _even(model_w), _even(model_h)


def to_output_frame(rgb: np.ndarray, width: int, height: int) -> av.VideoFrame:
    """A generated uint8 [H, W, 3] frame as a yuv420p VideoFrame of the given size (for the encoder)."""
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return scale(frame, width, height, "yuv420p")
