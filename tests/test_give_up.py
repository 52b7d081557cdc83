"""A server that cannot serve exits non-zero, so Docker's restart policy or systemd restarts it
(issue #18, item 6): after more engine crashes in a row than allowed, and when the engine cannot
start at all. docs/RELIABILITY.md reports what this saw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, _free_port, run_server
from tests.test_reliability import engine_pid, healthy, record

EXIT_WITHIN_S = 20.0  # after the last crash: drain (nothing open) and exit


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_server_exits_1_when_the_engine_keeps_dying(tmp_path: Path) -> None:
    with run_server(tmp_path, "--engine-max-restarts", "1") as server:
        pid = server.process.pid
        first = engine_pid(pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)  # crash 1: restarted after 1 s
        deadline = time.monotonic() + 120
        while not (healthy(server) and engine_pid(pid) not in (None, first)):
            assert server.process.poll() is None, "the server gave up after one crash"
            assert time.monotonic() < deadline, "the engine was not restarted"
            time.sleep(0.3)
        second = engine_pid(pid)
        assert second is not None
        os.kill(second, signal.SIGKILL)  # crash 2 in a row: more than the 1 restart allowed
        killed_at = time.monotonic()
        code = server.process.wait(EXIT_WITHIN_S)
        exit_s = time.monotonic() - killed_at
        log = server.log.read_text()
    record("engine keeps dying", max_restarts=1, crashes=2, exit_code=code, exit_after_last_crash_s=f"{exit_s:.1f}")
    assert code == 1, log[-2000:]
    assert "drained" in log, log[-2000:]
    assert _last_line(log).startswith("error: the engine died 2 times in a row"), log[-2000:]


def test_server_exits_2_with_one_line_when_the_engine_cannot_start(tmp_path: Path) -> None:
    """What `make run ARGS='--model wan-1.3b --weights DIR'` does with a folder that has no weights."""
    empty = tmp_path / "weights"
    empty.mkdir()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "server", "--port", str(_free_port()), "--devices", "cpu", "--model", "wan-1.3b",
         "--weights", str(empty)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    took_s = time.monotonic() - started
    record("engine cannot start", exit_code=done.returncode, seconds=f"{took_s:.1f}", last_line=_last_line(done.stderr))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [_last_line(done.stderr)], done.stderr[-2000:]
    assert "missing weights folder" in errors[0] and str(empty) in errors[0], errors


def test_an_engine_failure_is_fatal_only_before_the_engine_was_ready() -> None:
    """EngineFailed while loading: no restart will help (exit 2). After ready (a pipeline rank
    died): a crash like any other, which the supervisor restarts."""
    from interface.messages import EngineFailed, WorkerOptions
    from server.media.engine_client import EngineClient

    loading = EngineClient(WorkerOptions())
    loading.state = "starting"
    loading._dispatch(EngineFailed(message="CheckpointError: missing weights folder"))
    assert loading.fatal and loading.state == "failed"
    assert loading.error == "engine failed to start: CheckpointError: missing weights folder"

    running = EngineClient(WorkerOptions())
    running.state = "ready"
    running._dispatch(EngineFailed(message="engine failed: rank 1 exited"))
    assert not running.fatal and running.state == "failed" and running.error == "engine failed: rank 1 exited"
