"""On a GPU, a steady chunk's decode is two CUDA graphs, frame 0 and then frames 1-3, and frame 0 leaves
the engine while the others are still being decoded (docs/ARCHITECTURE.md §8). Skipped without CUDA
(the suite's CI machine has none; the GPU runs in docs/BENCHMARKS.md run it)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.config import VAEConfig
from engine.runtime import EngineOptions, StreamEngine
from engine.vae import WanVAE
from interface.controls import StreamParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: CUDA graphs and stream order")


def test_the_two_decode_graphs_give_the_eager_frames() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=32)).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 8, 16, 16, device="cuda")

    def stream(graphs: bool) -> tuple[list[torch.Tensor], object]:
        vae.use_graphs = graphs
        state = vae.new_stream_state()
        parts = list(vae.stream_decode_parts(latents[:, :, :2], state))
        for i in range(2, latents.shape[2]):
            parts += list(vae.stream_decode_parts(latents[:, :, i : i + 1], state))
        torch.cuda.synchronize()
        return parts, state

    eager, _ = stream(False)
    graphed, state = stream(True)
    vae.use_graphs = True
    assert [p.shape[2] for p in graphed] == [5] + [1, 3] * 6
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))
    assert state.dec_graph.replays >= 3  # type: ignore[attr-defined]


def slowed_decode(monkeypatch, engine: StreamEngine) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
    """Frames 1-3's decode made slower on the GPU: a spin kernel before it, timed by the events returned."""
    vae = engine.decoder
    vae.use_graphs = False  # the spin is a plain call here, not a replayed graph
    spins: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def slow_parts(latent, cache):
        parts = WanVAE._decode_parts(vae, latent, cache)
        yield next(parts)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(300_000_000)  # GPU clock cycles: 0.15-0.9 s, by the clock
        end.record()
        spins.append((start, end))
        yield next(parts)

    monkeypatch.setattr(vae, "_decode_parts", slow_parts)
    return spins


def spin_seconds(spins: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
    torch.cuda.synchronize()
    return min(a.elapsed_time(b) for a, b in spins) / 1000.0


def test_a_push_that_waits_hands_over_frame_0_first(monkeypatch) -> None:
    """The Python API: a push that waits for its chunk's frames (one chunk in flight) hands frame 0 to
    its `early` callback as soon as it is on the host, before frames 1-3 are decoded."""
    engine = StreamEngine.create(EngineOptions(model="tiny", device="cuda", parallel=dict(inflight=1)))
    spins = slowed_decode(monkeypatch, engine)
    s = engine.open_session("a lighthouse", StreamParams(steps=1))  # each chunk leaves in its own forward
    frames = np.random.default_rng(1).integers(0, 256, (13, 128, 128, 3), dtype=np.uint8)
    s.push(frames[:5], list(range(5)))
    handed: list[tuple[int, float]] = []
    out = s.push(frames[5:9], list(range(5, 9)), early=lambda got: handed.extend((p, time.perf_counter()) for _, p in got))
    returned = time.perf_counter()
    s.close()
    engine.close()
    assert [p for p, _ in handed] == [5] and [p for _, p in out] == [6, 7, 8]
    assert returned - handed[0][1] > 0.7 * spin_seconds(spins)


def test_a_chunks_first_frame_leaves_while_the_others_are_decoded(monkeypatch) -> None:
    """Frames 1-3's decode is made slower on the GPU (a spin kernel before it, timed by events around
    it): frame 0 of each steady chunk, whose copy to the host is queued between the two parts, leaves
    the engine about that much ahead of frames 1-3."""
    engine = StreamEngine.create(EngineOptions(model="tiny", device="cuda"))
    spins = slowed_decode(monkeypatch, engine)
    s = engine.open_session("a lighthouse")
    frames = np.random.default_rng(0).integers(0, 256, (21, 128, 128, 3), dtype=np.uint8)
    seen: dict[int, float] = {}
    for a, b in [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17), (17, 21)]:
        # a camera's pace: the next chunk comes after this one's frames are out (a push sooner would
        # wait for the frames of the chunk before, all of them, before it queued its own work)
        for _, p in s.offer(frames[a:b], list(range(a, b))):
            seen.setdefault(p, time.perf_counter())
        until = time.perf_counter() + 1.2
        while time.perf_counter() < until:
            for _, p in s.take_finished():
                seen.setdefault(p, time.perf_counter())
            time.sleep(0.001)
    s.close()
    engine.close()
    spin_s = spin_seconds(spins)
    assert spin_s > 0.1
    steady = [first for first in (5, 9, 13) if first in seen and first + 1 in seen]
    assert len(steady) >= 2, sorted(seen)
    for first in steady:
        assert seen[first + 1] - seen[first] > 0.7 * spin_s, (first, seen[first + 1] - seen[first], spin_s)
