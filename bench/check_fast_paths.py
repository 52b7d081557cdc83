"""On the GPU: the optimised paths give the plain paths' output (bf16 tolerance), at real shapes.

- DiT step and VAE encode/decode replayed from CUDA graphs vs the same steps run eagerly (same session
  inputs and noise), over enough chunks to cross a RoPE position wrap (every 50 latent frames);
- the fused Triton VAE norm vs the torch expression (stream encode + decode of the same video).

    python -m bench.check_fast_paths [--model wan-1.3b --height 480 --width 832 --steps 2]

The graphs are the engine core's (`engine.core.stage`: the DiT blocks' steady and first-chunk graphs;
the VAE's per-stream graphs in the session's encoder and decoder stream states). `--device cpu --model
tiny` runs the same script without graphs or Triton (every comparison is then eager against eager): a
check of the script, not of the fast paths.
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


def _vae_modules(engine: StreamEngine) -> list:
    """The engine's codecs that replay CUDA graphs (the Wan VAE, LightVAE; TAEHV has none)."""
    mods = {id(m): m for m in (engine.vae, engine.encoder, engine.decoder) if hasattr(m, "use_graphs")}
    return list(mods.values())


def stream(engine: StreamEngine, video: np.ndarray, graphs: bool) -> np.ndarray:
    """Every frame of one session over `video` (flushed), the DiT's blocks and the VAE replayed from CUDA
    graphs or all eager; on CUDA, checks over 30+ frames that the graphs were (or were not) used."""
    stage = engine.core.stage  # the engine core's DiT blocks and the sessions' graph state
    default_graphs = stage.use_graphs
    graphs = graphs and engine.device.type == "cuda"  # CUDA graphs exist on CUDA only
    stage.use_graphs = graphs
    vae_default = [(m, m.use_graphs) for m in _vae_modules(engine)]
    for m, _ in vae_default:
        m.use_graphs = graphs
    prime_replays, replays = stage.prime_replays, stage.replays
    try:
        s = engine.open_session("a watercolor painting", StreamParams(seed=5))
        out = s.push(video, list(range(len(video))))
        out += s.flush()  # every decoded frame (pushes return before their last chunks are on the host)
        graph = stage.sessions[s.sid].graph
        captured = graph is not None and graph.graph is not None  # the steady forward's blocks
        primed_from_graph = stage.prime_replays > prime_replays  # the first chunk's forwards (captured at frame 0)
        replayed = stage.replays - replays
        enc_state = engine.core.drivers[s.sid][0].vae_state  # the encoder's stream state (the session's schedule)
        dec_state = stage.sessions[s.sid].decode_state  # the decoder's (the last stage's, here rank 0's)
        vae_replays = [getattr(getattr(st, name, None), "replays", 0)
                       for st, name in ((enc_state, "enc_graph"), (dec_state, "dec_graph"))]
        s.close()
    finally:
        stage.use_graphs = default_graphs
        for m, on in vae_default:
            m.use_graphs = on
    log.info("graphs=%s: steady DiT graph captured %s, first chunk from its graph %s, DiT replays %d, "
             "VAE encode/decode graph replays %s", graphs, captured, primed_from_graph, replayed, vae_replays)
    if len(video) >= 30 and engine.device.type == "cuda":
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
    ap.add_argument("--device", default="cuda",
                    help="one device; off CUDA (e.g. cpu with --model tiny) there are no graphs or Triton: a dry run of the script")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = StreamEngine.create(EngineOptions(model=args.model, device=args.device, height=args.height, width=args.width,
                                               steps=args.steps))
    if not isinstance(engine, StreamEngine):
        raise SystemExit(f"--device {args.device}: one device only (this compares the in-process engine's paths)")
    have_triton, cudnn = kernels._HAVE_TRITON, attention.prefer_cudnn
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
    kernels._HAVE_TRITON, attention.prefer_cudnn = have_triton, cudnn
    d = np.abs(slow - graphed)
    rel = float(np.linalg.norm(slow - graphed) / np.linalg.norm(slow - 127.5))
    print(f"All fast paths vs all plain paths (graph, Triton, {attention.backend_name(engine.device)} vs eager, torch, "
          f"SDPA default): {len(slow)} frames, mean |diff| {d.mean():.3f}, p99 {np.percentile(d, 99):.1f} "
          f"(uint8 levels), relative {rel:.2e}")
    kernels._HAVE_TRITON = False  # everything in plain torch (VAE norm included)
    plain = stream(engine, video[:9], graphs=False)
    kernels._HAVE_TRITON = have_triton
    fused = stream(engine, video[:9], graphs=False)
    d = np.abs(plain - fused)
    print(f"Fused Triton kernels vs plain torch (DiT + VAE), first 9 frames: mean |diff| {d.mean():.3f}, "
          f"p99 {np.percentile(d, 99):.1f} (uint8 levels)")

    v = torch.from_numpy(video[:9]).to(engine.device).permute(3, 0, 1, 2)[None].to(engine.dtype) / 127.5 - 1
    outs = {}
    for fused in (True, False):
        kernels._HAVE_TRITON = fused and have_triton
        st = engine.vae.new_stream_state()
        z = torch.cat([engine.vae.stream_encode(v[:, :, :5], st), engine.vae.stream_encode(v[:, :, 5:9], st)], 2)
        x = torch.cat([engine.vae.stream_decode(z[:, :, :2], st), engine.vae.stream_decode(z[:, :, 2:], st)], 2)
        outs[fused] = (z.float(), x.float())
    kernels._HAVE_TRITON = have_triton
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
    xin = torch.randn(2, 1560, blk.ffn[0].in_features, device=engine.device, dtype=engine.dtype)
    with torch.no_grad():
        fused, plain = blk._ffn(xin).float(), blk.ffn(xin).float()
        fc1 = blk.ffn[0]
        erf = blk.ffn[2](torch.nn.functional.gelu(fc1(xin))).float()
    print(f"DiT FFN with the GELU epilogue vs the module: relative error {float((fused - plain).norm() / plain.norm()):.2e} "
          f"(vs an erf GELU: {float((fused - erf).norm() / erf.norm()):.2e})")


if __name__ == "__main__":
    main()
