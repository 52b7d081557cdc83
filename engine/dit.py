"""Causal Wan2.1 DiT. Module paths equal the checkpoint's state-dict keys (`blocks.3.self_attn.q`), so a
checkpoint loads with load_state_dict(strict=True).

The forward is split in three (embed -> blocks -> head) so that a pipeline stage can run any
contiguous range of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from engine import kernels
from engine.attention import attention
from engine.config import DiTConfig


class RMSNorm(nn.Module):
    """RMS norm over the full width (qk-norm is over all heads at once, not per head)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float, affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=affine)


@dataclass
class AttnInputs:
    """What self-attention needs besides the tokens, prepared once per forward for all blocks."""

    cos: torch.Tensor  # [R, L, head_dim/2]
    sin: torch.Tensor
    cache: Optional["object"] = None  # engine.kv_cache.StreamKVCache, or None for the offline path
    mask: Optional[torch.Tensor] = None  # offline block-causal mask [Lq, Lk] (True = may attend)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, a: AttnInputs, layer: int) -> torch.Tensor:
        r, n = x.shape[:2]
        q = kernels.qk_norm_rope(self.q(x), self.norm_q.weight, a.cos, a.sin, self.num_heads, self.norm_q.eps)
        k = kernels.qk_norm_rope(self.k(x), self.norm_k.weight, a.cos, a.sin, self.num_heads, self.norm_k.eps)
        v = self.v(x).view(r, n, self.num_heads, -1)
        if a.cache is not None:
            out = a.cache.attend(layer, q, k, v)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=a.mask
            ).transpose(1, 2)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the 512 text tokens; K/V come precomputed per prompt."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = context.shape[0]
        k = self.norm_k(self.k(context)).view(b, -1, self.num_heads, context.shape[-1] // self.num_heads)
        v = self.v(context).view(b, -1, self.num_heads, context.shape[-1] // self.num_heads)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        r, n = x.shape[:2]
        q = self.norm_q(self.q(x)).view(r, n, self.num_heads, -1)
        k, v = kv
        if k.shape[0] != r:  # one prompt shared by every row of the stream batch
            k, v = k.expand(r, -1, -1, -1), v.expand(r, -1, -1, -1)
        return self.o(attention(q, k, v).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps  # norm1/norm2 (LayerNorm without parameters) run inside kernels.modulate
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, a: AttnInputs, cross_kv: tuple[torch.Tensor, torch.Tensor], layer: int
    ) -> torch.Tensor:
        """x [R, F*T, dim]; e [R, F, 6, dim] per-frame modulation from the timestep."""
        # [6, R, F, dim]: each of shift/scale/gate contiguous, as the fused kernels want
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[:, None] + e).permute(2, 0, 1, 3).contiguous()
        eps = self.eps
        x = kernels.gated_add(x, self.self_attn(kernels.modulate(x, shift1, scale1, eps), a, layer), gate1)
        x = x + self.cross_attn(self.norm3(x), cross_kv)
        return kernels.gated_add(x, self._ffn(kernels.modulate(x, shift2, scale2, eps)), gate2)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        fc1, _, fc2 = self.ffn
        if not x.is_cuda or not isinstance(fc1, nn.Linear):  # CPU, or FP8 linears (engine.fp8)
            return self.ffn(x)
        # cuBLASLt applies the bias and the tanh-approximated GELU in the GEMM's epilogue: one pass over
        # the [tokens, ffn_dim] activations fewer
        h = torch._addmm_activation(fc1.bias, x.flatten(0, 1), fc1.weight.t(), use_gelu=True)
        return fc2(h.unflatten(0, x.shape[:2]))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [R, F*T, dim]; e [R, F, dim] (the time embedding before the 6-way projection)."""
        shift, scale = (self.modulation[:, None] + e[:, :, None]).unbind(2)
        h = self.norm(x).unflatten(1, (e.shape[1], -1)) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(h.flatten(1, 2))


def timestep_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of timesteps t [N] (cos half first, as Wan)."""
    half = dim // 2
    # float64 on a handful of scalars keeps large timesteps exact; negligible cost.
    pos = t.double()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


@dataclass
class Embedded:
    tokens: torch.Tensor  # [R, F*h*w, dim]
    e: torch.Tensor  # [R, F, dim] time embedding
    e6: torch.Tensor  # [R, F, 6, dim] block modulation
    grid: tuple[int, int, int]  # (F, h, w) in patches


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    # -- text ---------------------------------------------------------------------------------
    def cross_kv(self, context: torch.Tensor, layers: Optional[Sequence[int]] = None) -> list:
        """Per-block cross-attention K/V for text embeddings [B, text_len, text_dim]; once per prompt."""
        ctx = self.text_embedding(context)
        layers = range(len(self.blocks)) if layers is None else layers
        return [self.blocks[i].cross_attn.project_context(ctx) for i in layers]

    # -- the three stages ---------------------------------------------------------------------
    def embed(self, x: torch.Tensor, t: torch.Tensor) -> Embedded:
        """x [R, 16, F, H, W] latents, t [R, F] timesteps."""
        p = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(p.shape[2:])
        # contiguous: every fused kernel of the blocks wants [R, L, dim] rows, and a transposed view here
        # would send all of them to their torch fallbacks (and each block's outputs stay strided)
        tokens = p.flatten(2).transpose(1, 2).contiguous()
        dtype = tokens.dtype
        e = self.time_embedding(timestep_embedding(self.cfg.freq_dim, t.flatten()).to(dtype))
        e6 = self.time_projection(e).unflatten(1, (6, self.cfg.dim)).unflatten(0, t.shape)
        return Embedded(tokens, e.unflatten(0, t.shape), e6, grid)  # type: ignore[arg-type]

    def run_blocks(
        self, tokens: torch.Tensor, emb: Embedded, a: AttnInputs, cross_kv: list, layers: Sequence[int]
    ) -> torch.Tensor:
        for j, i in enumerate(layers):
            tokens = self.blocks[i](tokens, emb.e6, a, cross_kv[j], i)
        return tokens

    def finish(self, tokens: torch.Tensor, emb: Embedded) -> torch.Tensor:
        """Head + unpatchify -> velocity [R, 16, F, H, W]."""
        out = self.head(tokens, emb.e)
        f, h, w = emb.grid
        pt, ph, pw = self.cfg.patch_size
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

    # -- the offline reference path -----------------------------------------------------------
    def forward_block_causal(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, chunk_frames: Sequence[int], rope
    ) -> torch.Tensor:
        """One forward over a whole clip where each chunk sees itself and earlier chunks only.

        This is the slow path the KV-cached stream must equal (before any eviction).
        """
        emb = self.embed(x, t)
        f, h, w = emb.grid
        ang = rope.angles(torch.zeros(x.shape[0], dtype=torch.long), f, h, w)
        chunk_of_frame = torch.repeat_interleave(
            torch.arange(len(chunk_frames)), torch.tensor(list(chunk_frames))
        ).repeat_interleave(h * w).to(x.device)
        mask = chunk_of_frame[:, None] >= chunk_of_frame[None, :]
        a = AttnInputs(cos=ang.cos(), sin=ang.sin(), mask=mask)
        kv = self.cross_kv(context)
        tokens = self.run_blocks(emb.tokens, emb, a, kv, range(len(self.blocks)))
        return self.finish(tokens, emb)
