"""The fused kernels against the plain torch expressions (and a DiT forward that must reach them), run by Triton's interpreter on the CPU
(on the GPU the same kernel is compiled; bench/check_fast_paths.py compares it there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from engine import kernels
assert kernels._HAVE_TRITON and kernels._INTERPRET
torch.manual_seed(0)
for c, shape in [(96, (1, 96, 3, 6, 10)), (24, (2, 24, 1, 5, 7)), (384, (1, 384, 2, 3, 4))]:
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d) * 3
    g = torch.rand(c, 1, 1, 1) + 0.5
    for silu in (False, True):
        assert kernels._usable(x)
        got = kernels.rms_norm_channels(x, g, c ** 0.5, silu)
        want = kernels.rms_norm_channels_torch(x.clone(), g, c ** 0.5, silu)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (c, silu, err)
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
x = torch.randn(1, 8, 2, 4, 4)  # not channels-last: the torch path
assert not kernels._usable(x)

# a conv bias folded into the norm, and into the residual add, equals adding it first
x = torch.randn(1, 96, 3, 6, 10).contiguous(memory_format=torch.channels_last_3d)
b, g = torch.randn(96), torch.rand(96, 1, 1, 1) + 0.5
want = kernels.rms_norm_channels_torch(x + b.view(-1, 1, 1, 1), g, 96 ** 0.5, True)
for xin in (x, x.contiguous()):  # fused, and the torch fallback
    got = kernels.rms_norm_channels(xin, g, 96 ** 0.5, True, bias=b)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
# ... and written into a slice of a conv's input window, leaving the history frames in front alone
win = torch.zeros(1, 96, 5, 6, 10).contiguous(memory_format=torch.channels_last_3d)
got = kernels.rms_norm_channels(x, g, 96 ** 0.5, True, bias=b, out=win[:, :, 2:])
assert got.data_ptr() == win[:, :, 2:].data_ptr() and win[:, :, :2].abs().max() == 0
assert ((win[:, :, 2:] - want).norm() / want.norm()).item() < 1e-5
# nearest 2x upsample of a channels-last batch of frames
u = torch.randn(3, 24, 5, 7).contiguous(memory_format=torch.channels_last)
up = kernels.upsample2x_nearest(u)
assert torch.equal(up, torch.nn.functional.interpolate(u, scale_factor=2.0, mode="nearest"))
assert up.is_contiguous(memory_format=torch.channels_last)
s = torch.randn_like(x)
want = x + b.view(-1, 1, 1, 1) + s
for h in (x.clone(), x.contiguous()):
    got = kernels.bias_residual_(h, b, s)
    assert got is h and ((got - want).norm() / want.norm()).item() < 1e-6

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

# DiT fusions: 2 rows, 2 frames of 6 tokens, width 96 = 3 heads of 32 (16 rotation pairs)
r, f, t, d, heads = 2, 2, 6, 96, 3
x = torch.randn(r, f * t, d) * 2 + 0.3
shift, scale, gate = (torch.randn(r, f, d) for _ in range(3))
assert rel(kernels.modulate(x, shift, scale, 1e-6), kernels.modulate_torch(x, shift, scale, 1e-6)) < 1e-5
y = torch.randn(r, f * t, d)
assert rel(kernels.gated_add(x, y, gate), kernels.gated_add_torch(x, y, gate)) < 1e-6
w = torch.rand(d) + 0.5
ang = torch.rand(r, f * t, d // heads // 2) * 6
got = kernels.qk_norm_rope(x, w, ang.cos(), ang.sin(), heads, 1e-6)
want = kernels.qk_norm_rope_torch(x, w, ang.cos(), ang.sin(), heads, 1e-6)
assert got.shape == (r, f * t, heads, d // heads) and rel(got, want) < 1e-5, rel(got, want)
assert rel(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_torch(x, w, 1e-6)) < 1e-6

# KV cache eviction decided by the three kernels == the torch rule (StreamKVCache._evict_slot): FIFO,
# sink refreshes, round robin, sink means, over 2 rows and 2 layers, with and without refresh
from engine.kv_cache import StreamKVCache
from engine.rope import Rope

def stream_cache(use_kernels, threshold):
    usable = kernels.evict_usable
    kernels.evict_usable = usable if use_kernels else (lambda k: False)
    calls, writes = [], []
    real, real_write = kernels.evict_slots, kernels.write_frames
    kernels.evict_slots = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    kernels.write_frames = lambda *a, **kw: writes.append(real_write(*a, **kw)) or writes[-1]
    try:
        g = torch.Generator().manual_seed(3)
        # 70 tokens a frame: the token sums run over two blocks of 64
        c = StreamKVCache([0, 1], 2, 5, 70, 2, 16, 2, threshold, Rope(16), torch.float32, torch.device("cpu"))
        base = torch.randn(70, 2, 16, generator=g)
        for p in range(16):
            for layer in (0, 1):
                # mostly frames like the first ones (FIFO), every fifth one unlike them (a refresh)
                new = torch.randn(2, 70, 2, 16, generator=g)
                k = new if p % 5 == 4 else base + 0.2 * new
                if layer == 0:
                    c.begin([p, p], 1)
                c.update(layer, k.contiguous(), (k * 0.5 + 0.1).contiguous())
    finally:
        kernels.evict_usable, kernels.evict_slots, kernels.write_frames = usable, real, real_write
    assert bool(calls) == use_kernels and any(writes) == use_kernels  # the kernels really ran (or not)
    return c

for threshold in (0.3, None):
    a, b = stream_cache(True, threshold), stream_cache(False, threshold)
    for i in (0, 1):
        assert torch.equal(a.k[i], b.k[i]) and torch.equal(a.v[i], b.v[i]), (threshold, i)
        assert torch.equal(a.rr[i], b.rr[i]) and torch.equal(a.slot_pos[i], b.slot_pos[i])
        if threshold is not None:
            assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.sink_mean[i], b.sink_mean[i]))
    if threshold is not None:  # the scenario did refresh sinks: positions beyond the first two sit in sink slots
        assert (a.slot_pos[0][:, :2] >= 2).any()

# a whole DiT forward reaches the fused kernels: no torch fallback is ever taken
from engine.config import load_model_config
from engine.dit import WanDiT
from engine.rope import Rope

def never(*a, **k):
    raise AssertionError("a fused DiT kernel fell back to torch")

kernels.modulate_torch = kernels.gated_add_torch = kernels.qk_norm_rope_torch = kernels.rms_norm_torch = never
cfg = load_model_config("tiny").dit
dit = WanDiT(cfg).eval()
with torch.no_grad():
    out = dit.forward_block_causal(torch.randn(1, 16, 2, 8, 8), torch.tensor([[700, 700]]),
                                   torch.randn(1, 512, cfg.text_dim), [1, 1], Rope(cfg.head_dim))
assert out.shape == (1, 16, 2, 8, 8)
print("ok")
"""


def test_fused_rms_norm_matches_torch_in_interpreter():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
