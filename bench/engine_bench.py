"""Stream our engine on one GPU with random weights at real shapes and report what DESIGN §6 asks:
end-to-end FPS after warm-up (VAE included), TTFF at 30 fps input, per-stage ms, peak memory.

    python -m bench.engine_bench --rows p1,p3 --chunks 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench")

ROWS = {
    "p1": dict(model="wan-1.3b", height=480, width=832, steps=2),
    "p2": dict(model="wan-1.3b", height=512, width=512, steps=1),
    "p3": dict(model="wan-14b", height=512, width=512, steps=1),
    "p1s1": dict(model="wan-1.3b", height=480, width=832, steps=1),
}
INPUT_FPS = 30.0


@dataclass
class Result:
    row: str
    model: str
    size: str
    steps: int
    fps: float
    ttff_s: float
    first_chunk_ms: float
    vae_encode_ms: float
    dit_ms: float
    vae_decode_ms: float
    chunk_ms: float
    peak_gib: float
    chunks: int


def synthetic_video(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A moving pattern (motion matters to the noise controller), uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w + n * 4, 3), dtype=np.uint8)
    return np.stack([base[:, 4 * i : 4 * i + w] for i in range(n)])


def run_row(name: str, chunks: int, warmup: int, profile_dir: str | None = None) -> Result:
    spec = ROWS[name]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = StreamEngine.create(EngineOptions(device="cuda", **spec))
    h, w = engine.info.height, engine.info.width
    video = synthetic_video(5 + 4 * (warmup + chunks), h, w)

    # warm-up session (kernels, allocator), then a fresh session measures TTFF and steady state
    s = engine.open_session("warm-up")
    s.push(video[: 5 + 4 * warmup], list(range(5 + 4 * warmup)))
    s.close()

    s = engine.open_session("a watercolor painting of a city street")
    engine.synchronize()
    t0 = time.perf_counter()
    first = s.push(video[:5], list(range(5)))
    engine.synchronize()
    first_ms = 1000 * (time.perf_counter() - t0)
    assert len(first) == 5, "the first chunk is denoised through every step at once and leaves at once"
    # TTFF at 30 fps input: the first chunk waits for its 5th frame (4 intervals after the first
    # frame), then is encoded, denoised through every step and decoded.
    ttff = 4 / INPUT_FPS + first_ms / 1000
    stats = []
    t_start = time.perf_counter()
    for i in range(chunks):
        a = 5 + 4 * i
        s.push(video[a : a + 4], list(range(a, a + 4)))
        stats.append(dict(s.stats))
    engine.synchronize()
    elapsed = time.perf_counter() - t_start
    med = {k: statistics.median(st[k] for st in stats) for k in ("vae_encode_ms", "dit_ms", "vae_decode_ms")}
    res = Result(
        row=name, model=spec["model"], size=f"{h}x{w}", steps=engine.info.steps,
        fps=4 * chunks / elapsed, ttff_s=ttff, first_chunk_ms=first_ms,
        chunk_ms=1000 * elapsed / chunks, peak_gib=torch.cuda.max_memory_allocated() / 2**30, chunks=chunks, **med,
    )
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        a = 5 + 4 * chunks
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                s.push(video[a - 8 + 4 * i : a - 4 + 4 * i], list(range(4)))
            engine.synchronize()
        with open(f"{profile_dir}/profile_{name}.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    del s, engine
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="p1,p3")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler table per row here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.backends.cudnn.benchmark = True
    results = []
    for name in args.rows.split(","):
        r = run_row(name, args.chunks, args.warmup, args.profile_dir)
        log.info("%s", asdict(r))
        results.append(r)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=[asdict(r) for r in results]), f, indent=1)
    print(f"\n{meta}")
    print(f"{'row':5} {'model':9} {'size':8} {'st':>2} {'fps':>7} {'ttff s':>7} {'enc ms':>7} {'dit ms':>7} {'dec ms':>7} {'peak GiB':>8}")
    for r in results:
        print(f"{r.row:5} {r.model:9} {r.size:8} {r.steps:>2} {r.fps:7.2f} {r.ttff_s:7.3f} {r.vae_encode_ms:7.1f} {r.dit_ms:7.1f} {r.vae_decode_ms:7.1f} {r.peak_gib:8.1f}")


if __name__ == "__main__":
    main()
