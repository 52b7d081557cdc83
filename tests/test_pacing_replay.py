"""bench/pacing_replay.py: recorded hand-over times replayed through the server's pacer."""

from __future__ import annotations

import json
from pathlib import Path

from bench.pacing_replay import main, replay, summary

FRAME_S = 1 / 30


def recording(late_every: int = 0, late_s: float = 0.06, chunks: int = 120) -> list[dict]:
    """A 30 fps camera cut in chunks of 4; each chunk handed over 50 ms after its last frame arrived
    (plus `late_s` for every `late_every`-th chunk), its frames 1 ms apart."""
    frames = []
    for c in range(chunks):
        ready = (4 * c + 3) * FRAME_S + 0.05 + (late_s if late_every and c % late_every == late_every - 1 else 0.0)
        for i in range(4):
            k = 4 * c + i
            frames.append({"pts": 3000 * k, "arrived": k * FRAME_S, "delivered": ready + 0.001 * i, "sent": None})
    return frames


def test_a_steady_stream_plays_at_its_first_frames_delay_plus_the_floor() -> None:
    frames = recording()
    sent, late = replay(frames, 100.0, 4.0)
    s = summary(frames, sent)
    # every frame as late as a chunk's first frame: 3 frame intervals of fill, 50 ms, the pacer's 4 ms floor
    expected_ms = 1000 * (3 * FRAME_S + 0.05 + 0.004)
    assert late == 0 and len(sent) == len(frames)
    assert abs(s["p50_ms"] - expected_ms) < 1.5 and abs(s["p99_ms"] - expected_ms) < 1.5, s
    assert abs(s["gap_p99_ms"] - 1000 * FRAME_S) < 1.5


def test_a_lower_percentile_lets_rare_late_chunks_through_late_for_less_delay() -> None:
    frames = recording(late_every=10)
    full = summary(frames, replay(frames, 100.0, 4.0)[0])
    lower = summary(frames, replay(frames, 95.0, 4.0)[0])
    # waiting for every chunk costs the late chunks' 60 ms on all frames; the 95th percentile does not
    assert full["p50_ms"] - lower["p50_ms"] > 40, (full, lower)
    assert lower["gap_p99_ms"] > full["gap_p99_ms"] + 30  # the price: the late chunks' frames come late


def test_the_cli_prints_a_row_per_setting(tmp_path: Path, capsys) -> None:
    frames = recording(late_every=10)
    for f, t in zip(frames, replay(frames, 100.0, 4.0)[0].values()):
        f["sent"] = t
    path = tmp_path / "cap.json"
    path.write_text(json.dumps({"details": [{"n": 1, "sessions": [{"frames": frames}]}]}))
    assert main([str(path), "--percentiles", "100,95"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out[1:]] == ["as", "replay", "replay"]
