"""3-axis rotary position embedding (time, height, width) in real arithmetic.

The head dim d holds d/2 rotation pairs split between the axes as (d/2 - 2*(d/2//3), d/2//3, d/2//3),
i.e. 22/21/21 pairs at d=128. Tables are float32 cos/sin; no complex or float64 at run time.
"""

from __future__ import annotations

import torch

MAX_POSITIONS = 1024


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(positions: int, pairs: int) -> torch.Tensor:
    # theta = 10000 over the axis' own width (2*pairs), as in Wan's rope_params.
    inv = 1.0 / torch.pow(10000.0, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv)


class Rope:
    """Angle tables for one head_dim; builds per-chunk cos/sin for a (frames, h, w) grid."""

    def __init__(self, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.pairs = axis_pairs(head_dim)
        self.device = torch.device(device)
        # float64 only while building the tables once; they are stored as float32.
        self.time, self.height, self.width = (
            _axis_angles(MAX_POSITIONS, p).float().to(self.device) for p in self.pairs
        )

    def angles(self, start: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
        """Angles [rows, frames*h*w, head_dim/2] for rows whose first frame sits at `start` [rows]."""
        t_idx = start.to(self.device).long()[:, None] + torch.arange(frames, device=self.device)  # [R, F]
        t = self.time[t_idx]  # [R, F, pt]
        rows = t.shape[0]
        t = t[:, :, None, None, :].expand(rows, frames, h, w, -1)
        hh = self.height[:h][None, None, :, None, :].expand(rows, frames, h, w, -1)
        ww = self.width[:w][None, None, None, :, :].expand(rows, frames, h, w, -1)
        return torch.cat([t, hh, ww], dim=-1).reshape(rows, frames * h * w, -1)

    def time_angles(self, delta: torch.Tensor) -> torch.Tensor:
        """Angles [..., head_dim/2] that move a key by `delta` frames in time and nowhere in space."""
        inv = self.time[1]  # angle per unit position of each temporal pair
        t = delta.to(self.device).float()[..., None] * inv
        zeros = torch.zeros(*delta.shape, self.pairs[1] + self.pairs[2], device=self.device)
        return torch.cat([t, zeros], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2j], x[2j+1]) of x [R, L, heads, d] by angles given as cos/sin [R, L, d/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)
