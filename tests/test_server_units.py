"""Server pieces without WebRTC or an engine: sampling, pacing, imaging, metrics, config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interface.controls import StreamUpdate
from server.config import ServerConfig, parse_args, resolve_model, worker_options
from interface.imaging import crop_box, to_model_rgb
from server.media.imaging import output_size, to_output_frame
from server.ops.metrics import ServerMetrics, SessionMetrics
from server.media.pacing import PtsPacer
from server.media.sampling import ChunkSampler, spaced_indices
from server.media.controls import merge_updates

FRAME = 3000  # pts of one frame at 30 fps in the 90 kHz clock
STAGE_STATS = ("vae_encode_ms", "dit_ms", "vae_decode_ms")  # as an engine reports them in EngineInfo


# -- sampling ---------------------------------------------------------------------------------------


@given(st.integers(1, 200), st.integers(1, 8))
def test_spaced_indices_are_even_and_end_at_the_newest(n: int, k: int) -> None:
    if k > n:
        with pytest.raises(ValueError):
            spaced_indices(n, k)
        return
    idx = spaced_indices(n, k)
    assert len(idx) == k and idx[-1] == n - 1 and idx[0] >= 0
    gaps = np.diff([-1, *idx])
    assert (gaps >= 1).all() and gaps.max() - gaps.min() <= 1  # evenly spaced


def test_sampler_is_bounded_and_counts_what_it_skips() -> None:
    sampler: ChunkSampler[int] = ChunkSampler(max_frames=10)
    dropped = sum(sampler.add(i) for i in range(25))
    assert dropped == 15 and len(sampler) == 10
    chosen, skipped = sampler.take(4)
    assert chosen == [16, 19, 21, 24] and skipped == 6 and len(sampler) == 0


# -- pacing -----------------------------------------------------------------------------------------


def _burst(first: int, n: int = 4, spacing: int = FRAME) -> list[tuple[int, int]]:
    return [(first + i * spacing, first + i * spacing) for i in range(n)]


def _drain(pacer: PtsPacer, start: float, until: float, step: float = 0.001) -> list[tuple[float, int]]:
    sent, t = [], start
    while t <= until:
        item, _ = pacer.poll(t)
        if item is not None:
            sent.append((t, item[0]))
        t += step
    return sent


def test_pacer_spreads_a_burst_by_pts() -> None:
    pacer: PtsPacer[int] = PtsPacer()
    pacer.push(_burst(0), now=10.0)
    sent = _drain(pacer, 10.0, 10.2)
    assert [p for _, p in sent] == [0, 3000, 6000, 9000]
    assert np.allclose(np.diff([t for t, _ in sent]), 1 / 30, atol=0.002)
    assert pacer.dropped_late == 0


def test_pacer_drops_stale_frames_instead_of_queuing() -> None:
    pacer: PtsPacer[int] = PtsPacer()
    pacer.push(_burst(0), now=0.0)
    item, _ = pacer.poll(0.5)  # the sender was stuck for 0.5 s: all four are due, only the newest goes
    assert item is not None and item[0] == 9000
    assert pacer.dropped_late == 3 and len(pacer) == 0


def test_pacer_reanchors_when_latency_could_shrink() -> None:
    pacer: PtsPacer[int] = PtsPacer(max_lead_s=0.5)
    pacer.push(_burst(0), now=0.0)
    # The next burst's pts are 1 s ahead of the schedule's idea of now: wait less, drop the leftovers.
    pacer.push(_burst(120_000), now=0.01)
    item, wait = pacer.poll(0.011)
    assert item is not None and item[0] == 120_000 and pacer.resyncs == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 8), st.floats(0.0, 0.6), st.integers(1, 3)),  # burst size, gap s, pts stride
        min_size=1, max_size=30,
    ),
    st.floats(0.001, 0.2),
)
def test_pacer_invariants(bursts: list[tuple[int, float, int]], poll_every: float) -> None:
    """Whatever the engine and sender timing: pts go out increasing, nothing is sent before it is
    due, the queue stays bounded, and every frame is either sent, dropped or still queued."""
    pacer: PtsPacer[int] = PtsPacer(max_queue=16)
    now, pts, pushed, sent = 0.0, 0, 0, []
    for size, gap, stride in bursts:
        pacer.push(_burst(pts, size, FRAME * stride), now)
        pushed += size
        pts += size * FRAME * stride
        assert len(pacer) <= 16
        end = now + gap
        while now < end:
            item, wait = pacer.poll(now)
            if item is not None:
                assert pacer.due(item[0]) <= now + 1e-9
                sent.append(item[0])
            now += poll_every
    assert sent == sorted(set(sent))
    assert len(sent) + pacer.dropped_late + pacer.dropped_out_of_order + len(pacer) == pushed


def test_pacer_keeps_latency_bounded_when_the_sender_is_slower_than_the_frames() -> None:
    """Bursts of 4 frames every 133 ms, a sender that takes 100 ms per frame: no backlog builds up."""
    pacer: PtsPacer[int] = PtsPacer()
    arrivals: dict[int, float] = {}
    next_burst, pts, worst = 0.0, 0, 0.0
    for step in range(1000):
        now = step * 0.1
        while next_burst <= now:
            burst = _burst(pts)
            arrivals.update({p: now for p, _ in burst})
            pacer.push(burst, now)
            pts, next_burst = pts + 4 * FRAME, next_burst + 4 / 30
        item, _ = pacer.poll(now)
        if item is not None:
            worst = max(worst, now - arrivals[item[0]])
        assert len(pacer) <= 8
    assert worst < 0.35 and pacer.dropped_late > 1000


# -- imaging ----------------------------------------------------------------------------------------


def test_crop_box() -> None:
    assert crop_box(640, 480, 128, 128) == (80, 0, 480, 480)
    assert crop_box(480, 640, 128, 128) == (0, 80, 480, 480)
    assert crop_box(1280, 720, 832, 480) == (16, 0, 1248, 720)
    assert crop_box(832, 480, 832, 480) == (0, 0, 832, 480)


def test_to_model_rgb_center_crops_then_resizes() -> None:
    img = np.zeros((480, 640, 3), np.uint8)
    img[:, :80] = (255, 0, 0)  # the sides a square crop must cut away
    img[:, -80:] = (255, 0, 0)
    img[:, 80:-80] = (0, 0, 255)
    out = to_model_rgb(av.VideoFrame.from_ndarray(img, format="rgb24"), 128, 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    inner = out[:, 1:-1]  # the edge column may blend one source pixel of the border
    assert inner[..., 0].max() < 40 and inner[..., 2].min() > 200  # only the blue centre remains


def test_output_sizes_and_frames() -> None:
    assert output_size("camera", 640, 480, 128, 128) == (640, 480)
    assert output_size("crop", 640, 480, 128, 128) == (480, 480)
    assert output_size("model", 641, 481, 128, 128) == (128, 128)
    assert output_size("camera", 641, 481, 128, 128) == (640, 480)  # yuv420p needs even sizes
    frame = to_output_frame(np.full((128, 128, 3), 90, np.uint8), 320, 240)
    assert (frame.width, frame.height, frame.format.name) == (320, 240, "yuv420p")


_COUNT_SCALER_THREADS = """
import os, threading
import av, numpy as np
import sys, tempfile
from pathlib import Path
from engine.video_io import VideoWriter
from interface.imaging import scale, to_model_rgb
from server.media.imaging import to_output_frame
camera = av.VideoFrame.from_ndarray(np.zeros((1080, 1920, 3), np.uint8), format="rgb24").reformat(
    format="yuv420p", threads=1)
generated = np.zeros((512, 512, 3), np.uint8)
out = Path(tempfile.mkdtemp())
def convert():
    to_model_rgb(camera, 512, 512)  # the server's camera frames, and `engine render`'s file frames
    to_output_frame(generated, 1280, 720)
    scale(camera, 1280, 720, "rgb24")  # the outputs' (recordings, restreams, virtual camera)
    writer = VideoWriter(out / "a.npz", 1280, 720, 30)  # `engine render`'s output at the input's size (an
    writer.write(generated)                            # .mp4's H.264 encoder has threads of its own)
    writer.close()
convert()  # imports and first-call setup out of the way
def count():
    return len(os.listdir("/proc/self/task"))
seen, done = set(), threading.Event()
def watch():
    while not done.is_set():
        seen.add(count())
watcher = threading.Thread(target=watch)
watcher.start()
before = count()  # this process's threads, the watcher included
for _ in range(20):
    convert()
done.set()
watcher.join()
print(before, max(seen))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or len(os.sched_getaffinity(0)) < 2,
                    reason="counts threads in /proc; needs 2 CPUs, where libswscale's automatic count starts threads")
def test_frame_conversions_start_no_threads() -> None:
    """A conversion runs on the thread that asks for it: libswscale's automatic thread count started a
    thread per CPU for every frame, inside the chunk's critical path (and in `engine render`)."""
    out = subprocess.run([sys.executable, "-c", _COUNT_SCALER_THREADS], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    before, peak = map(int, out.stdout.split())
    assert peak == before, f"threads rose from {before} to {peak} while frames were converted"


# -- metrics ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_session_metrics_ttff_latency_jitter_misses() -> None:
    clock, server = FakeClock(), ServerMetrics(deadline_s=1.0)
    m = SessionMetrics("s1", server, deadline_s=1.0, clock=clock, stage_stats=STAGE_STATS)
    for _ in range(10):
        m.input_arrived(clock.t)
        clock.t += 0.1
    m.drop("input", 6)
    clock.t = 100.5
    for arrival, sent in [(100.0, 100.5), (100.1, 100.8), (100.2, 101.4)]:  # latencies .5, .7, 1.2
        m.output_sent(arrival, sent)
    m.engine_chunk({"vae_encode_ms": 10.0, "dit_ms": 20.0, "vae_decode_ms": 30.0}, 0.07, "p", 1)
    clock.t = 101.5
    s = m.snapshot()
    assert s.ttff_ms == pytest.approx(500.0)
    assert s.latency_ms.p50 == pytest.approx(700.0) and s.latency_ms.max == pytest.approx(1200.0)
    assert s.jitter_ms.max == pytest.approx(500.0) and s.jitter_ms.p50 == pytest.approx(350.0)
    assert s.miss_rate == pytest.approx(1 / 3, abs=1e-3) and s.dropped["input"] == 6
    assert s.frames_in == 10 and s.frames_out == 3 and s.chunks == 1
    assert s.engine["dit_ms"] == 20.0 and s.latency_seq == 3 and len(s.recent_latency_ms) == 3

    text = server.render()
    assert "streamgen_ttff_seconds_count 1" in text
    assert 'streamgen_dropped_frames_total{reason="input"} 6' in text
    assert "streamgen_deadline_misses_total 1" in text
    assert 'streamgen_engine_stage_seconds_count{stage="dit"} 1' in text
    buckets = [int(v) for v in re.findall(r'streamgen_frame_latency_seconds_bucket\{le="[^"]+"\} (\d+)', text)]
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative, +Inf holds all


# -- config and controls ----------------------------------------------------------------------------


def test_model_choice_follows_the_weights_folder(tmp_path: Path) -> None:
    assert resolve_model(ServerConfig()) == ("tiny", None)
    assert resolve_model(ServerConfig(weights=tmp_path)) == ("tiny", None)  # folder lacks the model
    (tmp_path / "Wan2.1-T2V-1.3B").mkdir()
    assert resolve_model(ServerConfig(weights=tmp_path)) == ("wan-1.3b", tmp_path)
    assert resolve_model(ServerConfig(weights=tmp_path, model="tiny")) == ("tiny", None)  # tiny has none
    assert resolve_model(ServerConfig(model="wan-14b")) == ("wan-14b", None)  # random weights at real size
    assert worker_options(ServerConfig(devices="cuda:1")).device == "cuda:1"
    assert worker_options(ServerConfig(devices="cuda:0,1")).step_lag is None  # the engine process decides
    assert worker_options(parse_args(["--devices", "cuda:0,1", "--step-lag", "1"])).step_lag == 1
    with pytest.raises(SystemExit):
        parse_args(["--step-lag", "0"])


def test_cli_reads_a_config_file_and_flags_override_it(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("port: 9000\ndeadline_s: 0.5\nmodel: tiny\n")
    config = parse_args(["--config", str(cfg), "--port", "9100"])
    assert (config.port, config.deadline_s, config.model) == (9100, 0.5, "tiny")
    for bad in (["--devices", "tpu"], ["--model", "nope"], ["--port", "99999"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_merge_updates_keeps_the_latest_fields_and_a_reset() -> None:
    a = StreamUpdate(prompt="a", steps=2, reset=True)
    b = StreamUpdate(prompt="b", noise_strength=0.5)
    merged = merge_updates(a, b)
    assert (merged.prompt, merged.steps, merged.noise_strength, merged.reset) == ("b", 2, 0.5, True)


async def test_background_tasks_report_failures_and_cancel_on_close():
    import asyncio

    from server.media.tasks import BackgroundTasks

    errors: list[BaseException] = []
    tasks = BackgroundTasks(errors.append)

    async def fail() -> None:
        raise RuntimeError("boom")

    failing = tasks.spawn(fail())
    forever = tasks.spawn(asyncio.sleep(3600))
    with pytest.raises(RuntimeError):
        await failing
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert [str(e) for e in errors] == ["boom"]

    async def closer() -> bool:
        tasks.cancel_all()  # from inside one of its own tasks: that one goes on
        await asyncio.sleep(0)
        return True

    assert await tasks.spawn(closer())
    await asyncio.sleep(0)
    assert forever.cancelled() and len(errors) == 1


def test_a_chunks_cost_is_its_gpu_time_when_the_push_returned_sooner() -> None:
    """Admission counts what a chunk costs the engine: a CUDA engine's push returns once the chunk is
    queued, so its stage times, not the push's wall time, are the cost then."""
    from interface.messages import FramesOut
    from server.media.session import chunk_cost_s

    def reply(engine_ms: float, **stats: float) -> FramesOut:
        return FramesOut(session_id="s", first_seq=0, count=0, pts=[], chunk_frames=4, engine_ms=engine_ms, stats=stats)

    assert chunk_cost_s(reply(5.0, vae_encode_ms=14.0, dit_ms=9.0, vae_decode_ms=21.0, noise_strength=0.7),
                        STAGE_STATS) == pytest.approx(0.044)
    assert chunk_cost_s(reply(80.0, vae_encode_ms=14.0, dit_ms=9.0, vae_decode_ms=21.0), STAGE_STATS) == pytest.approx(0.080)
    assert chunk_cost_s(reply(30.0), STAGE_STATS) == pytest.approx(0.030)  # no stage times (a parallel engine's reply)


def test_a_pipeline_report_becomes_metrics_and_none_gives_no_samples() -> None:
    """What rank 0 reports (engine.parallel.rank0.Rank0.stats) reaches /metrics through the engine
    process's PipelineStats: blocks, stage times, CUDA graph use per rank, moves, batching, hop time."""
    from engine.protocol import BalanceStats, StageTimes
    from interface.messages import BlockDecision
    from engine.protocol import RankForwards, RingStats
    from engine.worker import pipeline_stats

    decision = BlockDecision(time=1.0, forward=5, boundary=0, blocks=-1, split_before=[2, 2], split_after=[3, 1],
                             slowest_ms_before=30.0, slowest_ms_predicted=25.0, stage_ms=[15.0, 30.0])
    rollback = decision.model_copy(update=dict(forward=20, blocks=1, split_before=[3, 1], split_after=[2, 2],
                                               rollback=True))
    balance = BalanceStats(enabled=True, split=[2, 2], decisions=[decision, rollback],
                           stage_ms=[StageTimes(10.0, 5.0, 15.0), StageTimes(4.0, 26.0, 30.0)])
    report = pipeline_stats(RingStats(
        world=2, devices=["cpu", "cpu"], split=[2, 2], blocks=["0-1", "2-3"], forwards=10, batched_forwards=2,
        early_frames=1, inflight=0, capacity=2, max_inflight=2, max_stream_overlap=1, sessions=1, hop_ms=0.5,
        graphs=[RankForwards(rank=0, replayed=7, eager=3), RankForwards(rank=1, replayed=6, eager=4)],
        moves=[], moves_total=2, balance=balance,
        batch={"forwards": {1: 8, 2: 2}, "waits": 3, "wait_ms": 12.5, "joined": 2},
    ))
    assert report is not None and [d.rollback for d in report.decisions] == [False, True]
    metrics = ServerMetrics(1.0)
    metrics.add_pipeline_gauges(lambda: report)
    text = metrics.render()
    for line in ('streamgen_pipeline_blocks{rank="1"} 2', 'streamgen_pipeline_stage_seconds{rank="1",part="other"} 0.026',
                 'streamgen_pipeline_rank_forwards{rank="1",blocks="graph"} 6',
                 'streamgen_pipeline_rank_forwards{rank="0",blocks="eager"} 3', "streamgen_pipeline_block_moves 2",
                 'streamgen_pipeline_forwards{sessions="several"} 2', 'streamgen_pipeline_forwards{sessions="one"} 8',
                 "streamgen_pipeline_rebalance 1", "streamgen_pipeline_hop_seconds 0.0005",
                 'streamgen_pipeline_batch_forwards{sessions="1"} 8', 'streamgen_pipeline_batch_forwards{sessions="2"} 2',
                 "streamgen_pipeline_batch_waits 3", "streamgen_pipeline_batch_wait_seconds 0.0125"):
        assert line in text, line
    assert pipeline_stats(None) is None  # before rank 0's first report
    one_device = ServerMetrics(1.0)
    one_device.add_pipeline_gauges(lambda: None)
    assert "streamgen_pipeline_blocks{" not in one_device.render()


def test_metrics_show_each_live_sessions_latency_by_number_not_by_id() -> None:
    """/metrics gives every live session's latency p50/p99 over its recent frames (checked against
    numpy's percentiles of the same latencies) and output rate, labelled 1, 2, ... in the order they
    opened: the session id, which lets a caller control the session, never appears there."""
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    server = ServerMetrics(1.0)
    a = SessionMetrics("secret-id-a", server, 1.0, clock)
    b = SessionMetrics("secret-id-b", server, 1.0, clock)
    server.add_session_gauges(lambda: [a, b])
    lat_a = [0.150 + 0.001 * i for i in range(30)]
    for i, lat in enumerate(lat_a):
        now[0] = 100.0 + i / 30
        a.output_sent(now[0] - lat, now[0])
    text = server.render()
    p50, p99 = np.percentile(lat_a, [50, 99])
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("streamgen_session_")}
    assert values['streamgen_session_latency_seconds{session="1",quantile="0.5"}'] == pytest.approx(p50)
    assert values['streamgen_session_latency_seconds{session="1",quantile="0.99"}'] == pytest.approx(p99)
    assert not any('session="2",quantile' in k for k in values)  # no frame out yet: no latency sample
    assert values['streamgen_session_output_fps{session="1"}'] > 0
    assert values['streamgen_session_output_fps{session="2"}'] == 0
    assert "secret-id" not in text
