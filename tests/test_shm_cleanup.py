"""Shared memory left by a server killed with its engine (issue #18, item 5): segment names say
their owner, and a starting server removes those whose owner is gone, nothing else.
docs/RELIABILITY.md reports what this saw."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import aiohttp

from interface.frame_ring import FrameRing
from interface.shm_owner import SHM_DIR, Owner, owned_name, owner_alive, parse_owner, remove_orphans, this_process
from tests.conftest import run_server
from tests.test_reliability import engine_pid, make_offer, record


def segments_of(pid: int) -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if (o := parse_owner(p.name)) is not None and o.pid == pid}


# -- the rules, on a folder of our own -------------------------------------------------------------


def test_a_ring_is_named_after_its_creator() -> None:
    with FrameRing.create(2, 16, 16) as ring:
        assert parse_owner(ring.name) == this_process()
        assert (SHM_DIR / ring.name).exists()


def test_only_our_names_of_dead_owners_are_removed(tmp_path: Path) -> None:
    me = this_process()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        live_child = Owner(me.pid_namespace, child.pid, int(fields[19]))
        names = {
            "mine": owned_name(me),
            "child": owned_name(live_child),
            "reused_pid": owned_name(Owner(me.pid_namespace, child.pid, live_child.start_ticks + 1)),
            "other_namespace": owned_name(Owner(me.pid_namespace + 1, 4_000_000, 1)),
            "python_default": "psm_0123abcd",
            "look_alike": "sg-1-2-3-notours",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x" * 10)
        assert owner_alive(live_child) and not owner_alive(parse_owner(names["reused_pid"]))
        assert remove_orphans(tmp_path) == [(names["reused_pid"], 10)]  # the child runs: only its impostor goes
        child.kill()
        child.wait()
        assert not owner_alive(live_child)
        assert remove_orphans(tmp_path) == [(names["child"], 10)]
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names["mine"], names["other_namespace"], names["python_default"], names["look_alike"]}
    finally:
        child.kill()
        child.wait()


# -- a real server killed with its engine ----------------------------------------------------------


async def open_session(url: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/api/offer", json={"sdp": await make_offer(), "type": "offer"}) as r:
            body = await r.json()
            assert r.status == 200, body
            return body["session_id"]


async def test_a_starting_server_removes_the_rings_of_a_killed_one(tmp_path: Path) -> None:
    for name in ("live", "doomed", "fresh"):
        (tmp_path / name).mkdir()
    foreign = shared_memory.SharedMemory(create=True, size=4096)  # not ours (Python's own name): kept
    try:
        with run_server(tmp_path / "live", "--idle-timeout", "300") as live:
            live_sid = await open_session(live.url)
            live_segments = segments_of(live.process.pid)
            assert len(live_segments) == 2  # its session's input and output rings
            ring_mb = sum((SHM_DIR / n).stat().st_size for n in live_segments) / 1e6

            with run_server(tmp_path / "doomed", "--idle-timeout", "300", new_group=True) as doomed:
                await open_session(doomed.url)
                pid = doomed.process.pid
                engine = engine_pid(pid)
                doomed_segments = segments_of(pid)
                assert engine is not None and len(doomed_segments) == 2
                os.killpg(pid, signal.SIGKILL)  # the server, its engine and Python's resource tracker
                doomed.process.wait(10)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{engine}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            left = {name for name in doomed_segments if (SHM_DIR / name).exists()}
            assert left == doomed_segments  # nothing removed them: the leak

            started = time.monotonic()
            with run_server(tmp_path / "fresh") as fresh:
                ready_s = time.monotonic() - started
                assert not any((SHM_DIR / name).exists() for name in doomed_segments)
                assert all((SHM_DIR / name).exists() for name in live_segments)  # a live server's rings
                assert (SHM_DIR / foreign.name.lstrip("/")).exists()
                assert live.get(f"/api/sessions/{live_sid}")["state"] in ("connecting", "streaming")
                assert re.search(r"removed \d+ shared-memory segments", fresh.log.read_text())
        record("shared memory after kill -9 of the group", left_by_killed=len(left), removed_by_next=len(left),
               live_server_kept=len(live_segments), foreign_kept=1, next_ready_s=f"{ready_s:.1f}",
               rings_mb_at_64x64=f"{ring_mb:.2f}")
    finally:
        foreign.close()
        foreign.unlink()
