"""GStreamer's webrtcbin (Debian's 1.22) as a WHIP publisher and a WHEP viewer against `python -m
server` (tiny model, CPU): H.264 + Opus in through `POST /whip`, generated frames back through
`POST /whep/{session}`. webrtcbin has an RSA DTLS certificate, which aiortc as the DTLS client
cannot talk to (server/media/signaling.py, as_dtls_server).

The client runs in the system python3 (tests/gst_whip_client.py; PyGObject and GStreamer come from
Debian's packages, which `make test` installs through `make gstreamer`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN, ServerProcess

CLIENT = Path(__file__).with_name("gst_whip_client.py")
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
FRAMES = 10


def _gstreamer_missing() -> str:
    """Why the client cannot run here ('' when it can)."""
    try:
        done = subprocess.run([SYSTEM_PYTHON, str(CLIENT), "--check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON}: {exc}"
    return "" if done.returncode == 0 else (done.stdout + done.stderr).strip().splitlines()[-1]


def test_webrtcbin_publishes_over_whip_and_watches_over_whep(server: ServerProcess) -> None:
    missing = _gstreamer_missing()
    if missing:
        pytest.skip(f"GStreamer webrtcbin client unavailable ({missing}): run `make gstreamer`")
    done = subprocess.run(
        [SYSTEM_PYTHON, str(CLIENT), "--url", server.url, "--token", TEST_TOKEN, "--frames", str(FRAMES),
         "--timeout", "120", "--width", "320", "--height", "240"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    context = json.dumps(report, indent=1) + "\n" + done.stderr[-2000:]
    # Before the server took the DTLS server role, the 201 came and the handshake then failed
    # ("no shared cipher" in aiortc, "Fatal SSL error" in webrtcbin's dtlsdec).
    assert report["whip_status"] == 201, context
    assert report["publisher_state"] == "connected", context
    assert report["whep_status"] == 201 and report["viewer_state"] == "connected", context
    assert done.returncode == 0 and report["frames"] >= FRAMES, context
    assert report["frame_size"] == [320, 240], context  # the output comes back at the camera's size
    # Only generated frames are sent on WHEP: the server counted at least as many as arrived.
    assert report["session_kind"] == "whip" and report["session_frames_out"] >= FRAMES, context
    assert not report["errors"], context
    assert report["session_id"] not in {s["session_id"] for s in server.get("/api/sessions")["sessions"]}
