"""Host<->device copies that never stall the host.

A plain torch.tensor(..., device="cuda") copies from pageable memory, which waits for the GPU queue to
drain: one such copy per DiT forward removes all CPU/GPU overlap. Pinned memory from torch's caching
host allocator plus non_blocking keeps the copy in stream order without a wait; the allocator does not
reuse the pinned block before the copy has run.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch


def h2d(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def h2d_into(dst: torch.Tensor, values) -> None:
    """Copy host values into a persistent device tensor (stream-ordered, no host wait)."""
    src = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dst.dtype)
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


def d2h_later(value: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """Queue a copy of a device tensor into a fresh pinned host block: (the host tensor, an event that
    marks the copy done; None off CUDA, where the copy is done already)."""
    if not value.is_cuda:
        return value.contiguous(), None
    buf = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    buf.copy_(value, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return buf, done


def host_scalar_later(value: torch.Tensor) -> Callable[[], float]:
    """Queue a device scalar's copy to the host; the returned call waits for that copy alone (not for
    work queued after it) and gives the float."""
    buf, done = d2h_later(value)

    def result() -> float:
        if done is not None:
            done.synchronize()
        return float(buf)

    return result


class PendingFrames:
    """uint8 frames on their way to the host: ready() polls, result() waits for this copy alone."""

    def __init__(self, frames: torch.Tensor, done: Optional[torch.cuda.Event] = None) -> None:
        self._frames, self._done = frames, done

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def result(self) -> np.ndarray:
        if self._done is None:
            return self._frames.numpy()
        self._done.synchronize()
        # a copy: the pinned block goes back to torch's cache (a renderer may keep every frame it gets)
        return self._frames.numpy().copy()


class FrameIO:
    """uint8 frames on the host <-> video tensors on the device.

    Host buffers are pinned blocks from torch's caching host allocator, a fresh one per copy: the
    allocator hands a block out again only once the copy that used it has run, so the host may queue
    the next chunk while the GPU still works on this one (several sessions too), which one reused
    buffer would not allow."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # A chunk's upload and its motion measure on a stream of their own (docs/ARCHITECTURE.md §8): in
        # the compute stream's order they ran only after every forward queued before them, and the host's
        # read of the measure waited for those too, so a second session's chunk was taken in only once
        # the first session's work was done (no chunk ever met another's in a forward).
        self._uploads = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def upload_stream(self) -> Iterator[None]:
        """Work queued inside runs on the upload stream (on CUDA; elsewhere where it would anyway)."""
        if self._uploads is None:
            yield
            return
        with torch.cuda.stream(self._uploads):
            yield

    def hand_over(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor made on the upload stream, for the current stream: that stream waits for the uploads
        queued so far, and the allocator keeps the memory until its work on it is done."""
        if self._uploads is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._uploads)
            t.record_stream(current)
        return t

    def to_video_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1] on the device (pinned, async copy on CUDA)."""
        if self.device.type == "cuda":
            pinned = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            # numpy's copy, on this thread: torch's copy_ hands a chunk's megabytes to its CPU thread pool,
            # and waking that pool now and then held the chunk's upload up by several ms
            # (docs/BENCHMARKS.md, twelfth round)
            np.copyto(pinned.numpy(), frames)
            src = pinned.to(self.device, non_blocking=True)
        else:
            src = torch.from_numpy(np.ascontiguousarray(frames))
        video = src.permute(3, 0, 1, 2)[None].float().div_(127.5).sub_(1.0)
        return video

    def to_uint8(self, video: torch.Tensor) -> np.ndarray:
        """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the host (a new array)."""
        return self.to_uint8_later(video).result()

    def to_uint8_later(self, video: torch.Tensor) -> PendingFrames:
        """Queue the conversion and the device-to-host copy without waiting for them."""
        v = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
        # into pinned memory: a pageable .cpu() of a 480p chunk took several ms more (a staging copy on
        # the host after the device copy)
        return PendingFrames(*d2h_later(v.contiguous()))
