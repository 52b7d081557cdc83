"""On a GPU, frames pushed before their chunk is whole go through the encoder's per-frame blocks at once,
and the push that completes the chunk runs only the rest: the encoder's back, one CUDA graph
(docs/ARCHITECTURE.md §8). Skipped without CUDA (the suite's CI machine has none; the GPU runs in
docs/BENCHMARKS.md run it)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.config import VAEConfig
from engine.runtime import EngineOptions, StreamEngine
from engine.vae import Encoder3d, WanVAE
from interface.controls import StreamParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: CUDA graphs and stream order")


def test_the_back_graph_gives_the_eager_latents() -> None:
    """Frames one at a time through the front (eager), the back replayed from its graph: the eager
    latents exactly, and within bf16 rounding those of chunks encoded whole (one graph each)."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=32)).to("cuda", torch.bfloat16).eval()
    video = torch.rand(1, 3, 25, 64, 64, device="cuda") * 2 - 1

    def stream(graphs: bool, ahead: bool) -> tuple[torch.Tensor, object]:
        vae.use_graphs = graphs
        state = vae.new_stream_state()
        outs = [vae.stream_encode(video[:, :, :1], state)]
        for lo in range(1, 25, 4):
            if ahead:
                for f in range(lo, lo + 3):
                    vae.stream_encode_ahead(video[:, :, f : f + 1], state)
                outs.append(vae.stream_encode(video[:, :, lo + 3 : lo + 4], state))
            else:
                outs.append(vae.stream_encode(video[:, :, lo : lo + 4], state))
        torch.cuda.synchronize()
        return torch.cat(outs, 2), state

    eager, _ = stream(False, True)
    graphed, state = stream(True, True)
    whole, _ = stream(True, False)
    vae.use_graphs = True
    assert torch.equal(graphed, eager)
    assert state.enc_graph.replays >= 3  # type: ignore[attr-defined]
    # bf16: a conv over one frame or four may round differently, and the roundings add up through the layers
    assert ((graphed.float() - whole.float()).norm() / whole.float().norm()).item() < 5e-2


def test_a_chunks_encode_runs_while_its_frames_arrive(monkeypatch) -> None:
    """The front is made slower on the GPU (a spin kernel per frame, timed by events): frames pushed as a
    camera brings them have their fronts run in the gaps, so the push that completes a chunk waits for
    one frame's spin; a chunk pushed whole waits for four (spins timed by events: a spin's length in
    clock cycles depends on the GPU's clock)."""
    engine = StreamEngine.create(EngineOptions(model="tiny", device="cuda", parallel=dict(inflight=1)))
    vae = engine.encoder
    vae.use_graphs = False
    spins: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    real_front = Encoder3d.front

    def slow_front(self, x, cache=None):
        if cache is not None and x.shape[2] < 5:  # a stream's later frames, not a whole clip
            for _ in range(x.shape[2]):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.cuda._sleep(100_000_000)  # GPU clock cycles: 0.05-0.3 s, by the clock
                end.record()
                spins.append((start, end))
        return real_front(self, x, cache)

    monkeypatch.setattr(Encoder3d, "front", slow_front)
    frames = np.random.default_rng(2).integers(0, 256, (13, 128, 128, 3), dtype=np.uint8)

    def completing_push_s(ahead: bool) -> float:
        s = engine.open_session("a lighthouse", StreamParams(steps=1))
        s.push(frames[:5], list(range(5)))
        s.flush()
        if ahead:
            for i in range(5, 8):
                s.push(frames[i : i + 1], [i])
                time.sleep(0.4)  # a camera's pace: the GPU has run this frame's front by the next
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = s.push(frames[8:9], [8]) + s.flush()
        else:
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = s.push(frames[5:9], list(range(5, 9))) + s.flush()
        took = time.perf_counter() - started
        s.close()
        assert [p for _, p in out][-4:] == [5, 6, 7, 8]
        return took

    ahead_s, whole_s = completing_push_s(True), completing_push_s(False)
    engine.close()
    torch.cuda.synchronize()
    spin_s = min(a.elapsed_time(b) for a, b in spins) / 1000.0
    assert spin_s > 0.03 and whole_s > 3 * spin_s  # the spins dominate the push that waits for four
    assert ahead_s < 0.6 * whole_s, (ahead_s, whole_s, spin_s)  # one frame's spin of four
