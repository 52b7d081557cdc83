"""Where one steady chunk's GPU time goes, stage by stage: each stage of a warmed-up session is run on
its own under torch.profiler (device synchronised around it) and its kernels are listed by total time.

    python -m bench.profile_stages --rows p1,p2 [--out dir]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.measure import synthetic_video
from bench.rows import PROMPT, ROWS, steady_warmup
from engine.parallel.profiling import gpu_gaps
from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench.profile_stages")


def _profile(fn, reps: int = 3, ops: bool = False) -> tuple[float, float, list[tuple[str, float, int]]]:
    """(wall ms, summed kernel ms, [(kernel, ms, calls)]) per call of fn, averaged over reps; with `ops`,
    the rows are torch ops by input shapes (their own kernels' time) instead of kernels."""
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if ops else [])
    with profile(activities=acts, record_shapes=ops) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / reps
    rows = []
    for e in prof.key_averages(group_by_input_shape=ops):
        dev = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
        if dev <= 0 or not e.key or e.key.startswith("aten::") != ops:
            continue
        name = f"{e.key} {e.input_shapes}"[:160] if ops else e.key[:110]
        rows.append((name, dev / 1e3 / reps, e.count // reps))
    rows.sort(key=lambda r: -r[1])
    return wall, sum(r[1] for r in rows), rows


def idle_gaps(fn, top: int, min_us: float = 30.0) -> list[str]:
    """The GPU's idle gaps during fn (one call), largest first, each with the host ops running while the
    GPU waited and the kernel that ended the wait: where the host, not the GPU, sets the pace."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    return gpu_gaps(trace, top, min_us)


def profile_row(name: str, top: int) -> str:
    spec = ROWS[name]
    engine = StreamEngine.create(EngineOptions(device="cuda", **spec))
    h, w = engine.info.height, engine.info.width
    warm = steady_warmup(6, spec["model"])
    video = synthetic_video(5 + 4 * (warm + 8), h, w)
    s = engine.open_session(PROMPT)
    s.push(video[: 5 + 4 * warm], list(range(5 + 4 * warm)))
    a = 5 + 4 * warm
    chunk = video[a : a + 4]
    x = engine.to_video_tensor(chunk).to(engine.dtype)
    enc_state, dec_state = s.vae_state, s.dec_state
    latent = engine.vae.stream_encode(x, enc_state).to(engine.dtype)
    kv = s._kv_now()
    x0 = s.batch.push(latent, 0.7, s._last_t0, kv)
    stages = {
        "whole chunk (session.push)": lambda: s.push(chunk, list(range(a, a + 4))),
        "vae_encode": lambda: engine.vae.stream_encode(x, enc_state),
        "dit (stream batch push)": lambda: s.batch.push(latent, 0.7, s._last_t0, kv),
        "vae_decode": lambda: engine.decoder.stream_decode(x0, dec_state),
        "to_uint8 (D2H)": lambda: engine.to_uint8(engine.decoder.stream_decode(x0, dec_state)),
    }
    lines = [f"## {name} {spec}"]
    for label, fn in stages.items():
        wall, busy, rows = _profile(fn)
        lines.append(f"### {label}: wall {wall:.2f} ms, kernels {busy:.2f} ms ({100 * busy / wall:.0f}% busy)")
        lines += [f"  {ms:8.3f} ms  x{n:<4d} {k}" for k, ms, n in rows[:top]]
    lines += idle_gaps(stages["whole chunk (session.push)"], top)
    # three pushes back to back, as the bench times them: the gaps between chunks count too
    b = a + 4
    lines += ["three chunks in a row:"] + idle_gaps(
        lambda: [s.push(video[b + 4 * i : b + 4 + 4 * i], list(range(b + 4 * i, b + 4 + 4 * i))) for i in range(3)], top)
    # the same stages by torch op and shape; the DiT eagerly (a replayed graph hides its ops)
    s.batch.runner.use_graphs = False
    for label in ("vae_encode", "dit (stream batch push)", "vae_decode"):
        _, busy, rows = _profile(stages[label], ops=True)
        lines.append(f"### {label} by op (eager), {busy:.2f} ms in ops' own kernels")
        lines += [f"  {ms:8.3f} ms  x{n:<4d} {k}" for k, ms, n in rows[:top]]
    s.close()
    del s, engine
    torch.cuda.empty_cache()
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="p1,p2")
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.backends.cudnn.benchmark = True
    text = "\n\n".join(profile_row(r, args.top) for r in args.rows.split(","))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
