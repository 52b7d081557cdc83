"""Time alternative kernels for the two places the chunk time goes: the VAE's causal 3D convs and the
DiT's attention. Every conv call of one steady streamed encode + decode chunk is recorded at its real
shape and layout, then each is re-run as:

  conv3d   the call as the engine makes it (cuDNN conv3d, channels-last 3D)
  taps     one cuDNN conv2d per time tap over frame views (frames as the batch), summed
  stacked  the kt time-shifted frames stacked on channels (one copy), one conv2d
  ncdhw    conv3d in the contiguous layout

and attention at the DiT's steady shapes through each SDPA backend. Prints ms per variant and the
largest deviation from the engine's call.

    python -m bench.kernel_variants [--height 480 --width 832] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.measure import mean_ms
from engine.config import VAEConfig
from engine.vae import WanVAE

log = logging.getLogger("bench.kernel_variants")
DEVICE = os.environ.get("KV_DEVICE", "cuda")


def _time(fn: Callable[[], torch.Tensor], reps: int = 10) -> float:
    return mean_ms(fn, reps, cuda=DEVICE != "cpu")  # off the GPU: a smoke run of this script


def record_convs(h: int, w: int) -> Counter:
    """(kind, input shape, weight shape, stride, padding) -> calls in one steady encode+decode chunk."""
    vae = WanVAE(VAEConfig()).to(DEVICE, torch.bfloat16).eval()
    st = vae.new_stream_state()
    v = torch.rand(1, 3, 13, h, w, device=DEVICE, dtype=torch.bfloat16) * 2 - 1
    z = vae.stream_encode(v[:, :, :5], st)
    vae.stream_decode(z, st)
    calls: Counter = Counter()
    real3, real2 = F.conv3d, F.conv2d

    def spy(kind, real):
        def f(x, weight, bias=None, stride=1, padding=0, *a):
            calls[(kind, tuple(x.shape), tuple(weight.shape), str(stride), str(padding))] += 1
            return real(x, weight, bias, stride, padding, *a)
        return f

    F.conv3d, F.conv2d = spy("3d", real3), spy("2d", real2)
    try:
        z = vae.stream_encode(v[:, :, 5:9], st)
        vae.stream_decode(z[:, :, -1:], st)
    finally:
        F.conv3d, F.conv2d = real3, real2
    return calls


def conv_variants(key: tuple) -> dict[str, float]:
    kind, xs, ws, stride, padding = key
    pad = eval(padding) if padding.startswith("(") else int(padding)
    strd = eval(stride) if stride.startswith("(") else int(stride)
    x = torch.randn(xs, device=DEVICE, dtype=torch.bfloat16)
    wt = torch.randn(ws, device=DEVICE, dtype=torch.bfloat16) / (ws[1] * ws[2] * ws[3] * (ws[4] if len(ws) > 4 else 1)) ** 0.5
    b = torch.randn(ws[0], device=DEVICE, dtype=torch.bfloat16)
    out: dict[str, float] = {}
    if kind == "2d":
        xc, wc = x.contiguous(memory_format=torch.channels_last), wt.contiguous(memory_format=torch.channels_last)
        out["conv2d"] = _time(lambda: F.conv2d(xc, wc, b, strd, pad))
        return out
    xc, wc = x.contiguous(memory_format=torch.channels_last_3d), wt.contiguous(memory_format=torch.channels_last_3d)
    ref = F.conv3d(xc, wc, b, strd, pad)
    out["conv3d"] = _time(lambda: F.conv3d(xc, wc, b, strd, pad))
    out["ncdhw"] = _time(lambda: F.conv3d(x, wt, b, strd, pad))
    kt = ws[2]
    st_t = strd[0] if isinstance(strd, tuple) else strd
    if st_t != 1 or kt == 1:
        if kt == 1:  # 1x1x1: a matmul over frames
            f = xc.transpose(1, 2).reshape(-1, *xs[1:2], *xs[3:])
            w2 = wc[:, :, 0].contiguous(memory_format=torch.channels_last)
            out["taps"] = _time(lambda: F.conv2d(f, w2, b))
        return out
    b_, c, tp, hh, ww = xs
    t = tp - kt + 1
    p2 = pad[1:] if isinstance(pad, tuple) else pad
    frames = xc.transpose(1, 2).reshape(b_ * tp, c, hh, ww)  # NHWC view, no copy
    taps = [wc[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(kt)]

    def tapsum() -> torch.Tensor:
        y = F.conv2d(frames[kt - 1:], taps[kt - 1], b, 1, p2)
        for k in range(kt - 1):
            y += F.conv2d(frames[k:k + t], taps[k], None, 1, p2)
        return y

    wst = wc.permute(0, 2, 1, 3, 4).reshape(ws[0], kt * c, ws[3], ws[4]).contiguous(memory_format=torch.channels_last)

    def stacked() -> torch.Tensor:
        s = torch.stack([frames[k:k + t] for k in range(kt)], 1)  # [t, kt, C, H, W] from NHWC views
        s = s.permute(0, 3, 4, 1, 2).reshape(t, hh, ww, kt * c).permute(0, 3, 1, 2)
        return F.conv2d(s, wst, b, 1, p2)

    yr = ref.transpose(1, 2).reshape(t, ws[0], *ref.shape[3:]).float()
    for name, fn in (("taps", tapsum), ("stacked", stacked)):
        y = fn().float()
        out[name] = _time(fn)
        out[name + "_maxrel"] = float((y - yr).abs().max() / yr.abs().max())
    return out


def attention_variants() -> list[dict]:
    rows = []
    # (row, rows in the stream batch, query tokens, key tokens, heads): steady DiT shapes
    for name, r, lq, lk, hds in (("p1", 2, 1560, 9360, 12), ("p2", 1, 1024, 6144, 12), ("p3", 1, 1024, 5120, 40)):
        # the engine's layout: [B, L, H, D] tensors seen as [B, H, L, D] through a transpose
        q = torch.randn(r, lq, hds, 128, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(r, lk, hds, 128, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(r, lk, hds, 128, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        res = dict(row=name)
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    y = F.scaled_dot_product_attention(q, k, v)
                    ms = _time(lambda: F.scaled_dot_product_attention(q, k, v))
                res[be.name] = round(ms, 3)
                res[be.name + "_err"] = float((y.float() - ref).abs().max())
            except RuntimeError as exc:
                res[be.name] = f"n/a ({str(exc)[:60]})"
        flops = 4 * r * hds * lq * lk * 128
        res["tflop"] = flops / 1e12
        rows.append(res)
    # the VAE's single-head attention over one frame's positions (head size 384: no flash/cuDNN kernel)
    for name, n in (("vae-480x832", 60 * 104), ("vae-512x512", 64 * 64)):
        q, k, v = (torch.randn(1, 1, n, 384, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        res = dict(row=name)
        variants = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "math_bf16": lambda: _attention_math(q, k, v),
        }
        for label, fn in variants.items():
            y = fn()
            res[label] = round(_time(fn), 3)
            res[label + "_err"] = float((y.float() - ref).abs().max())
        rows.append(res)
    return rows


def _attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores in bf16 (fp32 accumulation), softmax in fp32, probabilities back to bf16 for the PV GEMM."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def norm_variants() -> list[dict]:
    """The VAE's fused channel RMS norm (+ SiLU) at the decoder's shapes, per launch configuration, next
    to a plain copy of the same tensor (the memory-bound floor)."""
    from engine import kernels

    rows = []
    for c, t, h, w in ((96, 4, 480, 832), (192, 4, 240, 416), (384, 2, 120, 208)):
        x = torch.randn(1, c, t, h, w, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        y = torch.empty_like(x)
        g = torch.rand(c, device=DEVICE, dtype=torch.bfloat16)
        n_rows = x.numel() // c
        block_c = 1 << (c - 1).bit_length()
        res = dict(shape=[c, t, h, w], copy=round(_time(lambda: y.copy_(x)), 4))
        for block_r, warps in ((4096 // block_c, 4), (4096 // block_c, 8), (8192 // block_c, 8), (2048 // block_c, 4),
                               (1024 // block_c, 2), (16384 // block_c, 16)):
            grid = ((n_rows + block_r - 1) // block_r,)

            def run() -> torch.Tensor:
                kernels._rms_norm_rows[grid](x, g, g, y, n_rows, c, 1.0, BLOCK_R=block_r, BLOCK_C=block_c, SILU=True,
                                             BIAS=False, num_warps=warps)
                return y

            res[f"r{block_r}w{warps}"] = round(_time(run), 4)
        rows.append(res)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--norms-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.backends.cudnn.benchmark = True
    if args.norms_only:
        for r in norm_variants():
            log.info("norm %s", r)
        return
    if args.attention_only:
        for r in attention_variants():
            log.info("attention %s", r)
        return
    calls = record_convs(args.height, args.width)
    table, totals = [], Counter()
    for key, n in sorted(calls.items(), key=lambda kv: -kv[1] * math.prod(kv[0][1]) * math.prod(kv[0][2])):
        res = conv_variants(key)
        for var in ("conv3d", "conv2d", "taps", "stacked", "ncdhw"):
            # a variant missing for this call falls back to the engine's call
            base = res.get("conv3d", res.get("conv2d", 0.0))
            totals[var] += n * res.get(var, base)
        table.append(dict(call=key, n=n, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
        log.info("%s x%d %s", key, n, {k: round(v, 3) for k, v in res.items()})
    att = attention_variants()
    for r in att:
        log.info("attention %s", r)
    log.info("conv totals per chunk (ms): %s", {k: round(v, 2) for k, v in totals.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(convs=table, totals=totals, attention=att), f, indent=1, default=str)


if __name__ == "__main__":
    main()
