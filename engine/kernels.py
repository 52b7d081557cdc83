"""Fused kernels for the hot spots the profiler shows.

rms_norm_channels: the VAE's channel RMS norm (x / ||x||_C * sqrt(C) * gamma), optionally followed by
SiLU, in one pass over a channels-last tensor. In plain torch this is four passes (norm, divide,
scale, SiLU), two of them broadcasting kernels that do not vectorise; at 480x832 they cost about as
much as the convolutions around them. Triton on CUDA; the torch expression everywhere else.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from engine.rope import rotate

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # not installed, or no usable backend
    _HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernel on the CPU this way


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast over x [B, C, ...]."""
    return v.reshape(-1, *([1] * (x.dim() - 2)))


def rms_norm_channels_torch(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if bias is not None:
        x = x + _per_channel(bias, x).to(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
    g = (_per_channel(gamma, x) * scale).to(x.dtype)
    y = (x / norm).mul_(g)
    return F.silu(y, inplace=True) if silu else y


if _HAVE_TRITON:

    @triton.jit
    def _rms_norm_rows(X, G, B, Y, n_rows, C, scale, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr,
                       BIAS: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        mask = (rows < n_rows) & (cols < C)
        x = tl.load(X + rows * C + cols, mask=mask, other=0.0).to(tl.float32)
        if BIAS:  # the bias of the conv before, added here instead of in a pass of its own
            x += tl.load(B + cols, mask=cols < C, other=0.0).to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        g = tl.load(G + cols, mask=cols < C, other=0.0).to(tl.float32) * scale
        y = x * inv[:, None] * g
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + rows * C + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_residual_rows(H, B, S, n_rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        mask = (rows < n_rows) & (cols < C)
        h = tl.load(H + rows * C + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + rows * C + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < C, other=0.0).to(tl.float32)
        tl.store(H + rows * C + cols, (h + b + s).to(H.dtype.element_ty), mask=mask)


    @triton.jit
    def _upsample2x_rows(X, Y, n_out_rows, H, W, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # one output pixel (n, oh, ow) = one row of C values, copied from input pixel (n, oh//2, ow//2)
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        ow = rows % (2 * W)
        oh = (rows // (2 * W)) % (2 * H)
        n = rows // (4 * H * W)
        src = ((n * H + oh // 2) * W + ow // 2)[:, None]
        cols = tl.arange(0, BLOCK_C)[None, :]
        mask = (rows[:, None] < n_out_rows) & (cols < C)
        tl.store(Y + rows[:, None] * C + cols, tl.load(X + src * C + cols, mask=mask), mask=mask)


def _rows_grid(n_rows: int, c: int) -> tuple[int, int, tuple[int]]:
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 4096 // block_c))
    return block_c, block_r, (triton.cdiv(n_rows, block_r),)


def _usable(x: torch.Tensor) -> bool:
    if not _HAVE_TRITON or not (x.is_cuda or _INTERPRET) or x.dim() != 5 or x.shape[1] > 2048:
        return False
    return x.is_contiguous(memory_format=torch.channels_last_3d)


def rms_norm_channels(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = False,
                      bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Channel RMS norm of (x + bias) for x [B, C, T, H, W] (then SiLU if asked), fused when x is
    channels-last. `bias` [C] is a conv's bias that conv left out; `out` (x's shape) receives the result."""
    if not (_usable(x) and (out is None or _usable(out))):
        y = rms_norm_channels_torch(x, gamma, scale, silu, bias)
        return y if out is None else out.copy_(y)
    c = x.shape[1]
    y = torch.empty_like(x) if out is None else out  # channels_last_3d: rows of C contiguous values
    n_rows = x.numel() // c
    block_c, block_r, grid = _rows_grid(n_rows, c)
    g = gamma.reshape(-1).contiguous()
    _rms_norm_rows[grid](x, g, g if bias is None else bias.contiguous(), y, n_rows, c, float(scale),
                         BLOCK_R=block_r, BLOCK_C=block_c, SILU=silu, BIAS=bias is not None)
    return y


def upsample2x_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x spatial upsample of x [N, C, H, W]; one pass when x is channels-last (torch's NHWC
    nearest kernel took 1.9 ms for a 4x192x240x416 bf16 input on an H200, ten times its memory time)."""
    n, c, h, w = x.shape
    if not (_HAVE_TRITON and (x.is_cuda or _INTERPRET) and c > 1 and c <= 2048
            and x.is_contiguous(memory_format=torch.channels_last)):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    y = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    rows = n * 4 * h * w
    block_c, block_r, grid = _rows_grid(rows, c)
    _upsample2x_rows[grid](x, y, rows, h, w, c, BLOCK_R=block_r, BLOCK_C=block_c)
    return y


def bias_residual_(h: torch.Tensor, bias: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """h += bias (per channel) + s, in place, in one pass when both are channels-last 3D."""
    if not (_usable(h) and _usable(s) and h.shape == s.shape and h.dtype == s.dtype):
        return h.add_(_per_channel(bias, h).to(h.dtype)).add_(s)
    c = h.shape[1]
    n_rows = h.numel() // c
    block_c, block_r, grid = _rows_grid(n_rows, c)
    _bias_residual_rows[grid](h, bias.contiguous(), s, n_rows, c, BLOCK_R=block_r, BLOCK_C=block_c)
    return h


# -- DiT: per-token fusions ----------------------------------------------------------------------------
# Each replaces 3 to 12 small kernels per block over [rows, tokens, dim] tensors; with the DiT step
# replayed from a CUDA graph, those memory passes are what is left beside the GEMMs and attention.


def _dit_usable(x: torch.Tensor) -> bool:
    return _HAVE_TRITON and (x.is_cuda or _INTERPRET) and x.is_contiguous()


def modulate_torch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine) of x [R, F*T, D], then per-frame (1 + scale) and shift ([R, F, D])."""
    frames = shift.shape[1]
    h = F.layer_norm(x, (x.shape[-1],), eps=eps).unflatten(1, (frames, -1))
    return (h * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gated_add_torch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, the gate per frame ([R, F, D]); x [R, F*T, D]."""
    frames = gate.shape[1]
    return x + (y.unflatten(1, (frames, -1)) * gate[:, :, None]).flatten(1, 2)


def qk_norm_rope_torch(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """RMS norm over the full width D of x [R, L, D], times weight, then RoPE per head: -> [R, L, heads, D/heads]."""
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    return rotate(h.view(*x.shape[:2], heads, -1), cos, sin)


if _HAVE_TRITON:

    @triton.jit
    def _modulate_rows(X, SH, SC, Y, tokens_per_frame, frames, D, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # over R * F * T token rows
        r = row // (frames * tokens_per_frame)
        f = (row // tokens_per_frame) % frames
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        h = xc / tl.sqrt(var + eps)
        h = h.to(Y.dtype.element_ty).to(tl.float32)  # LayerNorm returns in x's dtype, as in torch
        e = (r * frames + f) * D + cols
        sh = tl.load(SH + e, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(SC + e, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (h * (1.0 + sc) + sh).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _gated_add_rows(X, Yv, G, Out, tokens_per_frame, frames, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        r = row // (frames * tokens_per_frame)
        f = (row // tokens_per_frame) % frames
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(Yv + row * D + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + (r * frames + f) * D + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Out + row * D + cols, (x + y * g).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def _qk_norm_rope_rows(X, W, COS, SIN, Out, D, P, eps, BLOCK_H: tl.constexpr):
        # One token row of D = heads * 2P values: RMS over all D, weight, then rotate pairs (2j, 2j+1)
        # of every head by the row's angle j (shared by the heads).
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_H)  # pair index over the whole row: D/2 pairs
        m = j < D // 2
        a = tl.load(X + row * D + 2 * j, mask=m, other=0.0).to(tl.float32)
        b = tl.load(X + row * D + 2 * j + 1, mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
        # the norm's output is rounded to x's dtype before the weight, as the module does
        a = (a * inv).to(Out.dtype.element_ty).to(tl.float32) * tl.load(W + 2 * j, mask=m, other=0.0).to(tl.float32)
        b = (b * inv).to(Out.dtype.element_ty).to(tl.float32) * tl.load(W + 2 * j + 1, mask=m, other=0.0).to(tl.float32)
        a = a.to(Out.dtype.element_ty).to(tl.float32)
        b = b.to(Out.dtype.element_ty).to(tl.float32)
        k = j % P
        c = tl.load(COS + row * P + k, mask=m, other=1.0)
        s = tl.load(SIN + row * P + k, mask=m, other=0.0)
        tl.store(Out + row * D + 2 * j, (a * c - b * s).to(Out.dtype.element_ty), mask=m)
        tl.store(Out + row * D + 2 * j + 1, (a * s + b * c).to(Out.dtype.element_ty), mask=m)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    if not (_dit_usable(x) and shift.is_contiguous() and scale.is_contiguous()):
        return modulate_torch(x, shift, scale, eps)
    r, n, d = x.shape
    y = torch.empty_like(x)
    _modulate_rows[(r * n,)](x, shift, scale, y, n // shift.shape[1], shift.shape[1], d, float(eps),
                             BLOCK_D=triton.next_power_of_2(d))
    return y


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if not (_dit_usable(x) and y.is_contiguous() and gate.is_contiguous()):
        return gated_add_torch(x, y, gate)
    r, n, d = x.shape
    out = torch.empty_like(x)
    _gated_add_rows[(r * n,)](x, y, gate, out, n // gate.shape[1], gate.shape[1], d, BLOCK_D=triton.next_power_of_2(d))
    return out


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    if not (_dit_usable(x) and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32):
        return qk_norm_rope_torch(x, weight, cos, sin, heads, eps)
    r, n, d = x.shape
    out = torch.empty(r, n, heads, d // heads, dtype=x.dtype, device=x.device)
    _qk_norm_rope_rows[(r * n,)](x, weight, cos, sin, out, d, cos.shape[-1], float(eps),
                                 BLOCK_H=triton.next_power_of_2(d // 2))
    return out
