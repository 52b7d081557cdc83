"""What FP8 costs in quality (`dtype: fp8`, README "FP8 (Hopper/Ada)"), next to what bf16 already costs,
for the benchmark rows (bench/rows.py) with random weights at the real shapes:

1. per layer: the output error (relative Frobenius norm) of each block linear in bf16 and in FP8 against
   float32, on the inputs those layers really get in a one-block forward of the row's shapes;
2. end to end: the same input clip streamed for `--chunks` chunks by one engine whose weights are cast
   float32 -> bf16 -> bf16 with FP8 block linears (engine.fp8.convert_blocks, the swap `dtype: fp8` makes at
   load), so the three runs hold the same weights; the frame PSNR of bf16 against float32 and of FP8
   against bf16 and against float32.

It prints a table and exits 1 when FP8's PSNR against bf16 falls under `--floor-db` on any row.

    python -m bench.fp8_quality --rows p1,p2,p3                # on a GPU (P3 holds the 14B in float32)
    python -m bench.fp8_quality --rows p2 --model tiny --device cpu --chunks 6   # the script on CPU
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bench.measure import synthetic_video
from bench.rows import PROMPT, ROWS
from engine.config import load_model_config
from engine.dit import WanDiT
from engine.fp8 import BLOCK_LINEARS, FP8Linear, convert_blocks
from engine.rope import Rope
from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench.fp8_quality")
DEFAULT_FLOOR_DB = 20.0  # a first guard against a broken FP8 path; to be set from the first GPU run's table


@dataclass
class RowQuality:
    row: str
    model: str
    size: str
    layer_err: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (bf16, fp8) vs float32
    psnr_bf16_f32: float = 0.0
    psnr_fp8_bf16: float = 0.0
    psnr_fp8_f32: float = 0.0
    min_chunk_psnr_fp8_bf16: float = 0.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@torch.no_grad()
def layer_errors(model: str, height: int, width: int, device: torch.device, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Each block linear's output error in bf16 and in FP8 against float32, on the inputs it gets in a
    block-causal forward of one block at the row's shapes (a first chunk: two latent frames)."""
    cfg = load_model_config(model).dit.model_copy(update={"num_layers": 1})
    torch.manual_seed(seed)
    with device:
        dit = WanDiT(cfg).eval()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [dit.blocks[0].get_submodule(n).register_forward_hook(
        lambda _m, args, _out, n=n: inputs.__setitem__(n, args[0].detach())) for n in BLOCK_LINEARS]
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, height // 8, width // 8, generator=g, device=device)
    ctx = 0.1 * torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device)
    t = torch.tensor([[700, 700]], device=device)
    dit.forward_block_causal(x, t, ctx, [2], Rope(cfg.head_dim, device))
    for h in hooks:
        h.remove()
    out = {}
    for name in BLOCK_LINEARS:
        lin, xin = dit.blocks[0].get_submodule(name), inputs[name]
        ref = lin(xin)
        lin16 = torch.nn.Linear(lin.in_features, lin.out_features, device=device, dtype=torch.bfloat16)
        lin16.load_state_dict(lin.state_dict())
        out[name] = (_rel(lin16(xin.bfloat16()), ref), _rel(FP8Linear.from_linear(lin16)(xin.bfloat16()), ref))
    return out


def _stream(engine: StreamEngine, video: np.ndarray, chunks: int) -> np.ndarray:
    """The frames of one session over `chunks` chunks (the first 5 frames, then 4 a chunk), uint8."""
    s = engine.open_session(PROMPT)
    frames = []
    n = 5 + 4 * (chunks - 1)
    for a, b in [(0, 5)] + [(5 + 4 * i, 9 + 4 * i) for i in range(chunks - 1)]:
        frames += [f for f, _ in s.push(video[a:b], list(range(a, b)))]
    frames += [f for f, _ in s.flush()]
    s.close()
    if len(frames) != n:
        raise RuntimeError(f"expected {n} frames, got {len(frames)}")
    return np.stack(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _to_bf16(engine: StreamEngine) -> None:
    """The engine's float32 modules cast to bf16 in place (the same weights, rounded)."""
    for module in (engine.dit, engine.vae, getattr(engine.text, "encoder", None), engine.encoder, engine.decoder):
        if isinstance(module, torch.nn.Module):
            module.to(torch.bfloat16)
    # what the engine's core computes in: the schedule's noise and latents, the stage's caches, the re-noising
    engine.core.dtype = engine.core.stage.dtype = engine.core.renoise_source.dtype = torch.bfloat16


@torch.no_grad()
def end_to_end(model: str, height: int, width: int, steps: int, device: str, chunks: int, seed: int = 0
               ) -> tuple[float, float, float, float]:
    engine = StreamEngine(load_model_config(model), EngineOptions(
        model=model, height=height, width=width, steps=steps, device=device, dtype="float32", seed=seed))
    video = synthetic_video(5 + 4 * chunks, engine.info.height, engine.info.width)
    f32 = _stream(engine, video, chunks)
    _to_bf16(engine)
    bf16 = _stream(engine, video, chunks)
    convert_blocks(engine.dit, range(len(engine.dit.blocks)))
    fp8 = _stream(engine, video, chunks)
    per_chunk = [psnr(fp8[a:b], bf16[a:b]) for a, b in [(0, 5)] + [(5 + 4 * i, 9 + 4 * i) for i in range(chunks - 1)]]
    return psnr(bf16, f32), psnr(fp8, bf16), psnr(fp8, f32), min(per_chunk)


def run_row(name: str, device: str, chunks: int, model: Optional[str], size: Optional[int]) -> RowQuality:
    spec = ROWS[name]
    model = model or spec["model"]
    height, width = (size, size) if size else (spec["height"], spec["width"])
    q = RowQuality(row=name, model=model, size=f"{height}x{width}")
    q.layer_err = layer_errors(model, height, width, torch.device(device))
    q.psnr_bf16_f32, q.psnr_fp8_bf16, q.psnr_fp8_f32, q.min_chunk_psnr_fp8_bf16 = end_to_end(
        model, height, width, spec["steps"], device, chunks)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return q


def report(results: list[RowQuality]) -> str:
    lines = ["per-layer output error against float32 (relative Frobenius norm), bf16 / fp8:"]
    names = list(BLOCK_LINEARS)
    lines.append(f"{'layer':14} " + " ".join(f"{r.row + ' ' + r.model:>22}" for r in results))
    for n in names:
        lines.append(f"{n:14} " + " ".join(f"{r.layer_err[n][0]:10.4f} / {r.layer_err[n][1]:9.4f}" for r in results))
    lines.append("")
    lines.append(f"{'row':5} {'model':9} {'size':8} {'PSNR bf16|f32':>14} {'PSNR fp8|bf16':>14} {'PSNR fp8|f32':>13} "
                 f"{'min chunk fp8|bf16':>19}")
    for r in results:
        lines.append(f"{r.row:5} {r.model:9} {r.size:8} {r.psnr_bf16_f32:14.2f} {r.psnr_fp8_bf16:14.2f} "
                     f"{r.psnr_fp8_f32:13.2f} {r.min_chunk_psnr_fp8_bf16:19.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp8_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="p1,p2,p3", help="rows of bench/rows.py (default p1,p2,p3)")
    ap.add_argument("--chunks", type=int, default=30, help="chunks streamed per precision (default 30)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --model tiny)")
    ap.add_argument("--model", default=None, help="replace the rows' model (tiny: the script on CPU)")
    ap.add_argument("--size", type=int, default=None, help="square frames of this size instead of the row's")
    ap.add_argument("--floor-db", type=float, default=DEFAULT_FLOOR_DB,
                    help=f"exit 1 when FP8's frame PSNR against bf16 is under this on any row (default {DEFAULT_FLOOR_DB:g})")
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.chunks < 2:
        ap.error("--chunks must be at least 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = [run_row(r, args.device, args.chunks, args.model, args.size) for r in rows]
    print(report(results))
    low = [r.row for r in results if r.psnr_fp8_bf16 < args.floor_db]
    if low:
        print(f"FP8 frame PSNR against bf16 under the floor of {args.floor_db:g} dB on: {', '.join(low)}")
        return 1
    print(f"FP8 frame PSNR against bf16 at or above the floor of {args.floor_db:g} dB on every row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
