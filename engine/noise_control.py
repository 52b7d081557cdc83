"""Motion-aware noise controller (docs/ARCHITECTURE.md §3): more motion -> less noise.

d = max over the chunk's frames of RMS(x_f - x_{f-1}) on pixels in [-1, 1];  m = clip(d / sigma, 0, 1);
s = lam * (s_max - (s_max - s_min) * m) + (1 - lam) * s_prev;  first timestep = int(1000 * s) - 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.transfer import host_scalar_later


@dataclass
class NoiseController:
    s_max: float = 0.8
    s_min: float = 0.7
    sigma: float = 0.2
    smoothing: float = 0.9
    enabled: bool = True
    strength: Optional[float] = None  # current s; starts at s_max
    last_frame: Optional[torch.Tensor] = None  # [C, H, W], the previous chunk's last frame

    def __post_init__(self) -> None:
        if self.strength is None:
            self.strength = self.s_max

    def step(self, frames: torch.Tensor) -> float:
        """frames [C, T, H, W] in [-1, 1]; returns the noise strength s for this chunk."""
        return self.queue_step(frames)()

    def queue_step(self, frames: torch.Tensor) -> Callable[[], float]:
        """step() in two halves: the motion measure is queued on the device now, and the returned call
        waits for that measure alone and gives s. Queue the VAE encode in between, and the host reads
        the measure while the GPU encodes (a plain float() here waited for the whole GPU queue)."""
        last, self.last_frame = self.last_frame, frames[:, -1]
        if last is None:  # first chunk: nothing to compare with yet, the stream starts at s_max
            return lambda: float(self.strength)
        if not self.enabled:
            return self._apply_motion  # s = s_max
        seq = torch.cat([last[:, None], frames], dim=1).float()
        rms = (seq[:, 1:] - seq[:, :-1]).pow(2).mean(dim=(0, 2, 3)).sqrt()
        read = host_scalar_later((rms.max() / self.sigma).clamp(0, 1))
        return lambda: self._apply_motion(read())

    def _apply_motion(self, m: Optional[float] = None) -> float:
        """s from the motion m in [0, 1]; None: motion control is off, s = s_max."""
        if m is None:
            self.strength = self.s_max
            return float(self.strength)
        target = self.s_max - (self.s_max - self.s_min) * m
        self.strength = self.smoothing * target + (1 - self.smoothing) * float(self.strength)
        return float(self.strength)

    @staticmethod
    def timestep(strength: float) -> int:
        return int(1000 * strength) - 100
