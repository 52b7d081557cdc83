"""Host<->device copies that never stall the host.

A plain torch.tensor(..., device="cuda") copies from pageable memory, which waits for the GPU queue to
drain: one such copy per DiT forward removes all CPU/GPU overlap. Pinned memory from torch's caching
host allocator plus non_blocking keeps the copy in stream order without a wait; the allocator does not
reuse the pinned block before the copy has run.
"""

from __future__ import annotations

from typing import Callable, Optional

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
