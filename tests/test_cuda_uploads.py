"""On a GPU, a session's chunk is taken in without waiting for the work queued on the device before it
(docs/ARCHITECTURE.md §8): its upload and motion measure run on a stream of their own. Skipped without
CUDA (the suite's CI machine has none; the GPU runs in docs/BENCHMARKS.md run it)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.runtime import EngineOptions, StreamEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: stream order on a GPU")

SPIN_S = 0.5


def spin_cycles(seconds: float) -> int:
    """GPU clock cycles that torch.cuda._sleep spins for about `seconds` (measured here)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * seconds * 1000.0 / start.elapsed_time(end))


def stream(engine: StreamEngine, frames: np.ndarray, spin: int) -> tuple[float, list]:
    """One session over `frames` (13): frame 0, two chunks, then a chunk offered while the engine's
    stream spins for `spin` cycles; how long the offer took, and every output frame."""
    s = engine.open_session("a lighthouse")
    out = s.push(frames[:1], [0]) + s.push(frames[1:9], list(range(1, 9)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if spin:
        torch.cuda._sleep(spin)
    out += s.offer(frames[9:13], list(range(9, 13)))
    took = time.perf_counter() - t0
    out += s.flush()
    s.close()
    return took, out


def test_a_chunk_is_taken_in_while_the_device_works_on_earlier_ones() -> None:
    """Another session's forward is still running (here: a kernel spinning for half a second on the
    engine's stream): offering a chunk returns long before it ends, and the frames are those of the
    same stream with nothing else on the device."""
    engine = StreamEngine.create(EngineOptions(model="tiny", device="cuda"))
    h, w = engine.info.height, engine.info.width
    frames = np.random.default_rng(0).integers(0, 255, (13, h, w, 3), dtype=np.uint8)
    _, want = stream(engine, frames, 0)
    took, got = stream(engine, frames, spin_cycles(SPIN_S))
    engine.close()
    assert took < SPIN_S / 2, f"the offer waited {took:.3f} s for the device's earlier work"
    assert [p for _, p in got] == [p for _, p in want] == list(range(13))
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for (a, _), (b, _) in zip(got, want))
    assert worst <= 2, f"frames differ by up to {worst}"


def test_an_uploaded_chunk_equals_the_host_frames_even_from_a_strided_view() -> None:
    """The upload copies the host frames into pinned memory with numpy (engine/transfer.py): a strided
    view (frames cut from a larger array, as a crop is) arrives on the device exactly as given."""
    from engine.transfer import FrameIO

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (6, 40, 50, 3), dtype=np.uint8)
    frames = big[1:5, 3:35, 5:45]  # [4, 32, 40, 3], not contiguous
    assert not frames.flags.c_contiguous
    video = FrameIO(torch.device("cuda")).to_video_tensor(frames)
    expected = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    torch.testing.assert_close(video.cpu(), expected, rtol=0, atol=1e-6)
