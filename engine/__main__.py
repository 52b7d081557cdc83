"""Offline CLI:

    python -m engine fetch wan-1.3b|wan-14b|taehv|lightvae --to DIR [--dry-run]

downloads a model's published files from the Hugging Face Hub into the layout `--weights DIR` reads
(engine/fetch.py), then checks them with the strict loaders;

    python -m engine render --input IN --output OUT.mp4|OUT.npz --prompt TEXT [--model tiny|wan-1.3b|wan-14b]
        [--weights DIR] [--steps N] [--height H --width W] [--devices SPEC] [--seed S]
        [--decoder wan|taehv|lightvae] [--encoder wan|taehv|lightvae] [--taehv-weights taew2_1.pth]
        [--lightvae-weights lightvaew2_1.pth] [--output-size input|model] [--dtype float32|bfloat16|float16|fp8]

--devices: one device (auto, cpu, cuda, cuda:N = GPU N), or pipeline-parallel ranks: cpu:N (N CPU
ranks), cuda:0,1 (those GPUs, in ring order), cuda*N (the first N GPUs), torchrun (ranks started by
torchrun, possibly over several nodes; every process runs the same command). See docs/PARALLEL.md.

--decoder taehv|lightvae / --encoder taehv|lightvae: decode latents / encode the input with a light network
(far less compute, lower fidelity) instead of the Wan VAE, each chosen on its own; with --weights, TAEHV needs
--taehv-weights (taew2_1.pth from the TAEHV project) and LightVAE --lightvae-weights (lightvaew2_1.pth).

--output-size input (default): the model sees a centre crop of each frame at its size, and its output
is scaled back to the input's size, as the server answers at the camera's; model: as generated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.video_io import OUTPUT_SIZES, probe
from interface.catalogue import DECODERS, DTYPES, ENCODERS, KV_POLICIES, ConfigError, decoder_problem, model_names

log = logging.getLogger("engine.render")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _serving_rank(devices: str) -> bool:
    """Under torchrun, every process but RANK 0 is a serving rank (RANK 0 reads and writes the video)."""
    return devices.strip().lower() == "torchrun" and os.environ.get("RANK", "0") != "0"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m engine")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="restyle a video file offline")
    r.error = ap.error  # type: ignore[method-assign]
    r.add_argument("--input", required=True, type=Path, help="a video file FFmpeg can read (its first video stream)")
    r.add_argument("--output", required=True, type=Path,
                   help="OUT.mp4 (H.264) or OUT.npz (raw uint8 frames under key 'frames', [T, H, W, 3])")
    r.add_argument("--prompt", required=True, help="what the video becomes, e.g. 'a watercolor painting'")
    r.add_argument("--model", default="tiny",
                   help=f"{', '.join(model_names())} or a model YAML (default tiny: random weights, for trying the wiring)")
    r.add_argument("--weights", type=Path, help="folder holding Wan2.1-T2V-*/ and wan_causal_dmd_v2v*/ (none: random weights)")
    r.add_argument("--steps", type=int, help="denoising steps, 1..4 (default: the model's)")
    r.add_argument("--height", type=int, help="model height, a multiple of 16 (with --width; default: the model's)")
    r.add_argument("--width", type=int, help="model width, a multiple of 16 (with --height; default: the model's)")
    r.add_argument("--output-size", choices=OUTPUT_SIZES, default="input",
                   help="input (default): the output scaled back to the input's size, as the server answers at the "
                        "camera's size; model: as generated (a centre crop of the input at the model's size)")
    r.add_argument("--devices", default="auto",
                   help="auto (default), cpu, cuda, cuda:N, or pipeline-parallel ranks: cpu:N, cuda:0,1, cuda*N, "
                        "torchrun (docs/PARALLEL.md)")
    r.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
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
    r.add_argument("--kv-policy", choices=KV_POLICIES,
                   help="ours (the model config's default) or reference: the reference package's KV cache eviction, "
                        "sink checks, first-chunk timestep and RoPE wrap, exactly (README 'Where we differ')")
    r.add_argument("--dtype", choices=DTYPES,
                   help="number format (default: bfloat16 on a GPU, float32 on CPU); fp8: the DiT blocks' linear layers "
                        "as FP8 matmuls, on GPUs with FP8 tensor cores (Ada/Hopper) only (README 'FP8 (Hopper/Ada)')")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    f = sub.add_parser("fetch", help="download a model's weights from the Hugging Face Hub into the --weights layout")
    f.error = ap.error  # type: ignore[method-assign]
    f.add_argument("model", metavar="MODEL",
                   help="wan-1.3b, wan-14b (with their StreamDiffusionV2 checkpoints), taehv (taew2_1.pth), lightvae (lightvaew2_1.pth), "
                        "or a model config .yaml with a hub section")
    f.add_argument("--to", required=True, type=Path, metavar="DIR",
                   help="the weights folder to fill (created if missing); pass it to the server as --weights DIR")
    f.add_argument("--dry-run", action="store_true", help="list the files and the size to fetch, download nothing")
    return ap


def parse(argv: list[str]) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "fetch":
        from engine.fetch import fetchable

        if args.model not in fetchable() and not args.model.endswith((".yaml", ".yml")):
            why = "has no published weights" if args.model in model_names() else "unknown"
            ap.error(f"fetch {args.model}: {why}, choose one of {', '.join(fetchable())}")
        if args.to.exists() and not args.to.is_dir():
            ap.error(f"--to {args.to}: not a folder")
        return args
    if _serving_rank(args.devices):
        return args  # a serving rank: RANK 0 reads the input and writes the output
    if args.input.is_dir():
        ap.error(f"--input {args.input}: is a folder; give a video file")
    if not args.input.exists():
        ap.error(f"--input {args.input}: no such file")
    try:
        probe(args.input)  # before the model loads: a file that is not a video is a one-line error
    except (ValueError, OSError) as exc:
        ap.error(f"--input {exc}")
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
    if args.command == "fetch":
        return _fetch(args)
    from engine.checkpoint import CheckpointError
    from engine.errors import EngineFailure
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


def _fetch(args: argparse.Namespace) -> int:
    from engine.fetch import FetchError, fetch

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per HTTP request
    try:
        fetch(args.model, args.to, dry_run=args.dry_run)
    except FetchError as exc:
        print(f"python -m engine fetch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m engine fetch: interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
