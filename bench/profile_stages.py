"""Where one steady chunk's GPU time goes, stage by stage: each stage of a warmed-up session is run on
its own under torch.profiler (device synchronised around it) and its kernels are listed by total time.

The stages are the engine core's parts (engine.runtime: rank 0 of a ring of one, docs/ARCHITECTURE.md
§5-§6): the DiT is the core's stage re-running the session's latest steady forward as the core made it
(embedding, blocks, head + x0, re-noise; the session's KV cache moves on as with a real forward); the
VAE encode and decode run on stream states of their own, brought to the steady state first (the
session's are left alone).

    python -m bench.profile_stages --rows p1,p2 [--out dir]
    python -m bench.profile_stages --rows p2 --model tiny --size 64 --device cpu   # a dry run (no kernel times)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from bench.core_calls import LastCall, wrapped
from bench.measure import synthetic_video
from bench.rows import PROMPT, ROWS, steady_warmup
from engine.dit import Embedded
from engine.parallel.profiling import gpu_gaps
from engine.runtime import EngineOptions, StreamEngine
from engine.schedule import renoise_rows

log = logging.getLogger("bench.profile_stages")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _activities(cpu: bool) -> list:
    """The profiler's activities: the GPU's kernels (where there is a GPU), with the host's ops if `cpu`."""
    gpu = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    return gpu + ([ProfilerActivity.CPU] if cpu or not gpu else [])


def _profile(fn, reps: int = 3, ops: bool = False) -> tuple[float, float, list[tuple[str, float, int]]]:
    """(wall ms, summed kernel ms, [(kernel, ms, calls)]) per call of fn, averaged over reps; with `ops`,
    the rows are torch ops by input shapes (their own kernels' time) instead of kernels."""
    _sync()
    acts = _activities(ops)
    with profile(activities=acts, record_shapes=ops) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
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
    _sync()
    with profile(activities=_activities(True), with_stack=True) as prof:
        fn()
        _sync()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))["traceEvents"]
    return gpu_gaps(trace, top, min_us)


def profile_row(name: str, top: int, device: str = "cuda", override: Optional[dict] = None) -> str:
    spec = {**{k: v for k, v in ROWS[name].items() if k != "device"}, **(override or {})}
    engine = StreamEngine.create(EngineOptions(device=device, **spec))
    if not isinstance(engine, StreamEngine):
        raise SystemExit(f"--device {device}: one device only")
    core, stage = engine.core, engine.core.stage
    h, w = engine.info.height, engine.info.width
    warm = steady_warmup(6, spec["model"])
    video = synthetic_video(5 + 4 * (warm + 9), h, w)
    s = engine.open_session(PROMPT)
    s.push(video[: 5 + 4 * warm], list(range(5 + 4 * warm)))
    a = 5 + 4 * warm
    chunk = video[a : a + 4]
    # the session's next steady forward as the core makes it: the stage's arguments
    embed_call = LastCall()
    with wrapped(stage, "embed", embed_call):
        s.push(chunk, list(range(a, a + 4)))
        engine.synchronize()
        s.take_finished()
    assert embed_call.args is not None, "the chunk made no forward"
    groups, xs = embed_call.args
    assert len(groups) == 1 and groups[0].frames == 1, "not one session's steady forward"
    a += 4
    chunk = video[a : a + 4]

    def dit() -> torch.Tensor:  # as Rank0._issue and RankBase.finish_forward run it in a ring of one
        emb = stage.embed(groups, xs)
        tokens = stage.run(groups, emb)
        x0 = stage.finish(groups, Embedded(tokens, emb.e, emb.e6, emb.grid), tokens, xs[0])
        renoise_rows(x0, groups, core.renoise_source)
        return x0

    z = dit()[-1:]  # the row that leaves: the latent a steady decode gets
    x = engine.to_video_tensor(chunk).to(engine.dtype)
    enc_state, dec_state = engine.encoder.new_stream_state(), engine.decoder.new_stream_state()
    engine.encoder.stream_encode(engine.to_video_tensor(video[:1]).to(engine.dtype), enc_state)  # frame 0 alone
    engine.encoder.stream_encode(x, enc_state)
    engine.decoder.stream_decode(z, dec_state)  # the first latent (one frame)
    stages = {
        "whole chunk (session.push)": lambda: s.push(chunk, list(range(a, a + 4))),
        "vae_encode": lambda: engine.encoder.stream_encode(x, enc_state),
        "dit (stage: embed, blocks, head, re-noise)": dit,
        "vae_decode": lambda: engine.decoder.stream_decode(z, dec_state),
        "to_uint8 (D2H)": lambda: engine.to_uint8(engine.decoder.stream_decode(z, dec_state)),
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
    # the same stages by torch op and shape, all eager (a replayed graph hides its ops)
    graphed = [(m, m.use_graphs) for m in {id(m): m for m in (engine.encoder, engine.decoder)}.values()
               if hasattr(m, "use_graphs")]
    stage.use_graphs = False
    for m, _ in graphed:
        m.use_graphs = False
    for label in ("vae_encode", "dit (stage: embed, blocks, head, re-noise)", "vae_decode"):
        _, busy, rows = _profile(stages[label], ops=True)
        lines.append(f"### {label} by op (eager), {busy:.2f} ms in ops' own kernels")
        lines += [f"  {ms:8.3f} ms  x{n:<4d} {k}" for k, ms, n in rows[:top]]
    for m, on in graphed:
        m.use_graphs = on
    s.close()
    del s, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="p1,p2")
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="one device (cpu with --model tiny: a dry run, no kernel times)")
    ap.add_argument("--model", default=None, help="replace the rows' model")
    ap.add_argument("--size", type=int, default=None, help="square frames of this size instead of the row's")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.backends.cudnn.benchmark = True
    override: dict = {}
    if args.model:
        override["model"] = args.model
    if args.size:
        override.update(height=args.size, width=args.size)
    text = "\n\n".join(profile_row(r, args.top, args.device, override) for r in args.rows.split(","))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
