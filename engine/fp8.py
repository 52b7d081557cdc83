"""FP8 (e4m3) linear layers for the DiT's blocks (`dtype: fp8`, README "FP8 (Hopper/Ada)").

With fp8 the engine runs in bf16 except the linear layers inside the transformer blocks (self- and
cross-attention q/k/v/o, the FFN's two layers): after the bf16 weights are loaded, `convert_blocks` swaps
each of them for an `FP8Linear` once, in place. Norms, embeddings, the head, the VAE and the text encoder
stay bf16.

Scales, both row-wise (float32):
- weights: one scale per output channel, amax(|W[n, :]|) / 448, computed once at conversion. A per-tensor
  scale lets one large channel crush the resolution of all others; per channel costs nothing at run time
  (the scaled-matmul kernel applies it to its output).
- activations: one scale per token, amax(|x[m, :]|) / 448, computed on the device at every call (dynamic:
  no calibration data exists for random or new weights, and token norms vary a lot across a frame and
  across timesteps, which one static per-tensor scale would clip or waste).
`torch._scaled_mm` takes exactly this layout (scale_a [M, 1], scale_b [1, N], float32); on CUDA row-wise
scaling needs a bf16 output, which is the engine's dtype anyway. The bias is added afterwards in bf16.

CUDA graphs: nothing here reads a value back to the host (no .item(), no data-dependent shapes); the
activation scale is a device tensor, so a captured forward replays the whole quantise + GEMM.

`FP8Linear` runs on any device torch's scaled matmul supports (CPU included, for tests); whether an
engine may use it is decided once at start-up by `fp8_device_problem` (FP8 tensor cores need compute
capability 8.9+).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from interface.catalogue import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# a zero row (e.g. padding) gets this scale instead of 0, so that x / scale stays finite
MIN_SCALE = 1e-12
MIN_CAPABILITY = (8, 9)
# The linear layers of a block (engine.dit.Block) that become FP8: every one of them.
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def fp8_device_problem(device: torch.device) -> Optional[str]:
    """Why `device` cannot run the fp8 engine, or None when it can."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= MIN_CAPABILITY:
            return None
        what = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    else:
        what = f"{device.type!r}, not a CUDA GPU"
    return ("fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada/Hopper, compute capability 8.9+); "
            f"this device is {what}")


class FP8Unavailable(ConfigError):
    """dtype fp8 asked for on a device that cannot run it: a configuration error, reported in one line."""


def check_fp8_device(device: torch.device) -> None:
    problem = fp8_device_problem(device)
    if problem:
        raise FP8Unavailable(problem)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (e4m3 values [R, C], float32 scales [R, 1]) with t ≈ values * scales, each row's largest
    magnitude mapped to 448. Device-only arithmetic (no host sync)."""
    t32 = t.float()
    scale = t32.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_SCALE) / FP8_MAX
    return (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """y = x W^T + b with W stored as e4m3 plus a float32 scale per output channel, and x quantised per
    token at each call; the GEMM is torch._scaled_mm with the output in x's dtype (bf16 in the engine).
    Its state dict (weight, weight_scale, bias) is what block moves between ranks carry."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device] = None, bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        # [1, N]: the layout _scaled_mm takes for the second operand's row-wise scales
        self.register_buffer("weight_scale", torch.empty(1, out_features, dtype=torch.float32, device=device))
        self.bias: Optional[torch.Tensor]
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                  bias_dtype=w.dtype)
        q, scale = quantize_rows(w)
        out.weight.copy_(q)
        out.weight_scale.copy_(scale.t())
        if linear.bias is not None:
            out.bias.copy_(linear.bias)  # type: ignore[union-attr]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        # weight.t(): the column-major second operand the FP8 GEMM wants, without a copy
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.unflatten(0, lead)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def convert_block(block: nn.Module) -> None:
    """Swap the block's linear layers (BLOCK_LINEARS) for FP8Linear, in place. On a meta block (a block a
    rank does not own yet) the new modules are meta too, ready for load_state_dict(assign=True)."""
    for name in BLOCK_LINEARS:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        linear = parent.get_submodule(child)
        if isinstance(linear, FP8Linear):
            continue
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(linear).__name__}")
        setattr(parent, child, FP8Linear.from_linear(linear))


def convert_blocks(dit: nn.Module, layers: Iterable[int]) -> None:
    """Convert the DiT's blocks `layers` (those this process owns) after their weights are loaded; once."""
    for i in layers:
        convert_block(dit.blocks[i])  # type: ignore[index]
