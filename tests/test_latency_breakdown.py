"""The latency breakdown: the server's per-frame stage times (server/ops/metrics.py, in the session stats and
/metrics) and server_bench's table camera -> client decoder (bench/server_bench/breakdown.py), through the
real server (tiny model on CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.ops.metrics import FRAME_STAGES, ServerMetrics, SessionMetrics
from server.schemas import FrameTimes

REPO = Path(__file__).resolve().parents[1]


def test_session_metrics_time_each_stage_of_a_sent_frame() -> None:
    server = ServerMetrics(deadline_s=1.0)
    m = SessionMetrics("s1", server, deadline_s=1.0, clock=lambda: 10.0)
    # fill 100 ms, engine 40, output 5, pacing 20 (frame 1); 50, 60, 5, 0 (frame 2)
    frames = [FrameTimes(pts=3000, arrived=1.0, pushed=1.1, returned=1.14, delivered=1.145, sent=1.165),
              FrameTimes(pts=6000, arrived=1.033, pushed=1.083, returned=1.143, delivered=1.148, sent=1.148)]
    for t in frames:
        m.output_sent(t.arrived, t.sent, t)
    m.output_sent(2.0, 2.1)  # a frame without every stamp: its latency counts, its stages do not
    s = m.snapshot()
    assert set(s.stages_ms) == set(FRAME_STAGES) and s.frame_seq == 2 and s.latency_seq == 3
    assert s.stages_ms["fill"].mean == pytest.approx(75.0) and s.stages_ms["fill"].max == pytest.approx(100.0)
    assert s.stages_ms["engine"].mean == pytest.approx(50.0) and s.stages_ms["pacing"].max == pytest.approx(20.0)
    assert s.recent_frames == []  # the data channel's snapshot leaves the frames out
    assert m.snapshot(with_frames=True).recent_frames == frames
    text = server.render()
    assert 'streamgen_frame_stage_seconds_count{stage="output"} 2' in text
    engine_sum = re.search(r'streamgen_frame_stage_seconds_sum\{stage="engine"\} (\S+)', text)
    assert engine_sum is not None and float(engine_sum.group(1)) == pytest.approx(0.1)


@pytest.mark.slow
def test_server_bench_breaks_the_latency_down_and_the_stages_add_up(tmp_path: Path) -> None:
    out = tmp_path / "sb.json"
    cmd = [sys.executable, "-m", "bench.server_bench", "--model", "tiny", "--devices", "cpu", "--height", "64",
           "--width", "64", "--duration", "12", "--warmup", "3", "--prewarm", "0", "--fps", "10", "--camera",
           "160x128", "--timeout", "150", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    bd = result["breakdown"]
    stages = ["upstream", *FRAME_STAGES, "downstream"]
    assert list(bd["stages_ms"]) == stages and bd["frames"] >= 8, bd  # two shared cores: few
    assert all(bd["stages_min_ms"][s] >= 0 for s in stages), bd["stages_min_ms"]
    # Per frame the stages add up to the client's end-to-end latency: their means to its mean.
    assert bd["sum_of_means_ms"] == pytest.approx(bd["e2e_ms"]["mean"], abs=0.5)
    client_e2e = result["client"]["e2e_steady"]["latency_ms"]["mean"]
    assert bd["sum_of_means_ms"] == pytest.approx(client_e2e, rel=0.1, abs=20)
    # The server's own stage times agree with what the bench rebuilt from its frames.
    server_stages = result["session_final"]["stats"]["stages_ms"]
    assert set(server_stages) == set(FRAME_STAGES) and server_stages["engine"]["p50"] > 0
    assert 'streamgen_frame_stage_seconds_count{stage="pacing"}' in result["metrics_text"]
    # By default the bench's client completes frames on the marker bit, as a browser does.
    receiver = result["client"]["receiver"]
    assert receiver["kind"] == "marker" and receiver["frames_on_marker"] > 0 and receiver["frames_on_next"] == 0
    assert bd["stages_ms"]["downstream"]["p50"] < 50  # not a frame interval (100 ms at 10 fps)
    assert "where a frame’s time goes (ms)" in proc.stdout and "stages' means add up to" in proc.stdout
