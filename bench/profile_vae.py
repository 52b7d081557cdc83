"""Profile one streamed VAE encode + decode chunk at a real size and print where the GPU time goes,
grouped by op and input shape (which layouts reach which kernels).

    python -m bench.profile_vae [--height 480 --width 832] [--out file]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import VAEConfig
from engine.vae import WanVAE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    vae = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval()
    st = vae.new_stream_state()
    h, w = args.height, args.width
    v = torch.rand(1, 3, 5 + 4 * 6, h, w, device="cuda", dtype=torch.bfloat16) * 2 - 1
    vae.stream_encode(v[:, :, :5], st)
    vae.stream_decode(torch.randn(1, 16, 2, h // 8, w // 8, device="cuda", dtype=torch.bfloat16), st)
    for i in range(4):  # warm-up (cudnn.benchmark picks algorithms)
        z = vae.stream_encode(v[:, :, 5 + 4 * i : 9 + 4 * i], st)
        vae.stream_decode(z, st)
    torch.cuda.synchronize()
    times = {}
    for name, fn in (("encode", lambda: vae.stream_encode(v[:, :, 25:29], st)), ("decode", lambda: vae.stream_decode(z, st))):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(5):
            fn()
        e1.record()
        torch.cuda.synchronize()
        times[name] = e0.elapsed_time(e1) / 5
    # which norms reach the fused kernel (channels-last) and which fall back (layout trace)
    import collections

    from engine import kernels, vae as vae_mod

    trace: collections.Counter = collections.Counter()
    plain = vae_mod.rms_norm_channels

    def spy(x, g, s, silu=False):
        trace[(tuple(x.shape), "fused" if kernels._usable(x) else f"torch strides={x.stride()}")] += 1
        return plain(x, g, s, silu)

    vae_mod.rms_norm_channels = spy
    z = vae.stream_encode(v[:, :, 25:29], st)
    vae.stream_decode(z, st)
    vae_mod.rms_norm_channels = plain
    print("\n".join(f"{n:3d} x {k}" for k, n in sorted(trace.items())))
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        vae.stream_decode(z, st)
        torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=80)
    text = f"{h}x{w}: encode {times['encode']:.1f} ms, decode {times['decode']:.1f} ms per 4-frame chunk\n" + table
    print(text[:6000])
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
