"""End to end over loopback: an aiortc client streams a synthetic camera to `python -m server`
(tiny model on CPU in its own engine process) and receives the generated video."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import numpy as np

from tests.conftest import MODEL_SIZE, RtcClient, ServerProcess, run_server


async def _streaming(client: RtcClient, frames: int, timeout: float = 90.0) -> None:
    await client.wait_for(lambda: len(client.frames) >= frames, timeout, f"{frames} generated frames")


def _session(server: ServerProcess, session_id: str) -> dict:
    return server.get(f"/api/sessions/{session_id}")


async def test_stream_round_trip(server: ServerProcess, rtc_clients) -> None:
    client: RtcClient = rtc_clients()
    sid = await client.connect(width=320, height=240, fps=12, prompt="a watercolor city")
    await _streaming(client, 12)
    await client.wait_for(lambda: any(s["ttff_ms"] for s in client.stats()), 10, "a stats message with TTFF")

    # Generated frames come back at the camera's size (output_size=camera), pts increasing.
    assert {(f.width, f.height) for f in client.frames} == {(320, 240)}
    pts = [f.pts for f in client.frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts
    pushed = client.stats()[-1]  # what the data channel pushed
    assert pushed["session_id"] == sid and 0 < pushed["ttff_ms"] < 60_000 and pushed["latency_ms"]["p50"] > 0

    info = _session(server, sid)
    stats = info["stats"]
    assert info["state"] == "streaming" and info["camera"] == {"width": 320, "height": 240}
    assert info["output"] == {"width": 320, "height": 240}
    assert stats["chunks"] >= 2 and stats["frames_out"] >= 12 and stats["frames_in"] > stats["frames_out"]
    assert stats["pushes"] in (stats["chunks"], stats["chunks"] + 1)  # a chunk's frames go together
    assert stats["engine"]["dit_ms"] > 0 and stats["engine_prompt"] == "a watercolor city"
    metrics = await _metrics(server)
    assert metrics["streamgen_ttff_seconds_count"] >= 1
    assert metrics["streamgen_output_frames_total"] >= 12
    assert metrics["streamgen_sessions"] >= 1


async def test_encode_ahead_pushes_frames_as_they_come_and_loses_none(tmp_path: Path, rtc_clients) -> None:
    """--encode-ahead: the server pushes camera frames to the engine as they come, so a chunk's encode
    starts before its last frame is in. Every frame still comes back once, in order; a chunk's frames
    count as pushed when its last one is (the latency breakdown's fill runs to there, as without)."""
    with run_server(tmp_path, "--encode-ahead") as server:
        client: RtcClient = rtc_clients(server.url)
        sid = await client.connect(width=160, height=120, fps=12, prompt="a watercolor city")
        await _streaming(client, 16)
        stats = _session(server, sid)["stats"]
        frames = stats["recent_frames"]
    pts = [f.pts for f in client.frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts
    # every push brings what waits, up to the chunk's end: far more pushes than chunks (without: as many)
    assert stats["chunks"] >= 3 and stats["pushes"] >= 2 * stats["chunks"], stats
    pushed: dict[float, int] = {}
    for f in frames:
        assert f["arrived"] <= f["pushed"] <= f["returned"] <= f["sent"]
        pushed[f["pushed"]] = pushed.get(f["pushed"], 0) + 1
    assert max(pushed.values()) >= 2, frames  # a chunk's frames share its push


async def test_two_sessions_get_only_their_own_frames(server: ServerProcess, rtc_clients) -> None:
    """Different cameras (size, content, frame rate) and prompts at once. Frames are told apart by
    their pts grid: A's camera runs at 10 fps (pts step 9000), B's at 13 fps (step ~6923), so a
    frame of one in the other's stream would fall off its grid. The engine's motion controller
    sees a still image for A (noise strength near s_max) and motion for B."""
    a, b = rtc_clients(), rtc_clients()
    sid_a, sid_b = await asyncio.gather(
        a.connect(width=192, height=144, fps=10, color=(200, 40, 40), prompt="prompt A"),
        b.connect(width=144, height=192, fps=13, prompt="prompt B"),
    )
    await asyncio.gather(_streaming(a, 10), _streaming(b, 10))

    assert {(f.width, f.height) for f in a.frames} == {(192, 144)}
    assert {(f.width, f.height) for f in b.frames} == {(144, 192)}
    for client, step in ((a, 90_000 / 10), (b, 90_000 / 13)):
        deltas = np.diff([f.pts for f in client.frames])
        off_grid = np.abs(deltas - np.round(deltas / step) * step)
        assert (deltas > 0).all() and (off_grid <= 6).all(), (step, deltas)  # the codec rounds pts by a few ticks

    info_a, info_b = _session(server, sid_a), _session(server, sid_b)
    assert info_a["stats"]["engine_prompt"] == "prompt A" and info_b["stats"]["engine_prompt"] == "prompt B"
    assert info_a["stats"]["engine"]["noise_strength"] > info_b["stats"]["engine"]["noise_strength"] + 0.03
    listed = {s["session_id"] for s in server.get("/api/sessions")["sessions"]}
    assert {sid_a, sid_b} <= listed


async def test_prompt_change_over_the_data_channel_applies_live(server: ServerProcess, rtc_clients) -> None:
    client: RtcClient = rtc_clients()
    sid = await client.connect(fps=12, prompt="a forest", params={"noise_strength": 0.8})
    await _streaming(client, 8)
    before = _session(server, sid)["stats"]
    assert before["engine_prompt"] == "a forest" and before["engine"]["noise_strength"] > 0.6

    update = {"prompt": "a neon city at night", "transition_chunks": 0, "noise_strength": 0.3, "motion_control": False}
    client.channel.send(json.dumps(update))
    await client.wait_for(lambda: any(m["type"] == "ack" for m in client.messages), 10, "an ack")

    def applied() -> bool:
        engine = _session(server, sid)["stats"]
        return engine["engine_prompt"] == update["prompt"] and abs(engine["engine"]["noise_strength"] - 0.3) < 1e-3

    await client.wait_for(applied, 30, "the engine to run with the new prompt and strength")
    after = _session(server, sid)
    assert after["session_id"] == sid and after["prompt"] == update["prompt"]
    assert after["params"]["noise_strength"] == 0.3 and after["params"]["motion_control"] is False
    assert after["stats"]["chunks"] - before["chunks"] <= 4  # within a few chunks, no restart
    n = len(client.frames)
    await _streaming(client, n + 4, timeout=30)  # and frames keep coming on the same session
    assert after["stats"]["frames_out"] >= before["frames_out"]


async def test_bad_requests_get_json_4xx_and_streams_go_on(server: ServerProcess, rtc_clients) -> None:
    client: RtcClient = rtc_clients()
    sid = await client.connect(fps=12)
    await _streaming(client, 4)
    url = server.url
    async with aiohttp.ClientSession() as http:

        async def expect(method: str, path: str, status: int, **kw) -> dict:
            async with http.request(method, url + path, **kw) as r:
                body = await r.json()
                assert r.status == status, (method, path, r.status, body)
                assert isinstance(body["error"], str) and body["error"]
                return body

        json_type = {"Content-Type": "application/json"}
        await expect("POST", "/api/offer", 415, data=b"{not json")  # JSON must say it is JSON
        await expect("POST", "/api/offer", 400, data=b"{not json", headers=json_type)
        await expect("POST", "/api/offer", 422, json=[1, 2])
        wrong = await expect("POST", "/api/offer", 422, json={"sdp": 5, "type": "offer"})
        assert {d["loc"] for d in wrong["details"]} == {"sdp"}
        await expect("POST", "/api/offer", 422, json={"sdp": "v=0", "type": "answer"})
        await expect("POST", "/api/offer", 400, json={"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer"})
        await expect("POST", "/api/offer", 400, json={"sdp": "\x00" * 50, "type": "offer"})
        await expect("POST", "/api/offer", 422, json={"sdp": "v=0", "type": "offer", "params": {"steps": 9}})
        await expect("POST", "/api/offer", 422, json={"sdp": "v=0", "type": "offer", "prompt": "x" * 5000})
        for method in ("GET", "PATCH", "DELETE"):
            await expect(method, "/api/sessions/not-a-session", 404, json={})
        for bad in ({"steps": 0}, {"noise_strength": 1.5}, {"seed": -1}, {"bogus": 1}, {"steps": "many"}):
            await expect("PATCH", f"/api/sessions/{sid}", 422, json=bad)
        await expect("PATCH", f"/api/sessions/{sid}", 400, data=b"\xff\xfe", headers=json_type)
        for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fserver/app.py", "/.hidden", "/js/../../tests/conftest.py"):
            await expect("GET", path, 404)
        async with http.patch(f"{url}/api/sessions/{sid}", json={"seed": 7}) as r:
            assert r.status == 200 and (await r.json())["params"]["seed"] == 7

    client.channel.send("not json")
    client.channel.send(json.dumps({"steps": 99}))
    await client.wait_for(lambda: sum(m["type"] == "error" for m in client.messages) >= 2, 10, "two errors")
    details = [m for m in client.messages if m["type"] == "error"][1]["details"]
    assert details[0]["loc"] == "steps"

    n = len(client.frames)
    await _streaming(client, n + 4, timeout=30)  # the session kept streaming through all that
    assert _session(server, sid)["state"] == "streaming"


async def test_delete_ends_the_session(server: ServerProcess, rtc_clients) -> None:
    client: RtcClient = rtc_clients()
    sid = await client.connect(fps=10)
    await client.wait_for(lambda: _session(server, sid)["stats"]["frames_in"] > 0, 30, "frames in")
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{server.url}/api/sessions/{sid}") as r:
            assert r.status == 204
        async with http.get(f"{server.url}/api/sessions/{sid}") as r:
            assert r.status == 404
    await client.wait_for(lambda: client.pc.connectionState in ("closed", "failed"), 30, "the peer to close")


async def test_health_metrics_and_page(server: ServerProcess) -> None:
    health = server.get("/healthz")
    assert health["status"] == "ok"
    info = server.get("/api/info")
    assert info["engine"]["model"] == "tiny" and info["engine"]["width"] == MODEL_SIZE
    assert info["random_weights"] is True and "RANDOM WEIGHTS" in info["notice"]
    metrics = await _metrics(server)
    for name in (
        "streamgen_sessions", "streamgen_input_fps", "streamgen_output_fps", "streamgen_engine_up",
        "streamgen_frame_latency_seconds_count", "streamgen_frame_jitter_seconds_count",
        "streamgen_deadline_misses_total", "streamgen_deadline_seconds",
    ):
        assert name in metrics, name
    assert metrics["streamgen_engine_up"] == 1 and metrics["streamgen_deadline_seconds"] == 1.0
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/") as r:
            assert r.status == 200 and "streamgen" in await r.text()
        async with http.get(server.url + "/js/app.js") as r:
            assert r.status == 200 and "javascript" in r.headers["Content-Type"]


def test_server_process_never_loads_torch(server: ServerProcess) -> None:
    """Read the mapped libraries: torch only in the engine child, aiohttp/aiortc only in the server."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    maps = {int(p): Path(f"/proc/{p}/maps").read_text() for p in [pid, *children]}
    engine = [p for p, m in maps.items() if "libtorch" in m]
    assert pid not in engine and len(engine) == 1
    assert "aiohttp" in maps[pid] and "aiohttp" not in maps[engine[0]] and "aiortc" not in maps[engine[0]]


async def _metrics(server: ServerProcess) -> dict[str, float]:
    """Unlabelled samples of /metrics by name (labelled ones summed), checking the text format."""
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-z_]+)(\{[^}]*\})? (\S+)', line)
        assert m, f"bad metrics line: {line!r}"
        if m.group(2) and "le=" in m.group(2):
            continue
        values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values
