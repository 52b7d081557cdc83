"""What a new user tripped on outside the page (issue 22): a port in use, `engine render`'s errors and
output size, --help, the WHIP resource's preflight, the access log, the admission message."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, ServerProcess
from tests.test_engine import cli, write_mp4


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- the server's command line ---------------------------------------------------------------------


def test_port_in_use_is_one_line_and_exit_2_before_the_engine_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "server", "--port", str(port), "--devices", "cpu", "--model", "tiny"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = _one_line(r.stderr)
    assert "already in use" in line and str(port) in line and "--port" in line
    assert r.stdout == ""  # nothing else ran: no log of the model or the engine
    assert time.monotonic() - t0 < 30


def test_server_help_says_what_the_token_guards_and_the_idle_default() -> None:
    r = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    token = re.search(r"\n\s+--token TOKEN\s+([^\n]+)", r.stdout)[1]
    assert "/metrics" in token and "WHEP" in token and "API" in token, token
    idle = re.search(r"\n\s+--idle-timeout IDLE_TIMEOUT_S\s+([^\n]+)", r.stdout)[1]
    assert "(default 20)" in idle, idle


def test_every_render_flag_has_help() -> None:
    from engine.__main__ import build_parser

    render = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["render"]
    missing = [a.option_strings[0] for a in render._actions if not a.help]
    assert missing == []


# -- engine render ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, message", [("text", "not a video file"), ("folder", "is a folder")])
def test_render_bad_input_is_one_clear_line(tmp_path: Path, kind: str, message: str) -> None:
    src = tmp_path / "clip.mp4"
    if kind == "text":
        src.write_text("not a video\n")
    else:
        src.mkdir()
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.npz"), "--prompt", "x", "--quiet")
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert message in line and str(src) in line and "Errno" not in line, line


def _render(src: Path, out: Path, *extra: str) -> np.ndarray:
    r = cli("render", "--input", str(src), "--output", str(out), "--prompt", "a cat", "--quiet",
            "--height", "32", "--width", "32", "--devices", "cpu", *extra)
    assert r.returncode == 0, r.stderr
    if out.suffix == ".npz":
        return np.load(out)["frames"]
    with av.open(str(out)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_render_output_size_input_scales_back_to_the_input(tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    write_mp4(src, 6, w=96, h=72)
    at_input = _render(src, tmp_path / "input.npz")  # the default, as the server answers at the camera's size
    at_model = _render(src, tmp_path / "model.npz", "--output-size", "model")
    assert at_input.shape == (6, 72, 96, 3) and at_model.shape == (6, 32, 32, 3)
    # The same picture, only scaled: PIL's resampling of the input-size frames back to the model's size
    # is close to what was generated (the engine is deterministic on the CPU with one seed).
    for big, small in zip(at_input, at_model):
        back = np.asarray(Image.fromarray(big).resize((32, 32), Image.BILINEAR), dtype=np.float64)
        assert np.abs(back - small).mean() < 12, np.abs(back - small).mean()
    assert _render(src, tmp_path / "o.mp4").shape == (6, 72, 96, 3)


# -- HTTP -----------------------------------------------------------------------------------------------


async def test_whip_resource_preflight_lets_patch_through_to_its_405() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from server.outputs.whip import add_routes

    app = web.Application()
    add_routes(app)
    async with TestClient(TestServer(app)) as client:
        r = await client.options("/whip/abc", headers={"Origin": "https://example.org",
                                                       "Access-Control-Request-Method": "PATCH"})
        assert r.status == 204
        assert "PATCH" in r.headers["Access-Control-Allow-Methods"]
        assert "PATCH" not in r.headers["Allow"]  # what the resource supports: PATCH is answered 405
        r = await client.options("/whep/abc/def", headers={"Access-Control-Request-Method": "PATCH"})
        assert "PATCH" in r.headers["Access-Control-Allow-Methods"]


def test_polls_are_not_logged_at_info_but_changes_and_errors_are(server: ServerProcess) -> None:
    for _ in range(3):
        server.get("/api/sessions")
    server.get("/api/info")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(server.url + "/api/sessions/no-such-session", method="DELETE"))
    assert err.value.code == 404
    time.sleep(0.5)
    log = server.log.read_text()
    assert '"DELETE /api/sessions/no-such-session' in log and " 404 " in log  # still at INFO
    assert '"GET /api/sessions ' not in log and '"GET /api/info ' not in log


# -- admission -------------------------------------------------------------------------------------------


def test_admission_refuses_by_measured_load_unless_turned_off(tmp_path: Path) -> None:
    """Two running sessions that each need 100 ms of a 133 ms chunk budget leave no room for a third:
    503. With `admission: off` (the capacity benchmark) only max_sessions limits."""
    from types import SimpleNamespace

    from server.config import ServerConfig, worker_options
    from server.errors import ApiError
    from server.state import AppState

    def state(**config) -> AppState:
        cfg = ServerConfig(target_fps=30, max_sessions=3, **config)
        st = AppState(cfg, worker_options(cfg), tmp_path)
        for i in range(2):
            st.sessions[f"s{i}"] = SimpleNamespace(closed=False, engine_chunk_s=0.1, chunk_budget_s=4 / 30)
        return st

    with pytest.raises(ApiError) as refused:
        state().check_capacity()
    assert refused.value.status == 503 and "capacity" in str(refused.value)
    state(admission="off").check_capacity()  # admitted
    full = state(admission="off")
    full.sessions["s2"] = SimpleNamespace(closed=False, engine_chunk_s=0.1, chunk_budget_s=4 / 30)
    with pytest.raises(ApiError, match="full"):
        full.check_capacity()


def test_capacity_message_is_honest_about_sessions_already_over_budget() -> None:
    from server.state import capacity_message

    budget = 4 / 12  # a steady chunk of 4 frames at 12 fps
    over = capacity_message(need_s=2.0, budget_s=budget, running=1, target_fps=12, headroom=0.9)
    # the running session alone needs 1 s a chunk: 3x over, so it gets 4 fps, not 12
    assert "already needs 1000 ms" in over and "3.0x the 333 ms" in over and "about 4.0 fps" in over, over
    for advice in ("end a session", "smaller size", "fewer steps"):
        assert advice in over
    near = capacity_message(need_s=0.32, budget_s=budget, running=1, target_fps=12, headroom=0.9)
    assert "with one more session a chunk would need 320 ms" in near and "90% of the 333 ms" in near, near
    assert "already" not in near and "fewer steps" in near
