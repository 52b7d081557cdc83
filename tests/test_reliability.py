"""Reliability under load and faults, against a real `python -m server` (tiny model, CPU):
connect/disconnect cycles with flat descriptors and memory, vanished clients, admission control
(503 + Retry-After), limits, an engine killed mid-stream, SIGTERM drain. docs/RELIABILITY.md
reports what these runs saw."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import aiohttp
import pytest

from tests.conftest import REPO, RtcClient, ServerProcess, run_server

IDLE_TIMEOUT_S = 3.0
CYCLES = 200
FULL_CYCLES = 5


# -- helpers -----------------------------------------------------------------------------------------


async def make_offer() -> str:
    """An SDP offer like the page's (camera sendrecv + control channel), never connected: posting
    it opens a real session (peer connection, shared-memory rings, engine session)."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.createDataChannel("control")
    pc.addTransceiver("video", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def shm_maps(pid: int) -> int:
    """Shared-memory segments (frame rings) the process has mapped."""
    return sum("/dev/shm/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def engine_pid(server_pid: int) -> Optional[int]:
    """The engine process: the server's child started by multiprocessing 'spawn'."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry)
    return None


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        await asyncio.sleep(0.2)


def healthy(server: ServerProcess) -> bool:
    try:
        return server.get("/healthz")["status"] == "ok"
    except OSError:
        return False


def record(name: str, **values: Any) -> None:
    """Numbers for docs/RELIABILITY.md, printed (pytest -s) and appended to $RELIABILITY_LOG."""
    line = f"[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
    print(line)
    if os.environ.get("RELIABILITY_LOG"):
        with open(os.environ["RELIABILITY_LOG"], "a") as out:
            out.write(line + "\n")


@pytest.fixture(scope="module")
def rserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No token (loopback), 3 sessions at most, 1 viewer each, a 3 s idle timeout, and a target of
    100 fps, which tiny on two cores cannot keep: once a session streams, the next is refused."""
    with run_server(tmp_path_factory.mktemp("reliability"), "--max-sessions", "3", "--max-viewers", "1",
                    "--idle-timeout", str(IDLE_TIMEOUT_S), "--target-fps", "100") as s:
        yield s


async def post_offer(http: aiohttp.ClientSession, url: str, sdp: str, **extra: Any) -> tuple[int, dict, Any]:
    async with http.post(url + "/api/offer", json={"sdp": sdp, "type": "offer", **extra}) as r:
        return r.status, await r.json(), r.headers


# -- load: connect/disconnect cycles ---------------------------------------------------------------


async def test_connect_disconnect_cycles_keep_fds_and_memory_flat(rserver: ServerProcess) -> None:
    pid = rserver.process.pid
    sdp = await make_offer()
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:

        async def cycle() -> None:
            status, body, _ = await post_offer(http, rserver.url, sdp)
            assert status == 200, body
            async with http.delete(f"{rserver.url}/api/sessions/{body['session_id']}") as r:
                assert r.status == 204

        for _ in range(10):  # warm-up: pools, caches, lazily imported codecs
            await cycle()
        fds0, rss0, shm0 = fd_count(pid), rss_kib(pid), shm_maps(pid)
        for _ in range(CYCLES):
            await cycle()
        await asyncio.sleep(1.0)
        fds1, rss1, shm1 = fd_count(pid), rss_kib(pid), shm_maps(pid)
    elapsed = time.monotonic() - started
    record("offer cycles", cycles=CYCLES, fds_before=fds0, fds_after=fds1, rss_kib_before=rss0,
           rss_kib_after=rss1, shm_before=shm0, shm_after=shm1, seconds=f"{elapsed:.1f}")
    assert rserver.get("/api/sessions")["sessions"] == []
    assert fds1 <= fds0 + 4, (fds0, fds1)
    assert shm1 == shm0, (shm0, shm1)
    assert rss1 - rss0 < 40_000, (rss0, rss1)  # KiB; a leak of one session each would show far more


async def test_full_webrtc_connects_keep_fds_flat(rserver: ServerProcess) -> None:
    pid = rserver.process.pid
    fds = []
    for i in range(FULL_CYCLES):
        client = RtcClient(rserver.url)
        sid = await client.connect(width=160, height=120, fps=12)
        await client.wait_for(lambda: len(client.frames) >= 4, 60, "generated frames")
        await client.close()
        await wait_until(lambda: not rserver.get("/api/sessions")["sessions"], 15, f"session {sid} to close")
        fds.append(fd_count(pid))
    record("full WebRTC connects", cycles=FULL_CYCLES, fds_after_each=fds, shm_after=shm_maps(pid))
    assert fds[-1] <= fds[0] + 4, fds
    assert shm_maps(pid) == 0


# -- vanished clients ------------------------------------------------------------------------------


async def test_a_client_that_vanishes_is_freed_within_seconds(rserver: ServerProcess) -> None:
    pid = rserver.process.pid
    fds0 = fd_count(pid)
    # 1. An offer whose client never connects (a tab closed mid-signaling).
    async with aiohttp.ClientSession() as http:
        status, body, _ = await post_offer(http, rserver.url, await make_offer())
    assert status == 200
    started = time.monotonic()
    await wait_until(lambda: not rserver.get("/api/sessions")["sessions"], IDLE_TIMEOUT_S + 5, "the idle session to close")
    never_connected_s = time.monotonic() - started
    # 2. A streaming client that stops sending and goes silent without closing (network gone).
    client = RtcClient(rserver.url)
    await client.connect(width=160, height=120, fps=12)
    await client.wait_for(lambda: len(client.frames) >= 2, 60, "generated frames")
    for sender in client.pc.getSenders():  # the camera hangs; the peer connection is left as is
        if sender.track is not None and sender.track.kind == "video":
            sender.track.recv = lambda: asyncio.get_running_loop().create_future()  # never resolves
    started = time.monotonic()
    await wait_until(lambda: not rserver.get("/api/sessions")["sessions"], IDLE_TIMEOUT_S + 8, "the silent session to close")
    silent_s = time.monotonic() - started
    await client.close()
    await asyncio.sleep(0.5)
    record("vanished clients", idle_timeout_s=IDLE_TIMEOUT_S, never_connected_freed_s=f"{never_connected_s:.1f}",
           silent_freed_s=f"{silent_s:.1f}", fds_before=fds0, fds_after=fd_count(pid), shm_after=shm_maps(pid))
    assert shm_maps(pid) == 0
    assert fd_count(pid) <= fds0 + 4


async def test_a_slow_answer_does_not_count_as_idle(tmp_path: Path) -> None:
    """Gathering the answer's candidates can take seconds (aioice waits up to 5 s for a STUN server
    that does not reply); the idle clock starts once the client has the answer, so a session is not
    closed before its client could send anything."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # a STUN server that never replies
        silent.bind(("127.0.0.1", 0))
        stun = f"stun:127.0.0.1:{silent.getsockname()[1]}"
        with run_server(tmp_path, "--idle-timeout", "2", "--ice-server", stun) as server:
            async with aiohttp.ClientSession() as http:
                started = time.monotonic()
                status, body, _ = await post_offer(http, server.url, await make_offer())
                answer_s = time.monotonic() - started
                assert status == 200, body
                async with http.get(f"{server.url}/api/sessions/{body['session_id']}") as r:
                    info = await r.json()
                    assert r.status == 200 and info["state"] != "failed", info
            assert answer_s > 2, answer_s  # the answer did take longer than the idle timeout
            await wait_until(lambda: not server.get("/api/sessions")["sessions"], 10, "the unconnected session to close")
    record("slow answer", answer_s=f"{answer_s:.1f}", idle_timeout_s=2)


# -- admission control -----------------------------------------------------------------------------


async def test_over_capacity_gets_503_with_retry_after(rserver: ServerProcess) -> None:
    sdp = await make_offer()
    async with aiohttp.ClientSession() as http:
        # Configured maximum: 3 sessions.
        ids = []
        for _ in range(3):
            status, body, _ = await post_offer(http, rserver.url, sdp)
            assert status == 200, body
            ids.append(body["session_id"])
        status, body, headers = await post_offer(http, rserver.url, sdp)
        assert status == 503 and int(headers["Retry-After"]) > 0 and "full" in body["error"], body
        full_refusal = body["error"]
        for sid in ids:
            await http.delete(f"{rserver.url}/api/sessions/{sid}")

        # Measured headroom: a streaming session's engine time per chunk is more than the 40 ms
        # budget of a 4-frame chunk at 100 fps, so one more would take its SLO: refused.
        client = RtcClient(rserver.url)
        await client.connect(width=160, height=120, fps=12)
        await client.wait_for(lambda: len(client.frames) >= 4, 60, "generated frames")
        status, body, headers = await post_offer(http, rserver.url, sdp)
        assert status == 503 and int(headers["Retry-After"]) > 0 and "capacity" in body["error"], body
        n = len(client.frames)
        await client.wait_for(lambda: len(client.frames) >= n + 4, 30, "the running session to go on")
        record("admission", refused_full=full_refusal, headroom_refusal=body["error"])
        await client.close()
        await wait_until(lambda: not rserver.get("/api/sessions")["sessions"], 15, "the session to close")
        status, body, _ = await post_offer(http, rserver.url, sdp)  # capacity is back
        assert status == 200, body
        await http.delete(f"{rserver.url}/api/sessions/{body['session_id']}")


async def test_limits(rserver: ServerProcess) -> None:
    sdp = await make_offer()
    async with aiohttp.ClientSession() as http:
        status, body, _ = await post_offer(http, rserver.url, sdp + "a=x-pad:" + "x" * 120_000 + "\r\n")
        assert status == 413, body
        async with http.post(rserver.url + "/api/offer", data=b"{" + b" " * (2 << 20) + b"}",
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
        status, body, _ = await post_offer(http, rserver.url, sdp, prompt="p" * 2001)
        assert status == 422, body
        status, body, _ = await post_offer(http, rserver.url, sdp)
        assert status == 200
        sid = body["session_id"]
        # Control messages per second (burst 40, then 20/s): a flood gets 429 + Retry-After.
        statuses = []
        for _ in range(60):
            async with http.patch(f"{rserver.url}/api/sessions/{sid}", json={"seed": 1}) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert r.headers["Retry-After"] == "1"
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 10, statuses
        record("control rate limit", patches=len(statuses), accepted=statuses.count(200), refused_429=statuses.count(429))
        # Viewers per session (1 here): a second WHEP offer takes the slot of the first, which never
        # connected (tests/test_whep_slots.py: the limits with viewers that do connect).
        viewer_sdp = await _viewer_offer()
        hdr = {"Content-Type": "application/sdp"}
        async with http.post(f"{rserver.url}/whep/{sid}", data=viewer_sdp, headers=hdr) as r:
            assert r.status == 201, await r.text()
            first = r.headers["Location"]
        async with http.post(f"{rserver.url}/whep/{sid}", data=viewer_sdp, headers=hdr) as r:
            assert r.status == 201, await r.text()
        async with http.delete(rserver.url + first) as r:
            assert r.status == 404
        assert rserver.get(f"/api/sessions/{sid}")["viewers"] == 1
        await http.delete(f"{rserver.url}/api/sessions/{sid}")


async def _viewer_offer() -> str:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


# -- engine crash ----------------------------------------------------------------------------------


async def test_engine_killed_mid_stream_recovers(rserver: ServerProcess) -> None:
    client = RtcClient(rserver.url)
    sid = await client.connect(width=160, height=120, fps=12)
    await client.wait_for(lambda: len(client.frames) >= 4, 60, "generated frames")
    old = engine_pid(rserver.process.pid)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    # The session is told (closed as failed) and the server keeps answering.
    await wait_until(lambda: not any(s["session_id"] == sid for s in rserver.get("/api/sessions")["sessions"]),
                     10, "the session to be closed")
    detected_s = time.monotonic() - killed_at
    assert rserver.get("/api/info")["engine_state"] in ("failed", "starting", "ready")
    await wait_until(lambda: healthy(rserver), 90, "the engine to be restarted")
    restarted_s = time.monotonic() - killed_at
    new = engine_pid(rserver.process.pid)
    assert new is not None and new != old
    await client.close()
    again = RtcClient(rserver.url)
    await again.connect(width=160, height=120, fps=12)
    await again.wait_for(lambda: len(again.frames) >= 4, 60, "frames from the restarted engine")
    await again.close()
    record("engine SIGKILL mid-stream", session_closed_s=f"{detected_s:.1f}", engine_ready_again_s=f"{restarted_s:.1f}",
           new_session_frames=len(again.frames))
    assert rserver.process.poll() is None
    await wait_until(lambda: not rserver.get("/api/sessions")["sessions"], 15, "the session to close")


# -- SIGTERM drain and maximum session length --------------------------------------------------------


async def test_max_session_length_and_sigterm_drain(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-session-seconds", "2") as server:
        pid = server.process.pid
        sdp = await make_offer()
        async with aiohttp.ClientSession() as http:
            status, body, _ = await post_offer(http, server.url, sdp)
            assert status == 200
            await wait_until(lambda: not server.get("/api/sessions")["sessions"], 8, "the session to reach its maximum length")
            status, body, _ = await post_offer(http, server.url, sdp)  # this one is open at SIGTERM
            assert status == 200
        engine = engine_pid(pid)
        assert engine is not None and shm_maps(pid) > 0
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(30)
        drained_s = time.monotonic() - started
        log = server.log.read_text()
        record("SIGTERM drain", exit_code=code, seconds=f"{drained_s:.1f}")
        assert code == 0, log[-2000:]
        assert drained_s < 15, drained_s
        assert "server shutting down" in log and "drained" in log, log[-2000:]
        assert not Path(f"/proc/{engine}").exists() or "zombie" in Path(f"/proc/{engine}/status").read_text().lower()
