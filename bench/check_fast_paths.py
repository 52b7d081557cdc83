"""On the GPU: the optimised paths give the plain paths' output (bf16 tolerance), at real shapes.

- DiT step and VAE encode/decode replayed from CUDA graphs vs the same steps run eagerly (same session
  inputs and noise), over enough chunks to cross a RoPE position wrap (every 50 latent frames);
- the fused Triton VAE norm vs the torch expression (stream encode + decode of the same video).

    python -m bench.check_fast_paths [--model wan-1.3b --height 480 --width 832 --steps 2]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from bench.measure import synthetic_video
from engine import attention, kernels
from engine.runtime import EngineOptions, StreamEngine
from interface.controls import StreamParams

log = logging.getLogger("check")


def stream(engine: StreamEngine, video: np.ndarray, graphs: bool) -> np.ndarray:
    s = engine.open_session("a watercolor painting", StreamParams(seed=5))
    s.batch.runner.use_graphs = graphs
    engine.vae.use_graphs = graphs
    out = s.push(video, list(range(len(video))))
    engine.synchronize()
    out += s.take_finished()  # every decoded frame (a push returns before its last chunks are on the host)
    captured = s.batch.runner._graph is not None
    primed_from_graph = s.batch.runner._prime is not None  # the first chunk's forwards (captured at frame 0)
    vae_replays = [g.replays if g else 0 for g in (s.vae_state.enc_graph, s.dec_state.dec_graph)]
    s.close()
    engine.vae.use_graphs = True
    if len(video) >= 30:
        assert captured == graphs, f"DiT graph captured={captured}, wanted {graphs}"
        assert primed_from_graph == graphs, f"first chunk from a graph={primed_from_graph}, wanted {graphs}"
        assert (min(vae_replays) > 0) == graphs, f"VAE graph replays {vae_replays}, graphs wanted: {graphs}"
    return np.stack([f for f, _ in out]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan-1.3b")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=60, help="> 50 crosses a RoPE position wrap")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = StreamEngine.create(EngineOptions(model=args.model, device="cuda", height=args.height, width=args.width, steps=args.steps))
    video = synthetic_video(5 + 4 * args.chunks, args.height, args.width)
    eager = stream(engine, video, graphs=False)
    graphed = stream(engine, video, graphs=True)
    d = np.abs(eager - graphed)
    print(f"DiT + VAE CUDA graphs vs eager: {len(eager)} frames, max |diff| {d.max():.1f}, mean {d.mean():.4f} "
          f"(uint8 levels); after the first position wrap: max |diff| {d[4 * 52:].max() if len(d) > 4 * 52 else float('nan'):.1f}")
    # every fast path at once against every plain path: CUDA graph + Triton + cuDNN attention vs eager +
    # plain torch + SDPA's default backend, over the whole clip
    kernels._HAVE_TRITON, attention.prefer_cudnn = False, False
    slow = stream(engine, video, graphs=False)
    kernels._HAVE_TRITON, attention.prefer_cudnn = True, True
    d = np.abs(slow - graphed)
    rel = float(np.linalg.norm(slow - graphed) / np.linalg.norm(slow - 127.5))
    print(f"All fast paths vs all plain paths (graph, Triton, {attention.backend_name(engine.device)} vs eager, torch, "
          f"SDPA default): {len(slow)} frames, mean |diff| {d.mean():.3f}, p99 {np.percentile(d, 99):.1f} "
          f"(uint8 levels), relative {rel:.2e}")
    kernels._HAVE_TRITON = False  # everything in plain torch (VAE norm included)
    plain = stream(engine, video[:9], graphs=False)
    kernels._HAVE_TRITON = True
    fused = stream(engine, video[:9], graphs=False)
    d = np.abs(plain - fused)
    print(f"Fused Triton kernels vs plain torch (DiT + VAE), first 9 frames: mean |diff| {d.mean():.3f}, "
          f"p99 {np.percentile(d, 99):.1f} (uint8 levels)")

    v = torch.from_numpy(video[:9]).cuda().permute(3, 0, 1, 2)[None].to(torch.bfloat16) / 127.5 - 1
    outs = {}
    for fused in (True, False):
        kernels._HAVE_TRITON = fused
        st = engine.vae.new_stream_state()
        z = torch.cat([engine.vae.stream_encode(v[:, :, :5], st), engine.vae.stream_encode(v[:, :, 5:9], st)], 2)
        x = torch.cat([engine.vae.stream_decode(z[:, :, :2], st), engine.vae.stream_decode(z[:, :, 2:], st)], 2)
        outs[fused] = (z.float(), x.float())
    kernels._HAVE_TRITON = True
    for i, name in enumerate(("latents", "frames")):
        a, b = outs[True][i], outs[False][i]
        print(f"VAE fused norm vs torch, {name}: relative error {float((a - b).norm() / b.norm()):.2e}")

    # streamed (input windows, folded biases, fused kernels) vs the whole clip at once (no cache,
    # biases added by the convs): the same numbers up to bf16 rounding
    with torch.no_grad():
        z_whole = engine.vae.encode(v)
        x_whole = engine.vae.decode(outs[True][0].to(v.dtype))
    for name, a, b in (("latents", outs[True][0], z_whole), ("frames", outs[True][1], x_whole)):
        print(f"VAE streamed vs whole clip, {name}: relative error {float((a - b.float()).norm() / b.float().norm()):.2e}")

    # the FFN's first GEMM with bias + GELU in cuBLASLt's epilogue vs the module (tanh GELU)
    blk = engine.dit.blocks[0]
    xin = torch.randn(2, 1560, blk.ffn[0].in_features, device="cuda", dtype=engine.dtype)
    with torch.no_grad():
        fused, plain = blk._ffn(xin).float(), blk.ffn(xin).float()
        fc1 = blk.ffn[0]
        erf = blk.ffn[2](torch.nn.functional.gelu(fc1(xin))).float()
    print(f"DiT FFN with the GELU epilogue vs the module: relative error {float((fused - plain).norm() / plain.norm()):.2e} "
          f"(vs an erf GELU: {float((fused - erf).norm() / erf.norm()):.2e})")


if __name__ == "__main__":
    main()
