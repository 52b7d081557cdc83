"""Attention backend, chosen once per device.

On Hopper and newer (compute capability >= 9), torch SDPA with cuDNN's attention kernel first: at the
DiT's steady shapes it took about half the time of both FlashAttention-2 (torch's flash backend, the
same kernels as the flash-attn package) and the memory-efficient kernel on an H200
(`bench/kernel_variants.py`, docs/BENCHMARKS.md). On older GPUs the flash-attn package when installed,
else SDPA's own choice. SDPA falls through the list to the next backend when one cannot take an input
(a mask, an unsupported head size).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

try:  # flash-attn is an optional extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore

    _HAVE_FLASH = True
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = None
    _HAVE_FLASH = False

# The fast-path check (bench/check_fast_paths.py) turns this off to compare against SDPA's default choice.
prefer_cudnn = True
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@functools.lru_cache(maxsize=None)
def _is_hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def backend_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa"
    if prefer_cudnn and _is_hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device()):
        return "sdpa-cudnn"
    return "flash-attn" if _HAVE_FLASH else "sdpa"


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
    name = backend_name(q.device)
    if name == "flash-attn" and key_valid is None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == "sdpa-cudnn":
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)
