"""Offline rendering of a video file through the streaming engine, chunk by chunk, as live."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from engine.runtime import EngineOptions, StreamEngine
from engine.video_io import VideoWriter, probe, read_frames
from interface.controls import StreamParams


def _options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        model=args.model, weights=args.weights, device=args.devices, height=args.height, width=args.width,
        steps=args.steps, seed=args.seed, decoder=args.decoder, encoder=args.encoder,
        taehv_weights=args.taehv_weights, lightvae_weights=args.lightvae_weights,
        step_lag=args.step_lag, kv_policy=args.kv_policy, dtype=args.dtype,
    )


def serve_rank(args: argparse.Namespace) -> None:
    """Under torchrun, every process but RANK 0: one rank of the pipeline, until RANK 0 is done."""
    from engine.parallel.engine import serve_torchrun_rank

    serve_torchrun_rank(_options(args))


def render(args: argparse.Namespace) -> int:
    """Render args.input to args.output; every input frame yields one output frame. Returns the count."""
    engine = StreamEngine.create(_options(args))
    try:
        return _render(engine, args)
    finally:
        engine.close()  # several ranks: stop their processes


def _render(engine, args: argparse.Namespace) -> int:
    h, w = engine.info.height, engine.info.width
    frames, total, fps = read_frames(args.input, w, h)
    session = engine.open_session(args.prompt, StreamParams(seed=args.seed))
    if args.output_size == "input":  # the model saw a centre crop; scaled back to the input's size
        source = probe(args.input)
        writer = VideoWriter(args.output, source.width, source.height, fps)
    else:
        writer = VideoWriter(args.output, w, h, fps)
    written = 0
    with tqdm(total=total or None, unit="frame", disable=args.quiet) as bar:
        for i, frame in enumerate(frames):
            for out, _pts in session.push(frame[None], [i]):
                writer.write(out)
                written += 1
                bar.update(1)
        for out, _pts in session.flush():
            writer.write(out)
            written += 1
            bar.update(1)
    writer.close()
    session.close()
    return written
