"""umT5-XXL text encoder (docs/ARCHITECTURE.md §4), reading `models_t5_umt5-xxl-enc-bf16.pth` as is.

T5 encoder: pre-norm blocks of self-attention and gated-GELU FFN, T5 RMS norm (no mean, no bias, computed
in float32), no 1/sqrt(d) attention scaling, a learned relative-position bias per layer (umT5: not shared)
over bidirectional log buckets (max distance 128), padding keys masked out. State-dict keys:
`token_embedding.weight`, `blocks.N.norm1.weight`, `blocks.N.attn.{q,k,v,o}.weight`, `blocks.N.norm2.weight`,
`blocks.N.ffn.{gate.0,fc1,fc2}.weight`, `blocks.N.pos_embedding.embedding.weight`, `norm.weight`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import TextConfig
from engine.tokenizer import ByteTokenizer, UMT5Tokenizer

CHECKPOINT_NAME = "models_t5_umt5-xxl-enc-bf16.pth"


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """In float16, pull infinities back to the largest finite value (minus a margin), as T5 does."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * weight, statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


def relative_position_buckets(length_q: int, length_k: int, num_buckets: int, max_distance: int = 128,
                              device=None) -> torch.Tensor:
    """Bidirectional T5 buckets of (key position - query position): [Lq, Lk] long.

    Half the buckets for keys after the query, half for at/before; within a half, distances below
    half of it get one bucket each, larger ones share log-spaced buckets up to max_distance."""
    rel = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    far = exact + (
        torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [Lq, Lk] -> bias [1, heads, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C]; bias [B or 1, heads, L, L] additive (position bias + padding mask)."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, -1).transpose(1, 2)
        k = self.k(x).view(b, n, h, -1).transpose(1, 2)
        v = self.v(x).view(b, n, h, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) + bias  # T5: no 1/sqrt(head_dim)
        probs = logits.float().softmax(dim=-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, n, c)
        return self.o(out)


class GatedGELU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        # `gate` is a Sequential so that its weight is named gate.0.weight as in the checkpoint.
        self.gate = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False))
        self.fc1 = nn.Linear(dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * F.gelu(self.gate(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim)
        self.ffn = GatedGELU(cfg.dim, cfg.ffn_dim)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, pad_bias: Optional[torch.Tensor]) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if pad_bias is not None:
            bias = bias.masked_fill(pad_bias, torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        x = _clamp_fp16(x + self.ffn(self.norm2(x)))
        return x


class UMT5Encoder(nn.Module):
    """forward(ids [B, L] long, mask [B, L] (1 = token, 0 = padding) or None) -> [B, L, dim]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        length = ids.shape[1]
        buckets = relative_position_buckets(length, length, self.cfg.num_buckets, device=ids.device)
        # Padding keys get the most negative value; padded queries still see the real tokens.
        pad_bias = None if mask is None else (mask == 0).view(ids.shape[0], 1, 1, length)
        for block in self.blocks:
            x = block(x, buckets, pad_bias)
        return self.norm(x)


def load_umt5_encoder(path: Union[str, Path], cfg: TextConfig, dtype: Optional[torch.dtype] = None,
                      device: Union[str, torch.device] = "cpu") -> UMT5Encoder:
    """Build the encoder on the meta device and assign the checkpoint's tensors (memory-mapped).

    `path` is the .pth file or the Wan folder holding it. Keys must match exactly; the error names the
    missing and unexpected ones. dtype None keeps the file's dtype (bf16 for the released file)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"umT5 encoder checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the umT5 encoder config; "
                         f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
                         f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''} "
                         f"({len(unexpected)})")
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, "
                             f"the config needs {tuple(tensor.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    return model.eval().requires_grad_(False)


class TextEncoder:
    """The encoder plus its tokenizer: prompts -> [B, text_len, dim] with padding positions zeroed."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: Union[UMT5Tokenizer, ByteTokenizer]):
        if tokenizer.vocab_size > encoder.cfg.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the encoder's "
                             f"({encoder.cfg.vocab_size})")
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = tokenizer.text_len

    @classmethod
    def from_wan_folder(cls, folder: Union[str, Path], cfg: TextConfig, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu") -> "TextEncoder":
        """Real weights: `<folder>/models_t5_umt5-xxl-enc-bf16.pth` and `<folder>/google/umt5-xxl/`."""
        tokenizer = UMT5Tokenizer.from_folder(folder, text_len=cfg.text_len)
        return cls(load_umt5_encoder(folder, cfg, dtype=dtype, device=device), tokenizer)

    @classmethod
    def random(cls, cfg: TextConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu") -> "TextEncoder":
        """Random weights with the byte tokenizer (the `tiny` config)."""
        gen = torch.Generator().manual_seed(seed)
        encoder = UMT5Encoder(cfg)
        with torch.no_grad():
            for name, p in encoder.named_parameters():
                if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    fan_in = p.shape[-1] if p.ndim == 2 and "embedding" not in name else 1
                    p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)
        return cls(encoder.to(device=device, dtype=dtype), ByteTokenizer(cfg.vocab_size, cfg.text_len))

    @property
    def device(self) -> torch.device:
        return self.encoder.token_embedding.weight.device

    @torch.no_grad()
    def encode_prompts(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.encoder(ids, mask)
        return out * mask.unsqueeze(-1).to(out.dtype)  # the reference's u[seq_len:] = 0
