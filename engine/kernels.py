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


if _HAVE_TRITON:

    @triton.jit
    def _rms_norm_weight_rows(X, W, Out, D, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        h = (x * inv).to(Out.dtype.element_ty).to(tl.float32)  # rounded before the weight, as the module
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Out + row * D + cols, (h * w).to(Out.dtype.element_ty), mask=m)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The DiT's RMSNorm over the last dim of x, times weight (engine.dit.RMSNorm's expression)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_torch in one pass (the cross-attention query's norm: six kernels per block in torch)."""
    if not (_dit_usable(x) and weight.is_contiguous() and x.dtype == weight.dtype):
        return rms_norm_torch(x, weight, eps)
    d = x.shape[-1]
    out = torch.empty_like(x)
    _rms_norm_weight_rows[(x.numel() // d,)](x, weight, out, d, float(eps), BLOCK_D=triton.next_power_of_2(d))
    return out


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


# -- KV cache: where a full row's new frame goes (FIFO or a sink refresh), decided on the device ----------


if _HAVE_TRITON:

    @triton.jit
    def _token_sums_kv(K, V, PK, PV, T, D, NP, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # partial sums over one block of a row's T tokens of k and v [rows, T, D] -> PK, PV [rows, NP, D]
        r = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        toks = p * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (toks[:, None] < T) & (cols[None, :] < D)
        off = (r * T + toks[:, None]) * D + cols[None, :]
        dst = (r * NP + p) * D + cols
        tl.store(PK + dst, tl.sum(tl.load(K + off, mask=m, other=0.0).to(tl.float32), axis=0), mask=cols < D)
        tl.store(PV + dst, tl.sum(tl.load(V + off, mask=m, other=0.0).to(tl.float32), axis=0), mask=cols < D)

    @triton.jit
    def _evict_rows(PK, PV, KS, VS, PLAN, RR, SLOT, rows, S, rolling, T, D, NP, threshold,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, REFRESH: tl.constexpr):
        # one program per row: the slot this forward's frame goes to, the round robin, the sink means
        r = tl.program_id(0)
        full = tl.load(PLAN + r) != 0
        host_slot = tl.load(PLAN + rows + r)
        rr = tl.load(RR + r)
        fifo = S + rr % rolling
        slot = fifo
        advance = full
        if REFRESH:
            si = tl.arange(0, BLOCK_S)
            d = tl.arange(0, BLOCK_D)
            sm = si < S
            dm = d < D
            m2 = sm[:, None] & dm[None, :]
            kn = tl.zeros([BLOCK_D], dtype=tl.float32)
            vn = tl.zeros([BLOCK_D], dtype=tl.float32)
            for p in range(0, NP):  # the token blocks' sums, in a fixed order
                kn += tl.load(PK + (r * NP + p) * D + d, mask=dm, other=0.0)
                vn += tl.load(PV + (r * NP + p) * D + d, mask=dm, other=0.0)
            # the mean rounded to the cache's dtype, as torch's mean of the keys returns it
            kn = (kn / T).to(KS.dtype.element_ty).to(tl.float32)
            vn = (vn / T).to(VS.dtype.element_ty).to(tl.float32)
            soff = (r * S + si[:, None]) * D + d[None, :]
            ks = tl.load(KS + soff, mask=m2, other=0.0).to(tl.float32)
            vs = tl.load(VS + soff, mask=m2, other=0.0).to(tl.float32)
            # cosine similarity as torch computes it: each vector over its norm (clamped at 1e-8)
            kn_n = tl.maximum(tl.sqrt(tl.sum(kn * kn, axis=0)), 1e-8)
            vn_n = tl.maximum(tl.sqrt(tl.sum(vn * vn, axis=0)), 1e-8)
            ks_n = tl.maximum(tl.sqrt(tl.sum(ks * ks, axis=1)), 1e-8)
            vs_n = tl.maximum(tl.sqrt(tl.sum(vs * vs, axis=1)), 1e-8)
            sim_k = tl.sum((ks / ks_n[:, None]) * (kn / kn_n)[None, :], axis=1)
            sim_v = tl.sum((vs / vs_n[:, None]) * (vn / vn_n)[None, :], axis=1)
            sim = tl.where(sm, (sim_k + sim_v) / 2, float("inf"))
            low = tl.min(sim, axis=0)
            low_idx = tl.argmin(sim, axis=0)
            refresh = full & (low < threshold)
            slot = tl.where(refresh, low_idx.to(tl.int64), fifo)
            advance = full & (refresh == 0)
            dst = (r * S + low_idx) * D + d
            wm = dm & (tl.zeros([BLOCK_D], dtype=tl.int32) + refresh.to(tl.int32) > 0)
            tl.store(KS + dst, kn.to(KS.dtype.element_ty), mask=wm)
            tl.store(VS + dst, vn.to(VS.dtype.element_ty), mask=wm)
        tl.store(SLOT + r, tl.where(full, slot, host_slot))
        tl.store(RR + r, rr + advance.to(tl.int64))


def evict_usable(k: torch.Tensor) -> bool:
    return _HAVE_TRITON and (k.is_cuda or _INTERPRET) and k.is_contiguous()


def evict_slots(k: torch.Tensor, v: torch.Tensor, plan: torch.Tensor, rr: torch.Tensor,
                sink_mean: Optional[tuple[torch.Tensor, torch.Tensor]], num_sink: int, rolling: int,
                threshold: Optional[float]) -> torch.Tensor:
    """Where each row of a forward writes its frame (k, v [rows, T, heads, hd]): rows that are not full
    go to plan[1]; full rows to the next rolling slot (FIFO), or, with sink refresh, to the sink whose
    kept mean k/v is least like the frame's when that similarity is under `threshold` (the sink's means
    then become the frame's). Updates rr and the sink means in place; returns the slots [rows].
    StreamKVCache._evict_slot is the same rule in torch; this is three kernels instead of about twenty."""
    rows, t = k.shape[0], k.shape[1]
    d = k[0, 0].numel()
    slot = torch.empty(rows, dtype=torch.long, device=k.device)
    refresh = sink_mean is not None
    block_t, block_d = 64, 128
    n_blocks = triton.cdiv(t, block_t)
    if refresh:
        # partial sums over token blocks first: one program per row would leave most of the GPU idle
        pk = torch.empty(rows, n_blocks, d, dtype=torch.float32, device=k.device)
        pv = torch.empty_like(pk)
        _token_sums_kv[(rows, n_blocks, triton.cdiv(d, block_d))](k, v, pk, pv, t, d, n_blocks,
                                                                   BLOCK_T=block_t, BLOCK_D=block_d)
        ks, vs = sink_mean
    else:
        pk = pv = ks = vs = slot  # unused
    _evict_rows[(rows,)](pk, pv, ks, vs, plan, rr, slot, rows, num_sink, rolling, t, d, n_blocks,
                         float(threshold if threshold is not None else 0.0),
                         BLOCK_S=triton.next_power_of_2(max(num_sink, 1)), BLOCK_D=triton.next_power_of_2(d),
                         REFRESH=refresh)
    return slot


if _HAVE_TRITON:

    @triton.jit
    def _write_frames(K, V, KC, VC, SLOT, SLOT_POS, POS, window, E, BLOCK: tl.constexpr):
        # row r's frame (E = tokens * heads * head_dim values of k and of v) into cache slot SLOT[r]
        r = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        slot = tl.load(SLOT + r)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        m = cols < E
        dst = (r * window + slot) * E + cols
        tl.store(KC + dst, tl.load(K + r * E + cols, mask=m), mask=m)
        tl.store(VC + dst, tl.load(V + r * E + cols, mask=m), mask=m)
        if blk == 0:
            tl.store(SLOT_POS + r * window + slot, tl.load(POS + r))


def write_frames(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
                 slot_pos: torch.Tensor, positions: torch.Tensor) -> bool:
    """Write each row's one-frame k, v [rows, T, heads, hd] into its cache kc, vc [rows, window*T, heads, hd]
    at slot[r], and record positions[r] in slot_pos[r, slot[r]]: one kernel for what index_copy_ (twice)
    and an index_put did in three. False (nothing done) where the kernel does not apply."""
    if not (evict_usable(k) and v.is_contiguous() and kc.is_contiguous() and vc.is_contiguous()
            and slot_pos.is_contiguous() and positions.is_contiguous() and k.dtype == kc.dtype and v.dtype == vc.dtype):
        return False
    rows, window = k.shape[0], slot_pos.shape[1]
    e = k[0].numel()
    block = 4096
    _write_frames[(rows, triton.cdiv(e, block))](k, v, kc, vc, slot, slot_pos, positions, window, e, BLOCK=block)
    return True
