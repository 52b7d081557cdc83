"""The output side's geometry: the size a session's output is sent at, and a generated frame as the
encoder's input. The conversions themselves, shared with the offline renderer: interface/imaging.py.
"""

from __future__ import annotations

from typing import Literal

import av
import numpy as np

from interface.imaging import crop_box, scale

OutputMode = Literal["camera", "crop", "model"]


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
