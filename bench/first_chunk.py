"""Where a fresh session's first chunk spends its time (the part of TTFF after the 5th input frame).

A warmed-up engine's fresh sessions, each pushed as a camera would: frame 0 alone, 4/30 s later frames
1-4, then flushed. The engine's core (engine.runtime: rank 0 of a ring of one, run in this thread)
does the work; a mark is taken after every call of its parts (frames to the device, VAE encode, the
DiT stage's embedding, blocks and head per step, VAE decode, frames to the host), by CUDA events on a
GPU, and the table lists the time from each mark to the next (device time, idle gaps while the host
works included), then the push's wall times:

    python -m bench.first_chunk --rows p1 --sessions 3
    python -m bench.first_chunk --rows p1 --pipeline --gaps 1     # the pipeline-parallel engine's first chunk
    python -m bench.first_chunk --rows p2 --model tiny --size 64 --device cpu   # a dry run of the script
"""

from __future__ import annotations

import argparse
import logging
import time
import torch

from bench.core_calls import Marks, marking
from bench.measure import synthetic_video
from bench.rows import INPUT_FPS, PROMPT, ROWS, steady_warmup
from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench.first_chunk")


def first_chunk_steps(engine: StreamEngine, video) -> dict[str, float]:
    """ms between the marks of one fresh session's frame 0 and first chunk, and the pushes' wall times."""
    s = engine.open_session(PROMPT)
    marks = Marks(engine.device)
    engine.synchronize()
    with marking(engine, marks):
        marks.mark("start", anchor=True)
        t0 = time.perf_counter()
        assert s.push(video[:1], [0]) == []
        engine.synchronize()
        frame0_ms = 1000 * (time.perf_counter() - t0)
        time.sleep(4 / INPUT_FPS)  # frames 1-4 on their way
        marks.mark("frames 1-4 in", anchor=True)
        first: list[float] = []
        t0 = time.perf_counter()
        out = s.push(video[1:5], list(range(1, 5)), early=lambda o: first.append(time.perf_counter()))
        if out and not first:
            first.append(time.perf_counter())
        push_ms = 1000 * (time.perf_counter() - t0)
        out += s.flush()
        engine.synchronize()
        marks.mark("flushed")
        wall = 1000 * (time.perf_counter() - t0)
    steps = marks.intervals()
    res = dict(steps)
    res["sum of steps"] = sum(steps.values())
    res["wall: push of frame 0"] = frame0_ms
    res["wall: push of frames 1-4"] = push_ms
    res["wall: to the first frame"] = 1000 * (first[0] - t0) if first else float("nan")
    res["wall: to all 5 frames (flush)"] = wall
    s.close()
    return res


def first_push_gaps(engine: StreamEngine, video) -> list[str]:
    """Where the GPU waits for the host in a fresh session's push of frames 1-4 (frame 0 pushed first)."""
    from bench.profile_stages import idle_gaps

    s = engine.open_session(PROMPT)
    s.push(video[:1], [0])
    lines = idle_gaps(lambda: s.push(video[1:5], [1, 2, 3, 4], early=lambda out: None), top=12)
    s.close()
    return lines


def warmed_up(spec: dict, device: str):
    """An engine for a row, after one session through its steady state; with the clip that session used."""
    engine = StreamEngine.create(EngineOptions(device=device, **spec))
    video = synthetic_video(5 + 4 * steady_warmup(6, spec["model"]), engine.info.height, engine.info.width)
    s = engine.open_session("warm-up")
    s.push(video, list(range(len(video))))
    s.flush()
    s.close()
    return engine, video


def pipeline_first_frame(engine, video, profile_gaps: int = 0) -> tuple[float, list[str]]:
    """The pipeline-parallel engine (a ring of one, its rank 0 a thread of this process): ms from the
    push of a fresh stream's frames 1-4 (frame 0 went 4/30 s before) to its first output frame, and with
    `profile_gaps`, the GPU's idle gaps over that time (what the host, in the rank's thread or the
    caller's, did meanwhile)."""
    from bench.profile_stages import idle_gaps

    s = engine.open_session(PROMPT)
    engine.synchronize()
    took: list[float] = []
    s.push(video[:1], [0])  # frame 0 on arrival; frames 1-4 come 4/30 s later
    time.sleep(4 / 30)

    def first() -> None:
        t0 = time.perf_counter()
        out = s.push(video[1:5], list(range(1, 5)))
        while not out:
            time.sleep(0.0002)
            out = s.take_finished()
        took.append(1000 * (time.perf_counter() - t0))

    lines = idle_gaps(first, top=profile_gaps) if profile_gaps else (first() or [])
    s.flush()
    s.close()
    return took[0], lines


def pipeline_main(args) -> None:
    """--pipeline: the same questions for the pipeline-parallel engine's first chunk."""
    import os

    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    os.environ.setdefault("STREAMGEN_TORCHRUN_DEVICE", "cuda")
    for name in args.rows.split(","):
        spec = {k: v for k, v in ROWS[name].items() if k != "device"}  # P4/P5: their ring options, one rank
        engine, video = warmed_up(spec, "torchrun")
        times = [pipeline_first_frame(engine, video)[0] for _ in range(args.sessions)]
        print(f"## {name} {spec}, a ring of one: push of frames 1-4 to the first frame, ms: "
              + " ".join(f"{t:.1f}" for t in times))
        for i in range(args.gaps):
            ms, lines = pipeline_first_frame(engine, video, profile_gaps=14)
            print(f"### fresh session {i + 1} (profiled, {ms:.1f} ms): the GPU's idle gaps")
            print("\n".join(lines))
        engine.close()
        del engine
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="p1")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--gaps", type=int, default=0, help="fresh sessions whose first push is profiled for idle gaps")
    ap.add_argument("--pipeline", action="store_true", help="the pipeline-parallel engine (a ring of one)")
    ap.add_argument("--device", default="cuda", help="one device (cpu with --model tiny: a dry run of the script)")
    ap.add_argument("--model", default=None, help="replace the rows' model")
    ap.add_argument("--size", type=int, default=None, help="square frames of this size instead of the row's")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.pipeline:
        pipeline_main(args)
        return
    for name in args.rows.split(","):
        spec = {k: v for k, v in ROWS[name].items() if k != "device"}  # P4/P5: their options, one device
        if args.model:
            spec["model"] = args.model
        if args.size:
            spec.update(height=args.size, width=args.size)
        engine, video = warmed_up(spec, args.device)
        if not isinstance(engine, StreamEngine):
            raise SystemExit(f"--device {args.device}: one device only (--pipeline for a ring)")
        runs = [first_chunk_steps(engine, video) for _ in range(args.sessions)]
        print(f"## {name} {spec}: first chunk, ms from the mark before to the end of each call "
              f"(fresh sessions {args.sessions}, last is warmest)")
        keys = list(dict.fromkeys(k for r in runs for k in r))
        width = max(len(k) for k in keys)
        for key in keys:
            print(f"  {key:{width}s} " + " ".join(f"{r.get(key, float('nan')):8.1f}" for r in runs))
        for i in range(args.gaps):
            print(f"### fresh session {i + 1}: the push of frames 1-4, the GPU's idle gaps")
            print("\n".join(first_push_gaps(engine, video)))
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
