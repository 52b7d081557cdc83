"""When a steady chunk's frames reach the host: the Wan VAE decode of one latent as the engine runs it
(CUDA graphs, each part's uint8 conversion and copy to pinned memory queued right after it), timed on
the GPU from the decode's start to the copy of frame 0 and to the copy of the last frame.

    python -m bench.decode_first_frame [--sizes 512x512,480x832] [--chunks 40]

A tree whose VAE has no `stream_decode_parts` (before the decode came in parts) is timed the same way
with its one part (run it from that tree's folder with this file copied in, as bench/ab.sh does).
Random weights at the real shapes; prints one line per size and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Iterable

import torch

from engine.config import VAEConfig
from engine.transfer import FrameIO
from engine.vae import WanVAE


def parts_of(vae: WanVAE, z: torch.Tensor, state: object) -> Iterable[torch.Tensor]:
    decode = getattr(vae, "stream_decode_parts", None)
    return decode(z, state) if decode is not None else [vae.stream_decode(z, state)]


def time_decodes(vae: WanVAE, io: FrameIO, height: int, width: int, chunks: int) -> dict:
    state = vae.new_stream_state()
    h, w = height // 8, width // 8
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(1, 16, 2 + chunks, h, w, device="cuda", generator=g, dtype=torch.bfloat16)
    for p in parts_of(vae, z[:, :, :2], state):
        io.to_uint8_later(p).result()
    first_ms, all_ms, counts = [], [], []
    for i in range(chunks):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        marks, pending = [], []
        for p in parts_of(vae, z[:, :, 2 + i : 3 + i], state):
            pending.append(io.to_uint8_later(p))
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
            marks.append((mark, p.shape[2]))
        for p in pending:
            p.result()
        counts.append([n for _, n in marks])
        if i >= 5:  # warm-up: cuDNN's algorithm choice and the graphs' capture
            first_ms.append(start.elapsed_time(marks[0][0]))
            all_ms.append(start.elapsed_time(marks[-1][0]))
    return {"height": height, "width": width, "chunks": len(first_ms), "parts": counts[-1],
            "frame0_on_host_ms": round(statistics.median(first_ms), 3),
            "all_on_host_ms": round(statistics.median(all_ms), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512x512,480x832", help="HxW,...")
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    vae = WanVAE(VAEConfig()).to("cuda", torch.bfloat16).eval()
    io = FrameIO(torch.device("cuda"))
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.split("x"))
        r = time_decodes(vae, io, height, width, args.chunks)
        print(f"{height}x{width}: parts {r['parts']}, frame 0 on the host after {r['frame0_on_host_ms']:.2f} ms, "
              f"all 4 after {r['all_on_host_ms']:.2f} ms (median of {r['chunks']} chunks)")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
