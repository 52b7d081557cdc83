"""Flow-matching schedule (docs/ARCHITECTURE.md §3): 1000 training steps, shift 8; sigma(t) is read off the shifted
grid at the nearest grid timestep, as the checkpoints were distilled with.

The model predicts velocity v; x0 = x_t - sigma*v; re-noising to t' is (1 - sigma')*x0 + sigma'*eps.
"""

from __future__ import annotations

import torch

TRAIN_STEPS = 1000
SHIFT = 8.0
STEP_LIST = (700, 500, 400, 200)  # denoising timesteps; n steps use the first n


def step_list(steps: int) -> list[int]:
    if not 1 <= steps <= len(STEP_LIST):
        raise ValueError(f"steps must be 1..{len(STEP_LIST)}, got {steps}")
    return list(STEP_LIST[:steps])


def _sigma_table() -> torch.Tensor:
    """sigma for every integer timestep 0..1000 (nearest point of the shifted 1000-point grid)."""
    raw = torch.linspace(1.0, 0.0, TRAIN_STEPS + 1)[:-1]
    sig = SHIFT * raw / (1 + (SHIFT - 1) * raw)
    grid = sig * TRAIN_STEPS
    t = torch.arange(TRAIN_STEPS + 1, dtype=torch.float32)
    return sig[(grid[None, :] - t[:, None]).abs().argmin(dim=1)]


SIGMAS = _sigma_table()


def sigma_of(t: int) -> float:
    """sigma of one integer timestep, on the host (no device work)."""
    return float(SIGMAS[min(max(int(t), 0), TRAIN_STEPS)])


def sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma for integer timesteps t (any shape), on t's device."""
    return SIGMAS.to(t.device)[t.long().clamp(0, TRAIN_STEPS)]


def x0_from_velocity(velocity: torch.Tensor, x_t: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma*v in float32; sig broadcasts against [R, C, F, H, W] (e.g. [R, 1, F, 1, 1])."""
    return (x_t.float() - sig * velocity.float()).to(x_t.dtype)


def to_x0(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """velocity, x_t [R, C, F, H, W]; t [R, F] integer timesteps."""
    return x0_from_velocity(velocity, x_t, sigma(t)[:, None, :, None, None])


def renoise(x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """Re-noise x0 to timestep t: (1 - sigma)*x0 + sigma*noise, sigma looked up on the host."""
    s = sigma_of(t)
    return ((1 - s) * x0.float() + s * noise.float()).to(noise.dtype)
