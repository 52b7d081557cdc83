"""Attention backend, chosen once at start: flash-attn when installed (CUDA), else torch SDPA."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # flash-attn is an optional extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore

    _HAVE_FLASH = True
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = None
    _HAVE_FLASH = False


def backend_name(device: torch.device) -> str:
    return "flash-attn" if (_HAVE_FLASH and device.type == "cuda") else "sdpa"


def log_backend(device: torch.device) -> str:
    name = backend_name(device)
    log.info("attention backend: %s (flash-attn %s)", name, "installed" if _HAVE_FLASH else "not installed")
    return name


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Non-causal attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    key_valid [B, Lk] bool marks the keys each row may see (None: all).
    """
    if key_valid is None and _HAVE_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
