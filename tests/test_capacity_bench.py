"""bench.capacity: the SLO verdict, the N-loop's stop rule, the figure and the table (pure), and one
short run through the real server (tiny model on CPU, slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.capacity.run import parse_args
from bench.capacity.verdict import (SessionResult, Slo, StepResult, capacity, parse_n_range, session_failure,
                                    should_stop, step_passes, table)

REPO = Path(__file__).resolve().parents[1]
SLO = Slo(fps=30, fps_tolerance=0.03, p99_ms=300)


def ok(fps: float = 30.0, p99: float = 250.0) -> SessionResult:
    return SessionResult(session_id="s", fps_out=fps, latency_p50_ms=p99 / 2, latency_p99_ms=p99, jitter_p99_ms=20.0,
                         frames_sent=900, frames_received=890, dropped={"input": 3, "late": 1})


def step(n: int, *sessions: SessionResult, error: str | None = None) -> StepResult:
    return StepResult(n=n, sessions=list(sessions), error=error)


def test_session_verdict_fps_and_p99_bounds() -> None:
    assert session_failure(ok(), SLO) is None
    assert session_failure(ok(fps=29.1), SLO) is None  # 30 less 3%
    assert "fps" in session_failure(ok(fps=29.0), SLO)
    assert session_failure(ok(p99=300.0), SLO) is None
    assert "p99" in session_failure(ok(p99=300.5), SLO)
    assert session_failure(SessionResult(fps_out=30.0), SLO) == "no pts-matched latency"
    assert session_failure(SessionResult(latency_p99_ms=100.0), SLO) == "no steady output rate"


def test_step_passes_only_when_every_session_ran_and_held_the_slo() -> None:
    assert step_passes(step(2, ok(), ok()), SLO)
    assert not step_passes(step(2, ok(), ok(fps=20)), SLO)
    assert not step_passes(step(2, ok()), SLO)  # one of two sessions missing
    assert not step_passes(step(1, ok(), error="offer refused: HTTP 503"), SLO)


def test_stop_rule_and_capacity_figure() -> None:
    steps = [step(1, ok()), step(2, ok(), ok()), step(3, ok(), ok(), ok(p99=400)), step(4, *[ok()] * 4)]
    assert not should_stop(steps[1], SLO, keep_going=False)
    assert should_stop(steps[2], SLO, keep_going=False)
    assert not should_stop(steps[2], SLO, keep_going=True)
    # N=4 passing after N=3 failed (with --keep-going) does not raise the figure.
    assert capacity(steps, SLO) == 2
    assert capacity(steps[:2], SLO) == 2
    assert capacity([step(1, ok(fps=10))], SLO) == 0
    assert capacity([], SLO) == 0


def test_n_range() -> None:
    assert parse_n_range("1-6") == [1, 2, 3, 4, 5, 6]
    assert parse_n_range("1,2,4") == [1, 2, 4]
    assert parse_n_range("1-3,6,2") == [1, 2, 3, 6]
    for bad in ("0-2", "3-1", "x", ""):
        with pytest.raises(ValueError):
            parse_n_range(bad)


def test_table_rows_and_figure() -> None:
    steps = [step(1, ok(fps=30.0, p99=210.0)), step(2, ok(fps=29.8, p99=240.0), ok(fps=27.5, p99=320.0))]
    text = table(steps, SLO, "wan-1.3b 512x512")
    lines = text.splitlines()
    row1 = next(line for line in lines if line.strip().startswith("1 "))
    row2 = next(line for line in lines if line.strip().startswith("2 "))
    assert "1/1" in row1 and "30.0" in row1 and "210" in row1 and row1.endswith("pass")
    assert "1/2" in row2 and "27.5" in row2 and "320" in row2 and "FAIL" in row2 and "27.5 fps < 29.1" in row2
    assert " 4 " in row1  # drops: 3 input + 1 late
    assert lines[-1].endswith(": 1")


def test_cli_rejects_bad_options_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in ((["--n", "0-3"], "--n"), (["--fps", "12"], "below the SLO"),
                         (["--duration", "5"], "--duration"), (["--decoder", "nope"], "--decoder"),
                         (["--slo-p99-ms", "-1"], "SLO")):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    args, slo = parse_args(["--model", "tiny", "--devices", "cpu", "--n", "1-2", "--decoder", "taehv"])
    assert args.ns == [1, 2] and slo.p99_ms == 300.0 and args.decoder == "taehv"


def run_capacity(tmp_path: Path, args: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m bench.capacity` on the tiny model on CPU with a slow camera and an SLO any session meets;
    the finished process and its JSON."""
    out = tmp_path / "cap.json"
    cmd = [sys.executable, "-m", "bench.capacity", "--model", "tiny", "--devices", "cpu", "--warmup", "2", "--fps", "10",
           "--camera", "160x128", "--slo-fps", "0.5", "--slo-p99-ms", "60000", "--timeout", str(timeout),
           "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout + 30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_capacity_run_through_the_real_server(tmp_path: Path) -> None:
    """Two clients at once against `python -m server` (tiny, CPU): the run ends, the JSON holds both
    N with their sessions, and the table is printed last."""
    proc, result = run_capacity(tmp_path, ["--n", "1-2", "--keep-going", "--duration", "8", "--prewarm", "3"], 170)
    assert [s["n"] for s in result["steps"]] == [1, 2]
    assert [len(s["sessions"]) for s in result["steps"]] == [1, 2]
    ids = {x["session_id"] for s in result["steps"] for x in s["sessions"]}
    assert len(ids) == 3 and "" not in ids
    # Two shared cores may starve a session of output for 8 s; each camera ran, and video came back.
    assert all(x["frames_sent"] > 0 for s in result["steps"] for x in s["sessions"])
    assert sum(x["frames_received"] for s in result["steps"] for x in s["sessions"]) > 0
    assert [d["n"] for d in result["details"]] == [1, 2] and all("metrics" in d for d in result["details"])
    # CPU of the server, its engine and the clients' process, each with its main thread (Linux /proc)
    for d in result["details"]:
        cores = d["cpu_cores"]
        assert {"server", "server_main", "engine", "engine_main", "clients", "clients_main"} <= set(cores), cores
        assert cores["engine"] > 0 and cores["engine_main"] <= cores["engine"] + 0.05
    rows = [line.split()[:2] for line in proc.stdout.splitlines() if line[:3].strip() in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"] and rows[1][1].endswith("/2")
    assert result["server_config"]["max_sessions"] == 2
    figure = [line for line in proc.stdout.splitlines() if line.startswith("capacity (largest N")]
    assert figure == [f"capacity (largest N with every session within the SLO): {result['capacity']}"]
    # Each session's frames broken down camera -> screen: per frame the stages add up to its latency,
    # so their means add up to the end-to-end mean; the slowest session's table is printed per N.
    timed = [x["breakdown"] for d in result["details"] for x in d["sessions"] if x["breakdown"].get("frames")]
    assert timed, [x["breakdown"] for d in result["details"] for x in d["sessions"]]
    for bd in timed:
        assert set(bd["stages_ms"]) == {"upstream", "fill", "engine", "output", "pacing", "downstream"}
        assert abs(bd["sum_of_means_ms"] - bd["e2e_ms"]["mean"]) < 1.0, bd
    assert proc.stdout.count("where a frame’s time goes") == len(
        {d["n"] for d in result["details"] for x in d["sessions"] if x["breakdown"].get("frames")})


@pytest.mark.slow
def test_clients_join_staggered_and_the_first_streams_through_the_others_join(tmp_path: Path) -> None:
    """--stagger 3: the second client joins about 3 s after the first; the first keeps streaming until the
    second has had its --duration, so its session ran about 3 s longer (its window holds the join)."""
    _, result = run_capacity(tmp_path, ["--n", "2", "--stagger", "3", "--duration", "6", "--prewarm", "0"], 120)
    first, second = (s["final"]["stats"]["uptime_s"] for s in result["details"][0]["sessions"])
    assert 2.0 < first - second < 5.0, (first, second)
    assert "joining 3 s apart" in result["row"]
