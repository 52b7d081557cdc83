"""Frame conversions both sides make (PyAV's libswscale; numpy only slices): a camera or file frame to
the model's size (center crop to the model's aspect, then resize), and any frame to another size or
format. The server uses them for cameras and outputs, the offline renderer for files, so a frame
prepared for the model is the same either way.
"""

from __future__ import annotations

import av
import numpy as np

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
