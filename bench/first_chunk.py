"""Where a fresh session's first chunk spends its time (the part of TTFF after the 5th input frame).

The first chunk (5 frames -> 2 latents) runs the session's own steps one by one here, each between two
CUDA events, in a warmed-up engine, for a few fresh sessions:

    python -m bench.first_chunk --rows p1 --sessions 3
    python -m bench.first_chunk --rows p1 --pipeline --gaps 1     # the pipeline-parallel engine's first chunk
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from bench.measure import synthetic_video
from bench.rows import PROMPT, ROWS, steady_warmup
from engine.runtime import EngineOptions, StreamEngine

log = logging.getLogger("bench.first_chunk")


def first_chunk_steps(engine: StreamEngine, video) -> dict[str, float]:
    """ms per step of one fresh session's first chunk, by device events, and its wall time."""
    s = engine.open_session(PROMPT)
    marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((name, ev))

    engine.synchronize()
    t0 = time.perf_counter()
    mark("start")
    x = engine.to_video_tensor(video[:5])
    s.controller.step(x[0])
    mark("upload")
    s.vae_state, s.dec_state = engine.vae.new_stream_state(), engine.decoder.new_stream_state()
    xd = x.to(engine.dtype)
    h0 = engine.vae.encoder(engine.vae._prepare(xd[:, :, :1]), s.vae_state.enc)
    mark("encode frame 0")
    s.vae_state.enc_started = True
    h1 = engine.vae.encoder(engine.vae._prepare(xd[:, :, 1:5]), s.vae_state.enc)
    latent = engine.vae._mu(torch.cat([h0, h1], 2), False).contiguous().to(engine.dtype)
    mark("encode frames 1-4")
    x0 = s.batch.prime(latent, s.controller.s_max, 700, s._kv_now())
    mark("DiT prime (all steps)")
    f0 = engine.decoder.stream_decode(x0[:, :, :1], s.dec_state)
    mark("decode latent 0")
    f1 = engine.decoder.stream_decode(x0[:, :, 1:], s.dec_state)
    mark("decode latent 1")
    engine.to_uint8(torch.cat([f0, f1], 2))
    mark("to host")
    engine.synchronize()
    wall = 1000 * (time.perf_counter() - t0)
    out = {name: prev.elapsed_time(ev) for (_, prev), (name, ev) in zip(marks, marks[1:])}
    out["sum of steps"] = sum(out.values())
    out["wall"] = wall
    # the session's own first push, for comparison (a second fresh session)
    s2 = engine.open_session(PROMPT)
    engine.synchronize()
    t0 = time.perf_counter()
    s2.push(video[:5], list(range(5)))
    engine.synchronize()
    out["session.push wall"] = 1000 * (time.perf_counter() - t0)
    out.update({f"push {k}": v for k, v in s2.stats.items() if k.endswith("_ms")})
    s.close()
    s2.close()
    return out


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
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.pipeline:
        pipeline_main(args)
        return
    for name in args.rows.split(","):
        spec = ROWS[name]
        engine, video = warmed_up(spec, "cuda")
        runs = [first_chunk_steps(engine, video) for _ in range(args.sessions)]
        print(f"## {name} {spec}: first chunk, ms per step (fresh sessions {args.sessions}, last is warmest)")
        for key in runs[0]:
            print(f"  {key:28s} " + " ".join(f"{r[key]:8.1f}" for r in runs))
        for i in range(args.gaps):
            print(f"### fresh session {i + 1}: the push of frames 1-4, the GPU's idle gaps")
            print("\n".join(first_push_gaps(engine, video)))
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
