"""Aggregate throughput of N sessions on one engine: each session a synthetic camera, 4-frame chunks
pushed round-robin across the sessions as fast as the engine takes them, after every session has
warmed up to its steady state (full KV window).

    python -m bench.sessions_bench --sessions 1,2,3,4 --json out.json        # P2: wan-1.3b 512x512, 1 step
    python -m bench.sessions_bench --model tiny --size 64 --device cpu --sessions 1,2 --chunks 4   # smoke

Only the engine's public API is used (StreamEngine.create, open_session, push, take_finished, flush,
close), and from bench/ only what older trees have too (bench.measure, bench.rows), so that this very
file measures an older checkout of the repository for a before/after comparison (bench/ab.sh).

Per N: the timed window starts once every session's warm-up chunks are flushed out and ends when the
timed chunks of every session have come back (their last ones through flush()); aggregate fps = output
frames of the window / its length, per-session fps = one session's frames / the same length.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from bench.measure import run_meta, synthetic_video
from bench.rows import PROMPT, ROWS, steady_warmup
from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench.sessions")

CHUNK = 4  # input frames per push after a stream's first 5


def run_sessions(engine: Any, n: int, chunks: int, warmup: int) -> dict:
    """N sessions through `warmup` chunks each (flushed), then `chunks` timed chunks each, round-robin."""
    h, w = engine.info.height, engine.info.width
    total = 5 + CHUNK * (warmup + chunks)
    videos = [synthetic_video(total, h, w, seed=k) for k in range(n)]
    sessions = [engine.open_session(f"{PROMPT} #{k}") for k in range(n)]
    try:
        for s, v in zip(sessions, videos):  # each stream's first chunk (frame 0 + 4), not timed
            s.push(v[:5], list(range(5)))
        for i in range(warmup):
            a = 5 + CHUNK * i
            for s, v in zip(sessions, videos):
                s.push(v[a : a + CHUNK], list(range(a, a + CHUNK)))
        for s in sessions:
            s.flush()  # nothing of the warm-up left in flight
        got = [0] * n
        before = _forwards_by_batch(engine)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + chunks):
            a = 5 + CHUNK * i
            for k, (s, v) in enumerate(zip(sessions, videos)):
                got[k] += len(s.push(v[a : a + CHUNK], list(range(a, a + CHUNK))))
            for k, s in enumerate(sessions):  # frames that finished between pushes
                got[k] += len(s.take_finished())
        for k, s in enumerate(sessions):
            got[k] += len(s.flush())
        elapsed = time.perf_counter() - t0
        after = _forwards_by_batch(engine)
    finally:
        for s in sessions:
            s.close()
    want = CHUNK * chunks
    if any(g != want for g in got):
        raise RuntimeError(f"{n} sessions: frames out per session {got}, {want} pushed each")
    per = [g / elapsed for g in got]
    batches = {b: c - before.get(b, 0) for b, c in after.items() if c > before.get(b, 0)}
    return dict(sessions=n, chunks=chunks, warmup=warmup, frames=sum(got), elapsed_s=elapsed,
                aggregate_fps=sum(got) / elapsed, per_session_fps=per, min_session_fps=min(per),
                forwards_by_batch=batches)


def _forwards_by_batch(engine: Any) -> dict[int, int]:
    """The core's steady forwards so far by sessions carried ({} where the engine does not report them)."""
    stats = engine.stats() if callable(getattr(engine, "stats", None)) else {}
    forwards = (stats.get("batch") or {}).get("forwards") or {}
    return {int(b): int(c) for b, c in forwards.items()}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="p2", choices=sorted(ROWS), help="model, size and steps of this benchmark row")
    ap.add_argument("--sessions", default="1,2,3,4", help="comma-separated session counts")
    ap.add_argument("--chunks", type=int, default=30, help="timed chunks per session")
    ap.add_argument("--warmup", type=int, default=6, help="warm-up chunks per session (at least the KV window + 2)")
    ap.add_argument("--device", default="cuda", help="one device (cpu with --model tiny: a smoke run)")
    ap.add_argument("--model", default=None, help="replace the row's model (tiny: a CPU smoke run)")
    ap.add_argument("--size", type=int, default=None, help="square frames of this size instead of the row's")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps instead of the row's")
    ap.add_argument("--dtype", default=None, help="the engine's dtype (default: its own, bf16 on a GPU)")
    ap.add_argument("--weights", type=Path, default=None, help="load this weights tree instead of random init")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.sessions.split(",")]
    except ValueError:
        ap.error(f"--sessions: comma-separated counts, got {args.sessions!r}")
    if not counts or min(counts) < 1 or args.chunks < 1 or args.warmup < 0:
        ap.error("--sessions counts and --chunks must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = {k: v for k, v in ROWS[args.row].items() if k in ("model", "height", "width", "steps")}
    if args.model:
        spec["model"] = args.model
    if args.size:
        spec.update(height=args.size, width=args.size)
    if args.steps:
        spec["steps"] = args.steps
    if args.dtype:
        spec["dtype"] = args.dtype
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    engine = StreamEngine.create(EngineOptions(device=args.device, weights=args.weights, **spec))
    warmup = steady_warmup(args.warmup, spec["model"])
    info = engine.info
    row = dict(row=args.row, model=info.model, size=f"{info.height}x{info.width}", steps=info.steps,
               dtype=getattr(info, "dtype", None) or "", device=args.device,
               weights=f"loaded from {args.weights}" if args.weights else "random init")
    results = []
    try:
        for n in counts:
            r = {**row, **run_sessions(engine, n, args.chunks, warmup)}
            log.info("%d session(s): %.2f fps in all, per session %s", n, r["aggregate_fps"],
                     ", ".join(f"{x:.2f}" for x in r["per_session_fps"]))
            results.append(r)
    finally:
        engine.close()
    meta = run_meta()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"\n{meta}")
    print(f"{row['row']} {row['model']} {row['size']} {row['steps']} step(s) {row['dtype']} on {args.device}, "
          f"{args.chunks} timed chunks per session after {warmup} warm-up")
    print(f"{'N':>3} {'agg fps':>8} {'per session fps (min / mean)':>29} {'window s':>9}  forwards by batch size")
    for r in results:
        per = r["per_session_fps"]
        print(f"{r['sessions']:>3} {r['aggregate_fps']:8.2f} {min(per):14.2f} / {sum(per) / len(per):12.2f} "
              f"{r['elapsed_s']:9.2f}  {r['forwards_by_batch']}")


if __name__ == "__main__":
    main()
