"""The pipeline-parallel engine against one GPU, random weights at real shapes (docs/PARALLEL.md, docs/ARCHITECTURE.md §9).

For each row (default: 1.3B 480x832 2 steps, 14B 512x512 1 step):
1. one GPU, the in-process engine: a warm-up session, then the frames of a short clip (for agreement)
   and the end-to-end FPS of one stream;
2. N GPUs, the parallel engine (ranks spawned on --devices): the same clip (agreement with 1 GPU within
   bf16 tolerance: mean/max abs difference of the uint8 frames, PSNR), the time of one hop for a
   forward's payload, FPS of one stream with the initial even split and the block scheduler off
   ("before"), then with the scheduler on until it settles ("after"), each rank's stage time (DiT and
   the rest of its share: VAE, embedding, head) before and after, and the throughput of several
   sessions sharing the pipeline.
A short table is printed last; --json writes everything (with the card, date and versions).

    python bench/parallel_bench.py --devices cuda:0,1 --json parallel.json          # 2 GPUs, ~5 min
    python bench/parallel_bench.py --model tiny --devices cpu:2 --single cpu --height 64 --width 64 \\
        --chunks 6 --warmup 2 --json /tmp/p.json                                    # CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

import torch  # noqa: E402

from bench.measure import synthetic_video  # noqa: E402
from bench.rows import PROMPT, ROWS  # noqa: E402
from engine.parallel.devices import parse_devices  # noqa: E402
from engine.runtime import EngineOptions, StreamEngine  # noqa: E402

log = logging.getLogger("bench.parallel")


@dataclass
class RowResult:
    row: str
    model: str
    size: str
    steps: int
    devices: str
    step_lag: int = 1
    stream_overlap: int = 0  # most forwards of the stream in flight at once (parallel engine)
    fps_1: float = 0.0
    fps_n_before: float = 0.0
    fps_n_after: float = 0.0
    fps_n_sessions: float = 0.0
    sessions: int = 0
    hop_ms: Optional[float] = None
    payload_mb: float = 0.0
    agree_frames: int = 0
    agree_mean_abs: float = 0.0
    agree_max_abs: int = 0
    agree_psnr_db: Optional[float] = None
    agree_ok: bool = False
    split_before: list = field(default_factory=list)
    split_after: list = field(default_factory=list)
    stage_ms_before: Any = None
    stage_ms_after: Any = None
    moves: list = field(default_factory=list)
    batch: Any = None
    graphs: Any = None  # per rank: forwards whose blocks replayed a CUDA graph, and eager ones
    start_s_1: float = 0.0
    start_s_n: float = 0.0
    peak_gib_1: Optional[float] = None


def clip(engine: Any, video: np.ndarray) -> list[np.ndarray]:
    s = engine.open_session(PROMPT, None)
    out = s.push(video, list(range(len(video)))) + s.flush()
    s.close()
    return [f for f, _ in sorted(out, key=lambda o: o[1])]


def stream_fps(engine: Any, video: np.ndarray, warmup: int, chunks: int, prompt: str = PROMPT) -> float:
    """Output frames per second of one stream over `chunks` 4-frame chunks after `warmup` chunks."""
    s = engine.open_session(prompt, None)
    s.push(video[:5], list(range(5)))
    pos = 5
    for _ in range(warmup):
        s.push(video[pos : pos + 4], list(range(pos, pos + 4)))
        pos += 4
    engine.synchronize()
    t0 = time.perf_counter()
    for _ in range(chunks):
        s.push(video[pos : pos + 4], list(range(pos, pos + 4)))
        pos += 4
    engine.synchronize()
    fps = 4 * chunks / (time.perf_counter() - t0)
    s.close()
    return fps


def sessions_fps(engine: Any, video: np.ndarray, sessions: int, warmup: int, chunks: int) -> float:
    """Aggregate output fps of several sessions pushing round robin (after `warmup` chunks each: their KV
    caches fill and their forwards reach the steady state, as one stream's do in stream_fps)."""
    ss = [engine.open_session(f"{PROMPT} #{k}", None) for k in range(sessions)]
    for s in ss:
        s.push(video[:5], list(range(5)))
    pos = 5
    for _ in range(warmup):
        for s in ss:
            s.push(video[pos : pos + 4], list(range(pos, pos + 4)))
        pos += 4
    engine.synchronize()
    t0 = time.perf_counter()
    for _ in range(chunks):
        for s in ss:
            s.push(video[pos : pos + 4], list(range(pos, pos + 4)))
        pos += 4
    engine.synchronize()
    fps = 4 * chunks * sessions / (time.perf_counter() - t0)
    for s in ss:
        s.close()
    return fps


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    n = min(len(a), len(b))
    if n == 0 or len(a) != len(b):
        return dict(frames=n, mean_abs=float("nan"), max_abs=255, psnr=None, ok=False)
    x = np.stack(a[:n]).astype(np.float64)
    y = np.stack(b[:n]).astype(np.float64)
    mse = float(((x - y) ** 2).mean())
    psnr = None if mse == 0 else 10 * np.log10(255.0**2 / mse)
    # bf16 tolerance: identical, or differences at the level of bf16 rounding (PSNR >= 30 dB)
    return dict(frames=n, mean_abs=float(np.abs(x - y).mean()), max_abs=int(np.abs(x - y).max()), psnr=psnr,
                ok=psnr is None or psnr >= 30.0)


def payload_bytes(engine: Any, spec: dict) -> int:
    """One forward's hop payload: tokens [R, L, dim] plus time embeddings and latents (engine dtype)."""
    cfg = engine.cfg.dit
    h, w = spec["height"] // 16, spec["width"] // 16
    rows, size = spec["steps"], 2 if engine.info.dtype in ("bfloat16", "float16", "fp8") else 4
    tokens = rows * h * w * cfg.dim
    return size * (tokens + rows * 7 * cfg.dim + rows * 16 * (h * 2) * (w * 2))


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_row(name: str, spec: dict, args: argparse.Namespace) -> RowResult:
    res = RowResult(name, spec["model"], f"{spec['height']}x{spec['width']}", spec["steps"], args.devices)
    frames_needed = 5 + 4 * (max(args.warmup + args.chunks, args.settle, 1 + args.chunks, args.agree_chunks) + 2)
    video = synthetic_video(frames_needed, spec["height"], spec["width"])
    agree_video = video[: 5 + 4 * args.agree_chunks]

    # -- one device, in-process ---------------------------------------------------------------------
    log.info("%s: one device (%s)", name, args.single)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # several steps: a forward's later rows come from the output `lag` forwards back, so one stream
    # keeps every rank busy (engine.stream_batch); the single device runs the same schedule, so the
    # frames agree (its throughput does not depend on the lag, only its latency does)
    lag = args.step_lag if args.step_lag is not None else (parse_devices(args.devices).world if spec["steps"] > 1 else 1)
    res.step_lag = lag
    one = StreamEngine.create(EngineOptions(device=args.single, step_lag=lag, **spec))
    res.start_s_1 = time.perf_counter() - t0
    stream_fps(one, video, 2, 2, prompt="warm-up")
    ref = clip(one, agree_video)
    res.fps_1 = stream_fps(one, video, args.warmup, args.chunks)
    if torch.cuda.is_available():
        res.peak_gib_1 = torch.cuda.max_memory_allocated() / 2**30
    log.info("%s: 1 device %.2f fps", name, res.fps_1)
    one.close()
    del one
    free_gpu()

    # -- N devices, the parallel engine -------------------------------------------------------------
    log.info("%s: %s", name, args.devices)
    t0 = time.perf_counter()
    par = dict(inflight=max(args.inflight, lag), rebalance=False, rebalance_every=args.rebalance_every,
               ring_capacity=args.ring, split=[int(n) for n in args.split.split(",")] if args.split else None)
    eng = StreamEngine.create(EngineOptions(device=args.devices, parallel=par, step_lag=lag, **spec))
    res.start_s_n = time.perf_counter() - t0
    try:
        stream_fps(eng, video, 2, 2, prompt="warm-up")
        got = clip(eng, agree_video)
        a = agreement(ref, got)
        res.agree_frames, res.agree_mean_abs, res.agree_max_abs = a["frames"], a["mean_abs"], a["max_abs"]
        res.agree_psnr_db, res.agree_ok = a["psnr"], a["ok"]
        log.info("%s: agreement %s", name, a)
        nbytes = payload_bytes(eng, spec)
        res.payload_mb = nbytes / 2**20
        res.hop_ms = eng.measure_hop(nbytes, repeats=args.hop_repeats)
        log.info("%s: one hop of %.1f MiB: %.3f ms", name, res.payload_mb, res.hop_ms)

        res.fps_n_before = stream_fps(eng, video, args.warmup, args.chunks)
        st = eng.stats()
        res.stream_overlap = st.get("max_stream_overlap", 0)
        res.split_before, res.stage_ms_before = st["split"], st["balance"]["stage_ms"]
        log.info("%s: before balancing %.2f fps, split %s, stages %s", name, res.fps_n_before, res.split_before,
                 res.stage_ms_before)

        eng.set_rebalance(True)
        s = eng.open_session(PROMPT, None)  # let the scheduler move blocks until it settles
        s.push(video[:5], list(range(5)))
        pos, quiet, moves = 5, 0, len(st.get("moves", []))
        for _ in range(args.settle):
            s.push(video[pos : pos + 4], list(range(pos, pos + 4)))
            pos += 4
            now = len(eng.stats().get("moves", []))
            quiet = 0 if now != moves else quiet + 1
            moves = now
            if quiet >= 3 * args.rebalance_every:
                break
        s.close()
        res.fps_n_after = stream_fps(eng, video, args.warmup, args.chunks)
        st = eng.stats()
        res.split_after, res.stage_ms_after = st["split"], st["balance"]["stage_ms"]
        res.moves = st.get("moves", [])
        log.info("%s: after balancing %.2f fps, split %s, stages %s", name, res.fps_n_after, res.split_after,
                 res.stage_ms_after)
        if args.sessions > 1:
            res.sessions = args.sessions
            res.fps_n_sessions = sessions_fps(eng, video, args.sessions, args.warmup, max(2, args.chunks // 2))
            log.info("%s: %d sessions %.2f fps in all", name, args.sessions, res.fps_n_sessions)
        st = eng.stats()
        res.batch, res.graphs = st["batch"], st.get("graphs")
        log.info("%s: forwards per rank from CUDA graphs / eager: %s", name, res.graphs)
    finally:
        eng.close()
        free_gpu()
    return res


def _fmt_stage(stage: Any) -> str:
    if not stage:
        return "-"
    return "/".join(f"{s['dit']:.0f}+{s['other']:.0f}" for s in stage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="p1,p3", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--devices", default="cuda:0,1", help="the ranks (cuda:0,1, cuda*2, cpu:2)")
    ap.add_argument("--single", default=None, help="the one-device baseline (default: the first of --devices)")
    ap.add_argument("--model", default=None, help="replace every row's model (tiny for a CPU dry run)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=30, help="timed 4-frame chunks per measurement")
    ap.add_argument("--warmup", type=int, default=10,
                    help="untimed chunks first: the KV window fills and the CUDA graphs are captured")
    ap.add_argument("--settle", type=int, default=30, help="most chunks given to the block scheduler")
    ap.add_argument("--agree-chunks", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=2, help="chunks of a stream in flight (parallel engine)")
    ap.add_argument("--ring", type=int, default=None, help="forwards in the ring at once (default: the number of ranks)")
    ap.add_argument("--step-lag", type=int, default=None,
                    help="EngineOptions.step_lag for both engines (default: the number of ranks for multi-step rows)")
    ap.add_argument("--rebalance-every", type=int, default=6)
    ap.add_argument("--split", default=None, help="blocks per rank to start with, e.g. 19,11 (default: even)")
    ap.add_argument("--sessions", type=int, default=2, help="sessions sharing the pipeline (0/1: skip)")
    ap.add_argument("--hop-repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.single is None:
        first = args.devices.split(",")[0]
        args.single = "cpu" if first.startswith("cpu") else ("cuda:0" if "*" in first else first)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    results = []
    for name in args.rows.split(","):
        spec = dict(ROWS[name])
        if args.model:
            spec["model"] = args.model
        if args.height:
            spec["height"], spec["width"] = args.height, args.width or args.height
        t0 = time.perf_counter()
        results.append(run_row(name, spec, args))
        log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__, cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0, argv=sys.argv[1:],
        host_cpus=os.cpu_count(),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=[asdict(r) for r in results]), f, indent=1, default=str)
    print(f"\n{meta}")
    head = (f"{'row':4} {'model':9} {'size':8} {'st':>2} {'lag':>3} {'ovl':>3} {'fps 1':>7} {'fps N':>7} {'fps N bal':>9} "
            f"{'N sess':>7} {'hop ms':>7} {'agree':>14} {'split':>14} {'stage ms before (dit+other)':>28} "
            f"{'stage ms after':>20}")
    print(head)
    for r in results:
        agree = "exact" if r.agree_psnr_db is None and r.agree_ok else (
            f"{r.agree_psnr_db:.1f}dB" if r.agree_psnr_db else "n/a") + (" ok" if r.agree_ok else " BAD")
        split = f"{r.split_before}->{r.split_after}".replace(" ", "")
        print(f"{r.row:4} {r.model:9} {r.size:8} {r.steps:>2} {r.step_lag:>3} {r.stream_overlap:>3} {r.fps_1:7.2f} {r.fps_n_before:7.2f} "
              f"{r.fps_n_after:9.2f} {r.fps_n_sessions:7.2f} {r.hop_ms if r.hop_ms is not None else float('nan'):7.3f} "
              f"{agree:>14} {split:>14} {_fmt_stage(r.stage_ms_before):>28} {_fmt_stage(r.stage_ms_after):>20}")


if __name__ == "__main__":
    main()
