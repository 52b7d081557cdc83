"""Does batching several sessions' VAE work into one call pay? Per-chunk encode (4 frames) and decode
(1 latent -> 4 frames) of the Wan VAE and of the light TAEHV codec, at batch B (B sessions' chunks in
one call, each row its own stream history), in the steady state (CUDA graphs where the engine uses
them), timed with CUDA events. Prints ms per call and ms per session-chunk for each B.

    python -m bench.vae_batch [--height 512 --width 512] [--batches 1,2,4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from bench.measure import mean_ms
from engine.config import VAEConfig
from engine.taehv import random_taehv
from engine.vae import WanVAE


def measure(codec, name: str, b: int, h: int, w: int, repeats: int, encode: bool, decode: bool) -> dict:
    dt = torch.bfloat16
    st = codec.new_stream_state()
    v = torch.rand(b, 3, 5, h, w, device="cuda", dtype=dt) * 2 - 1
    z = torch.randn(b, 16, 2, h // 8, w // 8, device="cuda", dtype=dt)
    out: dict = {"codec": name, "batch": b}
    if encode:
        codec.stream_encode(v, st)
        chunk = v[:, :, 1:5].contiguous()
        out["encode_ms"] = mean_ms(lambda: codec.stream_encode(chunk, st), repeats)
    if decode:
        codec.stream_decode(z, st)
        lat = z[:, :, 1:2].contiguous()
        out["decode_ms"] = mean_ms(lambda: codec.stream_decode(lat, st), repeats)
    for k in ("encode_ms", "decode_ms"):
        if k in out:
            out[k.replace("_ms", "_ms_per_session")] = out[k] / b
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batches", default="1,2,3,4")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.backends.cudnn.benchmark = True
    batches = [int(x) for x in args.batches.split(",")]
    wan = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval()
    tae = random_taehv(0, encoder=True, decoder=True).to("cuda", torch.bfloat16).eval()
    rows = []
    for name, codec in (("wan", wan), ("taehv", tae)):
        for b in batches:
            rows.append(measure(codec, name, b, args.height, args.width, args.repeats, True, True))
    print(f"{args.height}x{args.width}, {torch.cuda.get_device_name()}")
    print(f"{'codec':6} {'B':>2} {'enc ms':>8} {'enc/sess':>9} {'dec ms':>8} {'dec/sess':>9}")
    for r in rows:
        print(f"{r['codec']:6} {r['batch']:2d} {r['encode_ms']:8.2f} {r['encode_ms_per_session']:9.2f} "
              f"{r['decode_ms']:8.2f} {r['decode_ms_per_session']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"height": args.height, "width": args.width, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
