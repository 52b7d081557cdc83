"""Offline CLI:

    python -m engine render --input IN --output OUT.mp4|OUT.npz --prompt TEXT [--model tiny|wan-1.3b|wan-14b]
        [--weights DIR] [--steps N] [--height H --width W] [--devices SPEC] [--seed S]
        [--decoder wan|taehv|lightvae] [--encoder wan|taehv|lightvae] [--taehv-weights taew2_1.pth]
        [--lightvae-weights lightvaew2_1.pth]

--devices: one device (auto, cpu, cuda, cuda:N = GPU N), or pipeline-parallel ranks: cpu:N (N CPU
ranks), cuda:0,1 (those GPUs, in ring order), cuda*N (the first N GPUs), torchrun (ranks started by
torchrun, possibly over several nodes; every process runs the same command). See docs/PARALLEL.md.

--decoder taehv|lightvae / --encoder taehv|lightvae: decode latents / encode the input with a light network
(far less compute, lower fidelity) instead of the Wan VAE, each chosen on its own; with --weights, TAEHV needs
--taehv-weights (taew2_1.pth from the TAEHV project) and LightVAE --lightvae-weights (lightvaew2_1.pth).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.config import DECODERS, ENCODERS, ConfigError, decoder_problem, model_names

log = logging.getLogger("engine.render")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _serving_rank(devices: str) -> bool:
    """Under torchrun, every process but RANK 0 is a serving rank (RANK 0 reads and writes the video)."""
    return devices.strip().lower() == "torchrun" and os.environ.get("RANK", "0") != "0"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog="python -m engine")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="restyle a video file offline")
    r.error = ap.error  # type: ignore[method-assign]
    r.add_argument("--input", required=True, type=Path)
    r.add_argument("--output", required=True, type=Path)
    r.add_argument("--prompt", required=True)
    r.add_argument("--model", default="tiny")
    r.add_argument("--weights", type=Path)
    r.add_argument("--steps", type=int)
    r.add_argument("--height", type=int)
    r.add_argument("--width", type=int)
    r.add_argument("--devices", default="auto", help="auto, cpu, cuda, cuda:N, cpu:N, cuda:0,1, cuda*N, torchrun")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--decoder", choices=DECODERS, default="wan",
                   help="wan: the Wan VAE decoder; taehv or lightvae: a light decoder (far less compute, lower fidelity)")
    r.add_argument("--encoder", choices=ENCODERS, default="wan",
                   help="wan: the Wan VAE encoder; taehv or lightvae: a light encoder (far less compute, lower fidelity)")
    r.add_argument("--taehv-weights", type=Path,
                   help="taew2_1.pth from the TAEHV project, for --decoder taehv or --encoder taehv")
    r.add_argument("--lightvae-weights", type=Path,
                   help="lightvaew2_1.pth (LightX2V's pruned Wan VAE), for --decoder lightvae or --encoder lightvae")
    r.add_argument("--step-lag", type=int, default=1,
                   help="forwards between a chunk's denoising steps; with several steps on N ranks, N keeps "
                        "every rank busy (frames equal any engine with the same value)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if _serving_rank(args.devices):
        return args  # a serving rank: RANK 0 reads the input and writes the output
    if not args.input.is_file():
        ap.error(f"--input {args.input}: no such file")
    if args.output.suffix not in (".mp4", ".npz"):
        ap.error(f"--output {args.output}: use a .mp4 or .npz file name")
    if not args.output.parent.is_dir():
        ap.error(f"--output {args.output}: folder {args.output.parent} does not exist")
    if args.model not in model_names() and not args.model.endswith((".yaml", ".yml")):
        ap.error(f"--model {args.model}: unknown, choose one of {', '.join(model_names())}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 16):
            ap.error(f"--{name} {v}: must be a positive multiple of 16")
    if (args.height is None) != (args.width is None):
        ap.error("--height and --width go together")
    if args.steps is not None and not 1 <= args.steps <= 4:
        ap.error(f"--steps {args.steps}: must be 1..4")
    if args.weights is not None and not args.weights.is_dir():
        ap.error(f"--weights {args.weights}: no such folder")
    problem = decoder_problem(args.decoder, args.taehv_weights, args.weights, cli=True, check_file=True,
                              encoder=args.encoder, lightvae_weights=args.lightvae_weights)
    if problem:
        ap.error(problem)
    from engine.parallel.devices import parse_devices

    try:
        parse_devices(args.devices)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from engine.checkpoint import CheckpointError
    from engine.parallel.errors import EngineFailure
    from engine.render import render

    if _serving_rank(args.devices):
        from engine.render import serve_rank

        serve_rank(args)  # this process is one rank; RANK 0 reads and writes the video
        return 0
    try:
        n = render(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, EngineFailure) as exc:
        print(f"python -m engine: error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %d frames to %s", n, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
