"""Stream our engine on one GPU with random weights at real shapes and report what docs/ARCHITECTURE.md §9 defines:
end-to-end FPS after warm-up (VAE included), TTFF at 30 fps input, per-stage ms, peak memory.

    python -m bench.engine_bench --rows p1,p3 --chunks 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from bench.measure import STAGES, StageClock, matmul_ceiling_tflops, mfu, run_meta, synthetic_video
from bench.rows import INPUT_FPS, PROMPT, ROWS, RowResult, steady_warmup
from interface.catalogue import DECODERS, DTYPES, ENCODERS
from engine.parallel.devices import parse_devices
from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench")


def count_flops(engine: StreamEngine, session, video, pos: int) -> dict[str, float]:
    """FLOPs of each stage over one steady-state chunk, the DiT and the VAE run eagerly (a replayed CUDA
    graph is invisible to the counter; the graph runs the same kernels). "dit" is the engine core's
    stage over the chunk's forward: patch + time embedding (`embed`), the blocks (`run`) and the head
    with the flow step (`finish`)."""
    stage = engine.core.stage
    clock = StageClock(engine.device)
    clock.wrap(engine.encoder, "stream_encode", "vae_encode")
    calls: list[str] = []
    for method in ("embed", "run", "finish"):
        clock.wrap(stage, method, "dit")
        inner = getattr(stage, method)
        setattr(stage, method, lambda *a, _inner=inner, _m=method, **k: calls.append(_m) or _inner(*a, **k))
    clock.wrap(engine.decoder, "stream_decode_parts", "vae_decode")
    graphs, stage.use_graphs = stage.use_graphs, False
    # the Wan VAE and LightVAE replay CUDA graphs; TAEHV has none
    graphed = {id(m): m for m in (engine.encoder, engine.decoder) if hasattr(m, "use_graphs")}
    vae_graphs = {k: m.use_graphs for k, m in graphed.items()}
    for m in graphed.values():
        m.use_graphs = False
    clock.enabled = clock.count = True
    try:
        session.push(video[pos : pos + 4], list(range(pos, pos + 4)))
        engine.synchronize()
        session.take_finished()  # nothing of the chunk left in the core's queue
    finally:
        clock.enabled = clock.count = False
        stage.use_graphs = graphs
        for k, m in graphed.items():
            m.use_graphs = vae_graphs[k]
        # the wrappers were instance attributes over the class methods
        del engine.encoder.stream_encode, engine.decoder.stream_decode_parts
        del stage.embed, stage.run, stage.finish
    if calls != ["embed", "run", "finish"]:  # one forward of this session alone, else the count means something else
        raise RuntimeError(f"the counted chunk made the stage calls {calls}, not one forward's embed, run, finish")
    return dict(clock.flops)


def measure_ttff(engine: StreamEngine, video) -> tuple[float, float]:
    """(TTFF s, first-chunk ms) of one fresh session at 30 fps input. Frame i arrives at i/30 s; frame 0
    is pushed (and encoded) on arrival; the push of frames 1-4 starts when frame 4 is in. The first
    output frame is frame 0, sent ahead of the rest of its chunk: it reaches the caller through `early`
    while the push waits, as the push's return value, or between pushes (take_finished(), polled here as
    the server's engine process polls it), whichever comes first for this engine and device. First-chunk
    ms: from the push of frames 1-4 until all 5 frames are on the host (flush() returned)."""
    s = engine.open_session(PROMPT)
    engine.synchronize()
    arrival = time.perf_counter()  # frame 0's
    assert s.chunk_frames == 1 and s.push(video[:1], [0]) == []
    # frames 1-4 come in real time: whatever the engine still does with frame 0 (preparing the first
    # chunk's forward) overlaps their arrival, as with a live camera
    time.sleep(max(0.0, arrival + 4 / INPUT_FPS - time.perf_counter()))
    seen: list[float] = []
    got: list = []

    def early(out: list) -> None:
        seen.append(time.perf_counter())
        got.extend(out)

    t0 = time.perf_counter()
    got += s.push(video[1:5], list(range(1, 5)), early=early)
    while not got:
        if time.perf_counter() - t0 > 600:
            raise TimeoutError("no first frame 600 s after the push of frames 1-4")
        time.sleep(0.0002)
        got += s.take_finished()
    if not seen:
        seen.append(time.perf_counter())
    got += s.flush()  # the rest of the chunk (flush drains what is in flight, nothing more here)
    first_ms = 1000 * (time.perf_counter() - t0)
    assert [p for _, p in got] == [0, 1, 2, 3, 4], f"first chunk gave pts {[p for _, p in got]}"
    s.close()
    return seen[0] - arrival, first_ms


def _gpu_memory_in_use_gib() -> float:
    """The most memory in use on any GPU (the pipeline's ranks are other processes, so this process's
    allocator does not see their peaks)."""
    in_use = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        in_use.append((total - free) / 2**30)
    return max(in_use)


def run_row(name: str, chunks: int, warmup: int, weights: Optional[Path] = None, profile_dir: str | None = None,
            device: Optional[str] = None, override: Optional[dict] = None) -> RowResult:
    """One row of ours; `device`/`override` (e.g. model=tiny) make a CPU dry run of the same code."""
    spec = {**ROWS[name], **(override or {})}  # ROWS keys plus any EngineOptions field
    row_device = spec.pop("device", "cuda")
    device = device or row_device  # --device replaces the row's (a CPU dry run)
    ranks = parse_devices(device)  # None: the in-process engine on one device
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    probe = device if ranks is None else "cuda:0" if gpu else "cpu"  # where the matmul ceiling is measured
    fp8 = spec.get("dtype") == "fp8"
    if fp8 and not gpu:
        raise SystemExit("--dtype fp8 needs a GPU with FP8 tensor cores (the engine refuses it elsewhere)")
    # fp8 rows: MFU against the FP8 GEMM's ceiling (their attention and the VAE still run in bf16)
    ceiling = matmul_ceiling_tflops(torch.device(probe), fp8=fp8)
    if gpu:
        torch.cuda.empty_cache()  # the ranks are other processes: leave them the memory the ceiling took
    t0 = time.perf_counter()
    engine = StreamEngine.create(EngineOptions(device=device, weights=weights, **spec))
    load_s = time.perf_counter() - t0
    h, w = engine.info.height, engine.info.width
    warmup = steady_warmup(warmup, spec["model"])
    if ranks:
        warmup += 24  # and the block scheduler has moved blocks (or not) before the timing
    video = synthetic_video(5 + 4 * (2 * warmup + chunks + 3), h, w)

    # A warm-up session through the steady state (kernels, cuDNN autotuning, graph capture), then a short
    # one as the server's own engine warm-up runs (it leaves the allocator holding a first chunk's memory
    # outside the closed session's graph pools). TTFF: the median over three fresh sessions, each
    # closed after its first chunk; then a fresh session warms up its own steady state and is timed.
    s = engine.open_session("warm-up")
    s.push(video[: 5 + 4 * warmup], list(range(5 + 4 * warmup)))
    s.close()
    s = engine.open_session("warm-up")
    s.push(video[:9], list(range(9)))
    s.close()
    ttffs, firsts = [], []
    for _ in range(3):
        ttff, first_ms = measure_ttff(engine, video)
        ttffs.append(ttff)
        firsts.append(first_ms)
    ttff, first_ms = statistics.median(ttffs), statistics.median(firsts)
    s = engine.open_session(PROMPT)
    s.push(video[:5], list(range(5)))
    for i in range(warmup):
        a = 5 + 4 * i
        s.push(video[a : a + 4], list(range(a, a + 4)))
    stats = []
    engine.synchronize()
    t_start = time.perf_counter()
    for i in range(warmup, warmup + chunks):
        a = 5 + 4 * i
        s.push(video[a : a + 4], list(range(a, a + 4)))
        stats.append(dict(s.stats))
    engine.synchronize()
    elapsed = time.perf_counter() - t_start
    if ranks:
        st = engine.stats()
        if profile_dir:  # after the timing: the profiler slows the ranks' hosts
            profile_ranks(engine, s, video, 5 + 4 * (warmup + chunks), Path(profile_dir) / name)
        return _pipeline_row(name, spec, engine, st, s, ttffs, ttff, first_ms, chunks, elapsed, load_s, ceiling, gpu)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
    flops = count_flops(engine, s, video, 5 + 4 * (warmup + chunks))
    res = RowResult(
        row=name, impl="ours", model=spec["model"], size=f"{h}x{w}", steps=engine.info.steps,
        fps=4 * chunks / elapsed, ttff_s=ttff, first_chunk_ms=first_ms, chunk_ms=1000 * elapsed / chunks,
        peak_gib=peak, chunks=chunks, load_s=load_s, ceiling_tflops=ceiling,
        weights=f"loaded from {weights}" if weights else "random init", dtype=spec.get("dtype") or "",
        note="TTFF of 3 fresh sessions: " + ", ".join(f"{t:.3f}" for t in ttffs) + " s",
    )
    for st in STAGES:
        seen = [x[f"{st}_ms"] for x in stats if f"{st}_ms" in x]  # a chunk's stat comes once its stage's time is in
        ms = statistics.median(seen) if seen else None
        setattr(res, f"{st}_ms", ms)
        setattr(res, f"{st}_tflop", flops.get(st, 0.0) / 1e12)
        setattr(res, f"{st}_mfu", mfu(flops.get(st), ms, ceiling))
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        a = 5 + 4 * (warmup + chunks + 1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(2):
                s.push(video[a + 4 * i : a + 4 + 4 * i], list(range(a + 4 * i, a + 4 + 4 * i)))
            engine.synchronize()
        with open(f"{profile_dir}/profile_{name}.txt", "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    del s, engine
    return res


def profile_ranks(engine, s, video, start: int, directory: Path, forwards: int = 8, timeout: float = 120.0) -> None:
    """Each rank profiles `forwards` steady forwards of session `s` from the inside (engine.parallel.profiling)
    and writes rank{r}.txt and rank{r}.json.gz into `directory`; waits for every rank's files."""
    engine.profile_ranks(str(directory), forwards)
    for i in range(forwards + 4):  # the forward after the window closes it on every rank
        a = start + 4 * i
        s.push(video[a : a + 4], list(range(a, a + 4)))
    want = [directory / f"rank{r}.txt" for r in range(len(engine.stats()["devices"]))]
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in want):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank profiles missing in {directory}: {[p.name for p in want if not p.exists()]}")
        time.sleep(0.2)
    for p in want:
        log.info("%s\n%s", p, p.read_text())


def _pipeline_row(name: str, spec: dict, engine, st: dict, s, ttffs: list, ttff: float, first_ms: float, chunks: int,
                  elapsed: float, load_s: float, ceiling: float, gpu: bool) -> RowResult:
    """A row of the pipeline-parallel engine. Its stage times are the ranks' own (medians since the
    block scheduler's last move): rank 0's share besides its blocks is the VAE encode (and the patch
    embedding), the last rank's the VAE decode (and the head). No FLOP count: the ranks are other
    processes (the computation is the one-GPU row's). `st`: the engine's stats after the timed chunks."""
    stage = st["balance"]["stage_ms"] or []
    s.close()
    res = RowResult(
        row=name, impl="ours", model=spec["model"], size=f"{engine.info.height}x{engine.info.width}",
        steps=engine.info.steps, fps=4 * chunks / elapsed, ttff_s=ttff, first_chunk_ms=first_ms,
        chunk_ms=1000 * elapsed / chunks, peak_gib=_gpu_memory_in_use_gib() if gpu else 0.0, chunks=chunks,
        load_s=load_s, ceiling_tflops=ceiling,
        note=(f"{st['world']} ranks ({','.join(st['devices'])}), split {st['split']}, block moves {len(st['moves'])}; "
              "forwards whose blocks replayed a CUDA graph / ran eagerly, per rank: "
              + ", ".join(f"{g['replayed']}/{g['eager']}" for g in st.get("graphs", [])) + "; "
              "stage ms per rank (blocks + the rest of its share) "
              + " / ".join(f"{r['dit']:.1f}+{r['other']:.1f}" for r in stage)
              + "; VAE enc/dec columns: rank 0's and the last rank's share besides their blocks, DiT: all ranks' blocks; "
              "peak: GPU memory in use at the end (max over GPUs); TTFF of 3 fresh sessions: "
              + ", ".join(f"{t:.3f}" for t in ttffs) + " s"),
    )
    if stage:
        res.vae_encode_ms, res.vae_decode_ms = stage[0]["other"], stage[-1]["other"]
        res.dit_ms = sum(r["dit"] for r in stage)
    engine.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="p1,p3")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--weights", type=Path, default=None, help="load this weights tree instead of random init")
    ap.add_argument("--device", default=None, help="instead of the row's (cuda; P4/P5: cuda*2), e.g. cpu:2 with --model tiny")
    ap.add_argument("--decoder", choices=DECODERS, default=None, help="a light decoder instead of Wan's")
    ap.add_argument("--encoder", choices=ENCODERS, default=None, help="a light encoder instead of Wan's")
    ap.add_argument("--taehv-weights", type=Path, default=None)
    ap.add_argument("--lightvae-weights", type=Path, default=None)
    ap.add_argument("--model", default=None, help="replace the rows' model (tiny: a CPU dry run)")
    ap.add_argument("--size", type=int, default=None, help="square frames of this size instead of the row's")
    ap.add_argument("--dtype", default=None,
                    help="comma-separated engine dtypes, each row run in each (e.g. bfloat16,fp8: FP8 beside bf16 in one "
                         f"run; one of {', '.join(DTYPES)}); default: the engine's (bf16 on a GPU)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-dir", default=None,
                    help="write a torch.profiler table per row here (pipeline rows: each rank's own profile)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.backends.cudnn.benchmark = True
    override: dict = {}
    if args.model:
        override["model"] = args.model
    if args.size:
        override.update(height=args.size, width=args.size)
    for side in ("decoder", "encoder"):
        if getattr(args, side):
            override[side] = getattr(args, side)
    for file in ("taehv_weights", "lightvae_weights"):
        if getattr(args, file):
            override[file] = getattr(args, file)
    dtypes: list[Optional[str]] = args.dtype.split(",") if args.dtype else [None]
    bad = [d for d in dtypes if d is not None and d not in DTYPES]  # None: the engine's default
    if bad:
        ap.error(f"--dtype: unknown {', '.join(map(str, bad))}; choose from {', '.join(DTYPES)}")
    results = []
    for name in args.rows.split(","):
        for dtype in dtypes:
            row_override = {**override, **({"dtype": dtype} if dtype else {})}
            r = run_row(name, args.chunks, args.warmup, args.weights, args.profile_dir, args.device, row_override)
            log.info("%s", asdict(r))
            results.append(r)
    meta = run_meta()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=[asdict(r) for r in results]), f, indent=1)
    print(f"\n{meta}")
    print(f"{'row':5} {'dtype':8} {'model':9} {'size':8} {'st':>2} {'fps':>7} {'ttff s':>7} {'enc ms':>7} {'dit ms':>7} {'dec ms':>7} {'peak GiB':>8} {'DiT MFU':>7}")
    for r in results:
        ms = " ".join("      -" if v is None else f"{v:7.1f}" for v in (r.vae_encode_ms, r.dit_ms, r.vae_decode_ms))
        print(f"{r.row:5} {r.dtype or 'default':8} {r.model:9} {r.size:8} {r.steps:>2} {r.fps:7.2f} {r.ttff_s:7.3f} {ms} {r.peak_gib:8.1f} "
              f"{'      -' if r.dit_mfu is None else f'{100 * r.dit_mfu:6.1f}%'}")


if __name__ == "__main__":
    main()
