"""Fused kernels for the hot spots the profiler shows.

rms_norm_channels: the VAE's channel RMS norm (x / ||x||_C * sqrt(C) * gamma), optionally followed by
SiLU, in one pass over a channels-last tensor. In plain torch this is four passes (norm, divide,
scale, SiLU), two of them broadcasting kernels that do not vectorise; at 480x832 they cost about as
much as the convolutions around them. Triton on CUDA; the torch expression everywhere else.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # not installed, or no usable backend
    _HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernel on the CPU this way


def rms_norm_channels_torch(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool) -> torch.Tensor:
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
    g = (gamma.reshape(-1, *([1] * (x.dim() - 2))) * scale).to(x.dtype)
    y = (x / norm).mul_(g)
    return F.silu(y, inplace=True) if silu else y


if _HAVE_TRITON:

    @triton.jit
    def _rms_norm_rows(X, G, Y, n_rows, C, scale, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        mask = (rows < n_rows) & (cols < C)
        x = tl.load(X + rows * C + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        g = tl.load(G + cols, mask=cols < C, other=0.0).to(tl.float32) * scale
        y = x * inv[:, None] * g
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + rows * C + cols, y.to(Y.dtype.element_ty), mask=mask)


def _usable(x: torch.Tensor) -> bool:
    if not _HAVE_TRITON or not (x.is_cuda or _INTERPRET) or x.dim() != 5 or x.shape[1] > 2048:
        return False
    return x.is_contiguous(memory_format=torch.channels_last_3d)


def rms_norm_channels(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = False) -> torch.Tensor:
    """Channel RMS norm of x [B, C, T, H, W] (then SiLU if asked), fused when x is channels-last."""
    if not _usable(x):
        return rms_norm_channels_torch(x, gamma, scale, silu)
    c = x.shape[1]
    y = torch.empty_like(x)  # keeps channels_last_3d: rows of C contiguous values
    n_rows = x.numel() // c
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 4096 // block_c))
    grid = (triton.cdiv(n_rows, block_r),)
    _rms_norm_rows[grid](x, gamma.reshape(-1).contiguous(), y, n_rows, c, float(scale),
                         BLOCK_R=block_r, BLOCK_C=block_c, SILU=silu)
    return y
