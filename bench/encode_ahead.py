"""What encoding ahead saves: the Wan VAE encode of a steady chunk, timed from the moment its last frame
is handed over to the latent, when the chunk comes whole (one CUDA graph) and when its first three frames
went ahead (`stream_encode_ahead`: the per-frame blocks, eager) so that only the last frame's front and
the encoder's back (one CUDA graph) are left. The GPU is idle when each timed call starts, as at one
session's chunk boundary; the time counts the host's launches.

    python -m bench.encode_ahead [--sizes 512x512,480x832] [--chunks 40]

Random weights at the real shapes; prints one line per size and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from engine.config import VAEConfig
from engine.vae import WanVAE


def _timed(call) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_encodes(vae: WanVAE, height: int, width: int, chunks: int, warmup: int = 5) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    video = torch.rand(1, 3, 1 + 4 * (chunks + warmup), height, width, device="cuda", generator=g) * 2 - 1
    whole_state, ahead_state = vae.new_stream_state(), vae.new_stream_state()
    for state in (whole_state, ahead_state):
        vae.stream_encode(video[:, :, :1], state)
    whole, fronts, last = [], [], []
    for i in range(chunks + warmup):
        lo = 1 + 4 * i
        w = _timed(lambda: vae.stream_encode(video[:, :, lo : lo + 4], whole_state))
        f = sum(_timed(lambda k=k: vae.stream_encode_ahead(video[:, :, k : k + 1], ahead_state))
                for k in range(lo, lo + 3))
        a = _timed(lambda: vae.stream_encode(video[:, :, lo + 3 : lo + 4], ahead_state))
        if i >= warmup:  # cuDNN's algorithm choice, the graphs' capture
            whole.append(w)
            fronts.append(f)
            last.append(a)
    return {"height": height, "width": width, "chunks": chunks,
            "whole_ms": round(statistics.median(whole), 3),
            "ahead_fronts_ms": round(statistics.median(fronts), 3),
            "after_last_frame_ms": round(statistics.median(last), 3),
            "back_graph_replays": ahead_state.enc_graph.replays if ahead_state.enc_graph else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512x512,480x832", help="HxW,...")
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.encode_ahead: needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    vae = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval()
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.split("x"))
        r = time_encodes(vae, height, width, args.chunks)
        print(f"{height}x{width}: a whole chunk {r['whole_ms']:.2f} ms; with 3 frames ahead "
              f"({r['ahead_fronts_ms']:.2f} ms of fronts before) {r['after_last_frame_ms']:.2f} ms after the last frame "
              f"(median of {r['chunks']} chunks)")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
