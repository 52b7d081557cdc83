"""`make bench`: ours and the reference package side by side on this GPU, random weights at real shapes.

For each row (P1 1.3B 480×832 2 steps, P2 1.3B 512² 1 step, P3 14B 512² 1 step; with two GPUs also P4 = P1
and P5 = P3 on both, through the pipeline-parallel engine, ours only):
1. random-weight trees in the real file layouts are written once (bench/reference_files.py);
2. ours runs in its own process (bench/engine_bench.py), then the reference in its own process through
   its own entry points and loader (bench/reference_bench.py), on the same card;
3. a table is printed last (fps, ratio ours/reference, TTFF, per-stage ms, MFU, peak memory) and a
   Markdown section with card, date, versions and command is appended to --md (--md none: not appended).

    python -m bench                                   # all rows, files under /dev/shm/streamgen-ref
    python -m bench --rows p1 --no-reference          # ours only
    python -m bench --root-14b /data/ref              # the 14B tree (57 GB) somewhere with room
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from bench.measure import run_meta
from bench.rows import MULTI_GPU_ROWS, PAPER_FPS, ROWS

log = logging.getLogger("bench")


def _run(cmd: list[str], timeout: float, log_path: Path) -> bool:
    log.info("$ %s", " ".join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "a") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.error("timed out after %.0f s: %s", timeout, " ".join(cmd))
            return False
    log.info("  exit %d after %.0f s", rc, time.perf_counter() - t0)
    return rc == 0


def _free_gb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 1e9


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(results: dict, meta: dict, command: str) -> str:
    lines = [
        f"- Card: {meta['gpu']} (driver {meta.get('driver')}), {meta['date']}",
        f"- Software: torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, Python {meta['python']}",
        f"- Command: `{command}`",
        "",
        "| row | impl | fps | ours/ref | TTFF s | VAE enc ms | DiT ms | VAE dec ms | MFU enc/DiT/dec | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, by in results.items():
        ref = by.get("reference")
        for impl in ("ours", "reference"):
            r = by.get(impl)
            if r is None:
                lines.append(f"| {row.upper()} | {impl} | not run | | | | | | | |")
                continue
            ratio = f"{r['fps'] / ref['fps']:.2f}×" if impl == "ours" and ref else ""
            m = "/".join(_fmt(r.get(f"{s}_mfu") and 100 * r[f"{s}_mfu"], ".0f") for s in ("vae_encode", "dit", "vae_decode"))
            lines.append(
                f"| {row.upper()} | {impl} | {r['fps']:.2f} | {ratio} | {r['ttff_s']:.3f} | {_fmt(r['vae_encode_ms'], '.1f')} | "
                f"{_fmt(r['dit_ms'], '.1f')} | {_fmt(r['vae_decode_ms'], '.1f')} | {m} % | {r['peak_gib']:.1f} |"
            )
    ceilings = sorted({round(r["ceiling_tflops"]) for by in results.values() for r in by.values() if r})
    lines += ["", f"bf16 matmul ceiling measured in the run: {', '.join(map(str, ceilings))} TFLOP/s. "
              f"Paper fps (H100; P4, P5: two): " + ", ".join(f"{k.upper()} {PAPER_FPS[k]}" for k in results if k in PAPER_FPS) + "."]
    if any(row in MULTI_GPU_ROWS for row in results):
        lines += [f"{', '.join(r.upper() for r in results if r in MULTI_GPU_ROWS)}: two GPUs, the pipeline-parallel "
                  "engine; the reference was not run on two GPUs (this bench drives its one-GPU entry point only)."]
    lines += [f"{row.upper()} {'ours' if impl == 'ours' else 'reference'}: {r['note']}."
              for row, by in results.items() for impl, r in by.items() if r and r.get("note")]
    return "\n".join(lines)


def default_rows() -> list[str]:
    import torch

    return ["p1", "p2", "p3"] + (list(MULTI_GPU_ROWS) if torch.cuda.device_count() >= 2 else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="default: p1,p2,p3, and p4,p5 (two GPUs) where there are two")
    ap.add_argument("--root", type=Path, default=Path("/dev/shm/streamgen-ref"), help="random-weight trees")
    ap.add_argument("--root-14b", type=Path, default=None, help="the 14B tree (default --root; it needs ~57 GB)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--ours-from-files", default="p1", help="rows where ours loads the written tree (the real loader)")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="JSON and logs per row")
    ap.add_argument("--md", default="docs/BENCHMARKS.md", help="append the Markdown table here ('' or none: don't)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = args.rows.split(",") if args.rows else default_rows()
    root14 = args.root_14b or args.root
    logf = args.out / "bench.log"
    results: dict = {r: {} for r in rows}

    for row in rows:
        spec = ROWS[row]
        root = root14 if spec["model"] == "wan-14b" else args.root
        # the reference runs on one GPU here (its own multi-GPU launcher is not driven by this bench)
        reference = not args.no_reference and row not in MULTI_GPU_ROWS
        files = reference or row in args.ours_from_files.split(",")
        if files:
            need = [spec["model"]] + (["wan-1.3b"] if spec["model"] == "wan-14b" else [])  # see below
            for m in need:
                r = args.root if m == "wan-1.3b" else root
                log.info("%s: writing %s under %s (%.0f GB free)", row, m, r, _free_gb(r))
                if not _run([py, "-m", "bench.reference_files", "--root", str(r), "--models", m,
                             "--shared", str(args.root / "shared")], args.timeout, logf):
                    files = False
            if spec["model"] == "wan-14b" and root != args.root:
                # the reference's DiT wrapper first builds the 1.3B base model whatever the model type
                link = root / "wan_models" / "Wan2.1-T2V-1.3B"
                if not link.exists():
                    link.symlink_to(args.root / "wan_models" / "Wan2.1-T2V-1.3B")
        ours = args.out / f"ours_{row}.json"
        cmd = [py, "-m", "bench.engine_bench", "--rows", row, "--chunks", str(args.chunks), "--warmup",
               str(args.warmup), "--json", str(ours)]
        if files and row in args.ours_from_files.split(","):
            cmd += ["--weights", str(root / "wan_models")]
        if _run(cmd, args.timeout, logf):
            results[row]["ours"] = json.loads(ours.read_text())["results"][0]
        if files and reference:
            ref = args.out / f"reference_{row}.json"
            if _run([py, "-m", "bench.reference_bench", "--row", row, "--root", str(root), "--chunks", str(args.chunks),
                     "--warmup", str(args.warmup), "--json", str(ref)], args.timeout, logf):
                results[row]["reference"] = json.loads(ref.read_text())
        by = results[row]
        log.info("%s: ours %s fps, reference %s fps", row, by.get("ours", {}).get("fps"), by.get("reference", {}).get("fps"))

    meta = run_meta()
    command = "python -m bench " + " ".join(sys.argv[1:])
    md = table(results, meta, command)
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    if args.md.strip().lower() not in ("", "none"):
        with open(args.md, "a") as f:
            f.write(f"\n## Side by side with the reference package, {meta['date']}, {meta['gpu']}\n\n{md}\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
