"""The WebRTC server end to end (docs/ARCHITECTURE.md §9, issue 3 item 8): the real server and its engine on one
GPU, one aiortc client sending a synthetic 30 fps camera over loopback, the generated video coming
back. Reports TTFF, per-frame latency (mean/p50/p95/p99), jitter p99, the miss rate at the 1.0 s
deadline, FPS in/out, drops and engine stage times.

    python -m bench.server_bench --json out/server_bench.json            # GPU: wan-1.3b, 512², 1 step, 60 s
    python -m bench.server_bench --model tiny --devices cpu --duration 15 --json /tmp/sb.json

How it works:
- starts `python -m server --model M --devices D --host 127.0.0.1 --port P --config CFG` in its own
  process group (CFG, a JSON file, sets height/width/deadline: the CLI has no flags for them),
  logs to --log, and waits for /healthz (the engine warms up first);
- optionally (--prewarm S, default 5) streams a throwaway session for S seconds, because the
  engine's own warm-up runs the model's default step count and a 1-step session has other shapes;
  server counters are then taken as differences from after the pre-warm;
- connects one client (POST /api/offer with `params.steps`) with a `control` data channel, sends
  a camera (moving stripes and a frame counter drawn as blocks) at --fps for --duration seconds
  and records every generated frame that comes back;
- polls GET /api/sessions/{id} every 0.5 s: its `latency_seq` / `recent_latency_ms` let the whole
  series of per-frame server latencies (camera frame arrival -> generated frame handed to the
  encoder, matched by pts inside the server) be rebuilt, not only the server's last-600 window;
- client side: TTFF (first frame handed to our encoder -> first generated frame decoded) and an
  end-to-end latency per frame. The server carries each frame's pts through to its output, and
  RTP keeps pts differences, so the client tags its frames with pts n*step + 10*c_n (c_n a seeded
  random digit, < 1 ms) and finds the one offset that maps the received pts onto the sent ones;
- at the end reads the final session stats and /metrics (Prometheus text).

Where the numbers differ: the server's latency runs from a camera frame's arrival at the server to
the generated frame being handed to its encoder. The client's adds both encodes, decodes and the
transport, and aiortc's receive jitter buffer, which releases a frame only when the first packet of
the next one arrives (on both legs: about one frame interval each, more after a chunk's last frame).

Everything goes to --json; a short table is printed last. A hard timeout bounds the whole run and
the server's process group is killed on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fractions
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLOCK_RATE = 90_000
PAPER = {  # StreamDiffusionV2 paper, 1 H100, 1.3B, 512², 1 step (arXiv 2511.07399)
    "latency_mean_ms": 357.0,
    "latency_p99_ms": 585.0,
    "jitter_p99_ms": 132.0,
    "miss_rate": 0.002,
    "fps_out": 26.21,
}
log = logging.getLogger("server_bench")


class BenchError(RuntimeError):
    pass


# -- the server process -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server` in its own process group (the engine is its child), killed on stop()."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                     "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    def exited(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> Optional[int]:
        """SIGINT (the server closes its sessions and stops the engine), then SIGKILL the group."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return None
            pgid = proc.pid  # start_new_session: the group id is the server's pid
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("server did not stop in %.0f s: killing it", grace_s)
            # Whatever is left of the group (the engine process, or the server itself).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            return proc.returncode


# -- the client ---------------------------------------------------------------------------------------


class CameraTrack:
    """Factory for an aiortc video track: moving stripes + a frame counter (16 bits as 16x16 blocks
    in the top-left corner) at a fixed rate. Frame n has pts n*step + code[n] (90 kHz), code[n] a
    seeded multiple of 10 ticks below 100 (< 1.2 ms), so received pts can be matched to sent ones."""

    def __init__(self, width: int, height: int, fps: int, seed: int = 1234) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.step = CLOCK_RATE // fps
        self._rng = np.random.default_rng(seed)
        self.codes: list[int] = []
        self.pts: list[int] = []
        self.sent_at: list[float] = []  # when frame n was handed to the encoder (time.monotonic)
        self.started_at: Optional[float] = None
        self.stopped = False
        x = np.arange(width, dtype=np.int32)[None, :]
        y = np.arange(height, dtype=np.int32)[:, None]
        self._x, self._y = np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width))

    def code(self, n: int) -> int:
        while len(self.codes) <= n:
            self.codes.extend((self._rng.integers(0, 10, 1024) * 10).tolist())
        return self.codes[n]

    def image(self, n: int) -> np.ndarray:
        x = self._x + 6 * n
        y = self._y + 3 * n
        img = np.empty((self.height, self.width, 3), dtype=np.uint8)
        img[..., 0] = (x * 2) % 256
        img[..., 1] = (y * 3) % 256
        img[..., 2] = ((x // 32 + y // 32) % 2) * 180 + 40
        block = 16
        for bit in range(16):
            x0 = bit * block
            if x0 + block <= self.width and block <= self.height:
                img[:block, x0 : x0 + block] = 255 if (n >> bit) & 1 else 0
        return img

    def make(self) -> Any:
        from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
        from av import VideoFrame

        camera = self

        class _Track(MediaStreamTrack):
            kind = "video"

            async def recv(self) -> VideoFrame:
                if self.readyState != "live" or camera.stopped:
                    raise MediaStreamError
                n = len(camera.sent_at)
                if camera.started_at is None:
                    camera.started_at = time.monotonic()
                await asyncio.sleep(max(0.0, camera.started_at + n / camera.fps - time.monotonic()))
                frame = VideoFrame.from_ndarray(camera.image(n), format="rgb24")
                pts = n * camera.step + camera.code(n)
                frame.pts, frame.time_base = pts, fractions.Fraction(1, CLOCK_RATE)
                camera.pts.append(pts)
                camera.sent_at.append(time.monotonic())
                return frame

        return _Track()


@dataclass
class Client:
    url: str
    camera: CameraTrack
    received_at: list[float] = field(default_factory=list)
    received_pts: list[int] = field(default_factory=list)
    sizes: set = field(default_factory=set)
    messages: list[dict] = field(default_factory=list)
    session_id: str = ""
    pc: Any = None
    channel: Any = None
    _tasks: list = field(default_factory=list)

    async def connect(self, http: Any, prompt: str, params: dict, timeout: float) -> dict:
        from aiortc import RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError

        self.pc = pc = RTCPeerConnection()  # no ICE servers: host candidates only
        self.channel = pc.createDataChannel("control")

        @self.channel.on("message")
        def on_message(m: Any) -> None:
            with contextlib.suppress(ValueError, TypeError):
                self.messages.append(json.loads(m))

        pc.addTrack(self.camera.make())

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind != "video":
                return

            async def receive() -> None:
                while True:
                    try:
                        f = await track.recv()
                    except MediaStreamError:
                        return
                    self.received_at.append(time.monotonic())
                    self.received_pts.append(int(f.pts) if f.pts is not None else -1)
                    if len(self.sizes) < 8:
                        self.sizes.add((f.width, f.height))

            self._tasks.append(asyncio.ensure_future(receive()))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "prompt": prompt, "params": params}
        async with http.post(self.url + "/api/offer", json=body, timeout=_timeout(timeout)) as r:
            answer = await r.json()
            if r.status != 200:
                raise BenchError(f"offer refused: HTTP {r.status}: {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        self.session_id = answer["session_id"]
        return answer

    async def close(self) -> None:
        self.camera.stopped = True
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 10)
        for t in self._tasks:
            t.cancel()


def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


# -- measurements -------------------------------------------------------------------------------------


def percentiles_ms(values: list[float] | np.ndarray) -> dict[str, Optional[float]]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": int(arr.size), "mean": round(float(arr.mean()), 2), "p50": round(float(p50), 2),
            "p95": round(float(p95), 2), "p99": round(float(p99), 2), "max": round(float(arr.max()), 2)}


def series_stats(latency_ms: list[float], contiguous: list[bool], deadline_ms: float) -> dict:
    """Latency percentiles, jitter (|Δ| of consecutive latencies, only where no sample is missing
    in between) and the share over the deadline."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    jit = [abs(lat[i] - lat[i - 1]) for i in range(1, lat.size) if contiguous[i]]
    return {
        "latency_ms": percentiles_ms(lat),
        "jitter_ms": percentiles_ms(jit),
        "miss_rate": round(float((lat > deadline_ms).mean()), 5) if lat.size else None,
        "misses": int((lat > deadline_ms).sum()),
    }


class SessionPoller:
    """Rebuilds the server's full per-frame latency series from successive session snapshots."""

    def __init__(self) -> None:
        self.latency_ms: list[float] = []
        self.contiguous: list[bool] = []  # False where samples before this one were missed
        self.sample_time: list[float] = []  # poll time at which the sample was seen (monotonic)
        self.missed = 0
        self.last_seq = 0
        self.polls: list[dict] = []  # compact time series
        self.last: Optional[dict] = None

    def add(self, info: dict, now: float, t0: float) -> None:
        stats = info["stats"]
        self.last = info
        seq, recent = int(stats.get("latency_seq", 0)), list(stats.get("recent_latency_ms", []))
        new = seq - self.last_seq
        if new > 0:
            take = recent[-new:] if new <= len(recent) else recent
            gap = new - len(take)
            self.missed += gap
            for i, v in enumerate(take):
                self.contiguous.append(bool(self.latency_ms) and not (gap and i == 0))
                self.latency_ms.append(float(v))
                self.sample_time.append(now)
            self.last_seq = seq
        self.polls.append({
            "t": round(now - t0, 3), "state": info.get("state"), "frames_in": stats["frames_in"],
            "frames_out": stats["frames_out"], "chunks": stats["chunks"], "fps_in": stats["fps_in"],
            "fps_out": stats["fps_out"], "dropped": stats["dropped"], "engine": stats["engine"],
        })

    def rate(self, key: str, since: float, t0: float) -> Optional[float]:
        """Frames per second of a counter between the first poll at/after `since` and the last."""
        rows = [p for p in self.polls if p["t"] >= since - t0]
        if len(rows) < 2 or rows[-1]["t"] <= rows[0]["t"]:
            return None
        return round((rows[-1][key] - rows[0][key]) / (rows[-1]["t"] - rows[0]["t"]), 2)


def match_received(sent_pts: list[int], received_pts: list[int], tol: int = 3, probe: int = 90) -> tuple[list[int], int]:
    """Index into sent_pts of every received frame (-1 if none), and the offset's support.

    Received pts = sent pts - a constant (RTP and the server keep differences), so try each sent
    frame as the one the first received frame came from and keep the offset that matches most."""
    if not sent_pts or not received_pts:
        return [-1] * len(received_pts), 0
    s = np.asarray(sent_pts, dtype=np.int64)
    r = np.asarray(received_pts, dtype=np.int64)
    r = r - r[0]
    head = r[:probe]

    def nearest(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.clip(np.searchsorted(s, targets), 1, len(s) - 1) if len(s) > 1 else np.zeros_like(targets)
        if len(s) > 1:
            left = np.abs(s[i - 1] - targets) <= np.abs(s[i] - targets)
            i = np.where(left, i - 1, i)
        return i, np.abs(s[i] - targets)

    best, best_score = 0, -1
    for m0 in range(len(s)):
        _, d = nearest(head + s[m0])
        score = int((d <= tol).sum())
        if score > best_score:
            best, best_score = m0, score
    idx, d = nearest(r + s[best])
    return [int(i) if ok else -1 for i, ok in zip(idx, d <= tol)], best_score


def client_stats(client: Client, deadline_ms: float, warmup_s: float) -> dict:
    cam = client.camera
    out: dict[str, Any] = {
        "frames_sent": len(cam.sent_at), "frames_received": len(client.received_at),
        "received_sizes": sorted(client.sizes),
    }
    if cam.sent_at and len(cam.sent_at) > 1:
        out["fps_in"] = round((len(cam.sent_at) - 1) / (cam.sent_at[-1] - cam.sent_at[0]), 2)
    if not client.received_at or not cam.sent_at:
        return out
    first_rx = client.received_at[0]
    out["ttff_ms"] = round(1000 * (first_rx - cam.sent_at[0]), 1)
    end = client.received_at[-1]
    steady = [t for t in client.received_at if t >= first_rx + warmup_s]
    if len(steady) > 1 and end > steady[0]:
        out["fps_out"] = round((len(steady) - 1) / (end - steady[0]), 2)
    out["fps_out_all"] = round((len(client.received_at) - 1) / max(1e-9, end - first_rx), 2)
    gaps = np.diff(client.received_at) * 1000 if len(client.received_at) > 1 else np.array([])
    out["interframe_ms"] = percentiles_ms(gaps)
    idx, support = match_received(cam.pts, client.received_pts)
    matched = [(i, k) for k, i in enumerate(idx) if i >= 0]
    probe = min(90, len(client.received_pts))
    out["pts_match"] = {"matched": len(matched), "of": len(idx), "offset_support": f"{support}/{probe}"}
    if matched and support >= 0.8 * probe:
        lat = [1000 * (client.received_at[k] - cam.sent_at[i]) for i, k in matched]
        contiguous = [False] + [True] * (len(lat) - 1)
        out["e2e_all"] = series_stats(lat, contiguous, deadline_ms)
        keep = [j for j, (i, k) in enumerate(matched) if client.received_at[k] >= first_rx + warmup_s]
        if keep:
            out["e2e_steady"] = series_stats([lat[j] for j in keep], [False] + [True] * (len(keep) - 1), deadline_ms)
        out["first_output_of_sent_frame"] = matched[0][0]
    else:
        out["pts_match"]["note"] = "received pts did not map onto sent pts: no client-side per-frame latency"
    return out


# -- Prometheus text ----------------------------------------------------------------------------------

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, tuple], float]:
    samples: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        with contextlib.suppress(ValueError):
            samples[(m.group(1), labels)] = float(m.group(4))
    return samples


def metrics_delta(after: dict, before: Optional[dict], gauges: set[str]) -> dict:
    """Counters and histograms as after - before; gauges as they are now."""
    if not before:
        return dict(after)
    out = {}
    for key, v in after.items():
        name = key[0]
        out[key] = v if name in gauges else v - before.get(key, 0.0)
    return out


def _get(samples: dict, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, tuple(sorted(labels.items()))))


def histogram_summary(samples: dict, name: str, scale: float = 1000.0, **labels: str) -> dict:
    count = _get(samples, name + "_count", **labels) or 0.0
    total = _get(samples, name + "_sum", **labels) or 0.0
    buckets = []
    for (n, lab), v in samples.items():
        d = dict(lab)
        if n == name + "_bucket" and all(d.get(k) == val for k, val in labels.items()):
            le = d.get("le", "")
            buckets.append((math.inf if le == "+Inf" else float(le), v))
    buckets.sort()
    out = {"count": int(count), "mean_ms": round(scale * total / count, 2) if count else None}
    for q in (0.5, 0.99):  # upper bucket bound: coarse, but from the server's own histogram
        bound = next((b for b, c in buckets if count and c >= q * count), None)
        out[f"p{int(q * 100)}_le_ms"] = None if bound is None else (None if math.isinf(bound) else bound * scale)
    return out


def summarize_metrics(samples: dict) -> dict:
    frames_out = _get(samples, "streamgen_output_frames_total") or 0.0
    misses = _get(samples, "streamgen_deadline_misses_total") or 0.0
    dropped = {dict(lab).get("reason", ""): int(v) for (n, lab), v in samples.items() if n == "streamgen_dropped_frames_total"}
    stages = {}
    for stage in ("vae_encode", "dit", "vae_decode"):
        stages[stage] = histogram_summary(samples, "streamgen_engine_stage_seconds", stage=stage)
    info = [dict(lab) for (n, lab), v in samples.items() if n == "streamgen_engine_info" and v]
    return {
        "input_frames": int(_get(samples, "streamgen_input_frames_total") or 0),
        "output_frames": int(frames_out),
        "chunks": int(_get(samples, "streamgen_engine_chunks_total") or 0),
        "deadline_s": _get(samples, "streamgen_deadline_seconds"),
        "deadline_misses": int(misses),
        "miss_rate": round(misses / frames_out, 5) if frames_out else None,
        "dropped": dropped,
        "ttff": histogram_summary(samples, "streamgen_ttff_seconds"),
        "latency": histogram_summary(samples, "streamgen_frame_latency_seconds"),
        "jitter": histogram_summary(samples, "streamgen_frame_jitter_seconds"),
        "engine_stage": stages,
        "engine_chunk_roundtrip": histogram_summary(samples, "streamgen_engine_chunk_seconds"),
        "session_errors": int(_get(samples, "streamgen_session_errors_total") or 0),
        "engine_info": info[0] if info else None,
    }


GAUGES = {"streamgen_sessions", "streamgen_input_fps", "streamgen_output_fps", "streamgen_engine_up",
          "streamgen_engine_info", "streamgen_deadline_seconds"}


# -- the run ------------------------------------------------------------------------------------------


def environment() -> dict:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
    }
    for pkg in ("torch", "aiortc", "aioice", "av", "aiohttp", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[pkg] = importlib.metadata.version(pkg)
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            env["gpus"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
    return env


async def _get_json(http: Any, url: str, timeout: float = 10.0) -> tuple[int, Any]:
    async with http.get(url, timeout=_timeout(timeout)) as r:
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, None


async def wait_ready(http: Any, server: ServerProcess, url: str, timeout: float) -> dict:
    started = time.monotonic()
    last: Any = None
    failed_since: Optional[float] = None
    while True:
        code = server.exited()
        if code is not None:
            raise BenchError(f"the server exited ({code}) while starting:\n{server.log_tail()}")
        with contextlib.suppress(OSError, asyncio.TimeoutError, Exception):
            status, last = await _get_json(http, url + "/healthz", 5)
            if status == 200 and isinstance(last, dict) and last.get("status") == "ok":
                log.info("server ready after %.1f s", time.monotonic() - started)
                return last
        engine = last.get("engine") if isinstance(last, dict) else None
        if engine == "failed":
            failed_since = failed_since or time.monotonic()
            tail = server.log_tail(20000)
            if "cannot start" in tail or "giving up" in tail or time.monotonic() - failed_since > 30:
                raise BenchError(f"the engine failed: {last.get('error')}\n{server.log_tail()}")
        else:
            failed_since = None
        if time.monotonic() - started > timeout:
            raise BenchError(f"server not ready after {timeout:.0f} s (last /healthz: {last}):\n{server.log_tail()}")
        await asyncio.sleep(0.5)


async def stream_session(http: Any, url: str, args: argparse.Namespace, seconds: float, t0: float,
                         poller: Optional[SessionPoller], seed: int) -> tuple[Client, Optional[dict]]:
    """Connect a client, stream for `seconds` (after the first generated frame if wait_first), poll."""
    camera = CameraTrack(args.camera_width, args.camera_height, args.fps, seed=seed)
    client = Client(url, camera)
    params = {"steps": args.steps, "seed": args.seed}
    if args.noise_strength is not None:
        params["noise_strength"] = args.noise_strength
    final: Optional[dict] = None
    try:
        await client.connect(http, args.prompt, params, timeout=120)
        sid = client.session_id
        log.info("session %s: streaming %dx%d at %d fps for %.0f s", sid, args.camera_width, args.camera_height,
                 args.fps, seconds)
        begin = time.monotonic()
        next_log = begin + 10
        while True:
            now = time.monotonic()
            if camera.started_at is None and now - begin > args.connect_timeout:
                raise BenchError(f"the camera did not start in {args.connect_timeout:.0f} s (ICE/DTLS?)")
            started = camera.started_at or now
            if now - started >= seconds:
                break
            if now - begin > seconds + args.connect_timeout and not client.received_at:
                raise BenchError(f"no generated frame after {now - begin:.0f} s:\n" + _server_log_hint(args))
            if server_died():
                raise BenchError("the server exited during the run")
            if poller is not None:
                status, info = await _get_json(http, f"{url}/api/sessions/{sid}")
                if status == 200 and info:
                    poller.add(info, time.monotonic(), t0)
                    if info.get("state") in ("closed", "failed"):
                        raise BenchError(f"session ended: {info.get('state')}: {info.get('error')}")
            if now >= next_log:
                log.info("t=%4.0f s: sent %d, received %d", now - started, len(camera.sent_at), len(client.received_at))
                next_log += 10
            await asyncio.sleep(args.poll_s)
        # Final snapshot while the camera still runs (its fps windows are live).
        status, info = await _get_json(http, f"{url}/api/sessions/{sid}")
        if status == 200 and info:
            final = info
            if poller is not None:
                poller.add(info, time.monotonic(), t0)
    finally:
        await client.close()
    return client, final


_SERVER: Optional[ServerProcess] = None


def server_died() -> bool:
    return _SERVER is not None and _SERVER.exited() is not None


def _server_log_hint(args: argparse.Namespace) -> str:
    return _SERVER.log_tail() if _SERVER else ""


async def run(args: argparse.Namespace, server: ServerProcess, url: str, result: dict) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        result["healthz"] = await wait_ready(http, server, url, args.startup_timeout)
        _, result["server_info"] = await _get_json(http, url + "/api/info")
        engine = (result["server_info"] or {}).get("engine") or {}
        log.info("engine: %s", engine)

        if args.prewarm > 0:
            log.info("pre-warm session for %.0f s (not measured)", args.prewarm)
            pre, _ = await stream_session(http, url, args, args.prewarm, time.monotonic(), None, seed=99)
            result["prewarm"] = {"seconds": args.prewarm, "frames_sent": len(pre.camera.sent_at),
                                 "frames_received": len(pre.received_at)}
            await _wait_sessions_gone(http, url, 15)
        async with http.get(url + "/metrics", timeout=_timeout(10)) as r:
            before = parse_prometheus(await r.text())

        poller = SessionPoller()
        t0 = time.monotonic()
        client, final = await stream_session(http, url, args, args.duration, t0, poller, seed=args.seed + 1234)
        async with http.get(url + "/metrics", timeout=_timeout(10)) as r:
            metrics_text = await r.text()
        after = parse_prometheus(metrics_text)
        if client.session_id:
            with contextlib.suppress(Exception):
                async with http.delete(f"{url}/api/sessions/{client.session_id}", timeout=_timeout(10)):
                    pass

    deadline_ms = 1000.0 * args.deadline
    first_rx = client.received_at[0] if client.received_at else None
    result["client"] = client_stats(client, deadline_ms, args.warmup)
    result["client"]["stats_messages"] = sum(1 for m in client.messages if m.get("type") == "stats")
    server_series = series_stats(poller.latency_ms, poller.contiguous, deadline_ms)
    steady_idx = [i for i, t in enumerate(poller.sample_time) if first_rx is not None and t >= first_rx + args.warmup + args.poll_s]
    result["server_series"] = {
        "all": server_series,
        "steady": series_stats([poller.latency_ms[i] for i in steady_idx],
                               [False] + [poller.contiguous[i] for i in steady_idx[1:]], deadline_ms),
        "samples": len(poller.latency_ms), "missed_samples": poller.missed,
        "fps_in_steady": poller.rate("frames_in", (first_rx or t0) + args.warmup, t0),
        "fps_out_steady": poller.rate("frames_out", (first_rx or t0) + args.warmup, t0),
        "latency_ms_values": [round(v, 1) for v in poller.latency_ms],
    }
    engine_rows = [p["engine"] for p in poller.polls if p["engine"]]
    result["engine_stage_ms_median_of_polls"] = {
        k: round(float(np.median([e[k] for e in engine_rows if k in e])), 2)
        for k in ("vae_encode_ms", "dit_ms", "vae_decode_ms", "chunk_ms") if any(k in e for e in engine_rows)
    }
    result["session_final"] = final
    result["metrics"] = summarize_metrics(metrics_delta(after, before, GAUGES))
    result["metrics_text"] = metrics_text
    result["polls"] = poller.polls


async def _wait_sessions_gone(http: Any, url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, body = await _get_json(http, url + "/api/sessions")
        if status == 200 and not (body or {}).get("sessions"):
            return
        await asyncio.sleep(0.3)
    log.warning("the pre-warm session is still listed after %.0f s", timeout)


# -- report -------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, int)) and not isinstance(v, bool):
        return f"{float(v):.{digits}f}"
    return str(v)


def table(result: dict) -> str:
    s = result.get("server_series", {}).get("all", {})
    ss = result.get("server_series", {})
    c = result.get("client", {})
    ce = c.get("e2e_all", {})
    m = result.get("metrics", {})
    fin = (result.get("session_final") or {}).get("stats", {})
    eng = result.get("engine_stage_ms_median_of_polls", {})
    pct = lambda x: None if x is None else 100.0 * x  # noqa: E731
    lat, jit = s.get("latency_ms", {}), s.get("jitter_ms", {})
    clat, cjit = ce.get("latency_ms", {}), ce.get("jitter_ms", {})
    paper = PAPER
    rows = [
        ("TTFF (ms)", fin.get("ttff_ms"), c.get("ttff_ms"), None),
        ("latency mean (ms)", lat.get("mean"), clat.get("mean"), paper["latency_mean_ms"]),
        ("latency p50 (ms)", lat.get("p50"), clat.get("p50"), None),
        ("latency p95 (ms)", lat.get("p95"), clat.get("p95"), None),
        ("latency p99 (ms)", lat.get("p99"), clat.get("p99"), paper["latency_p99_ms"]),
        ("jitter p99 (ms)", jit.get("p99"), cjit.get("p99"), paper["jitter_p99_ms"]),
        (f"miss rate >{result['args']['deadline']:.1f} s (%)", pct(s.get("miss_rate")), pct(ce.get("miss_rate")), pct(paper["miss_rate"])),
        ("fps in (steady)", ss.get("fps_in_steady"), c.get("fps_in"), None),
        ("fps out (steady)", ss.get("fps_out_steady"), c.get("fps_out"), paper["fps_out"]),
        ("frames in / out", f"{m.get('input_frames')}/{m.get('output_frames')}",
         f"{c.get('frames_sent')}/{c.get('frames_received')}", None),
    ]
    head = f"{'':26s}{'server':>14s}{'client e2e':>14s}{'paper':>10s}"
    lines = [head, "-" * len(head)]
    for name, a, b, p in rows:
        digits = 2 if "miss" in name else 1
        lines.append(f"{name:26s}{_fmt(a, digits):>14s}{_fmt(b, digits):>14s}{_fmt(p, digits):>10s}")
    d = m.get("dropped", {})
    lines.append(f"dropped: input {d.get('input')}, late {d.get('late')}, engine {d.get('engine')};"
                 f" server samples {ss.get('samples')} (missed {ss.get('missed_samples')}),"
                 f" client pts matched {c.get('pts_match', {}).get('matched')}/{c.get('pts_match', {}).get('of')}")
    lines.append("engine ms/chunk (median): " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in eng.items()))
    info = (result.get("server_info") or {}).get("engine") or {}
    lines.append(f"engine: {info.get('model')} {info.get('width')}x{info.get('height')} on {info.get('device')} "
                 f"({info.get('dtype')}, {info.get('attention')}), session steps {result['args']['steps']}, "
                 f"random weights {info.get('random_weights')}; gpus {result.get('env', {}).get('gpus', '-')}")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.server_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wan-1.3b", help="tiny, wan-1.3b, wan-14b (random weights unless --weights)")
    p.add_argument("--weights", help="weights folder (optional; speed does not depend on weight values)")
    p.add_argument("--devices", default="cuda", help="cpu, cuda or cuda:N")
    p.add_argument("--height", type=int, default=None, help="model height (default 512; tiny: the model's own)")
    p.add_argument("--width", type=int, default=None, help="model width (default 512; tiny: the model's own)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps of the session (1-4)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of camera streaming measured")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the first output excluded from steady fps/latency")
    p.add_argument("--prewarm", type=float, default=5.0, help="seconds of a throwaway session first (0: none)")
    p.add_argument("--fps", type=int, default=30, help="camera frame rate")
    p.add_argument("--camera", default="640x480", help="camera size WxH")
    p.add_argument("--prompt", default="a watercolor painting of a city street, soft colors")
    p.add_argument("--noise-strength", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=1.0, help="per-frame deadline in seconds (miss rate)")
    p.add_argument("--output-size", default="camera", choices=["camera", "crop", "model"], help="server output_size")
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for /healthz")
    p.add_argument("--connect-timeout", type=float, default=120.0, help="extra seconds allowed for the first frame")
    p.add_argument("--timeout", type=float, default=None, help="hard limit for the whole run (default: derived)")
    p.add_argument("--poll-s", type=float, default=0.5, help="session stats polling interval")
    p.add_argument("--json", type=Path, default=None, help="write everything here")
    p.add_argument("--log", type=Path, default=None, help="server log (default: next to --json, .server.log)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for python -m server")
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.camera.lower().split("x"))
    except ValueError:
        p.error(f"--camera {args.camera!r}: expected WxH")
    args.camera_width, args.camera_height = w, h
    if args.model != "tiny":
        args.height = args.height or 512
        args.width = args.width or 512
    if not 1 <= args.steps <= 4:
        p.error("--steps must be 1..4")
    if args.timeout is None:
        args.timeout = args.startup_timeout + args.prewarm + args.duration + args.connect_timeout + 60
    if args.log is None:
        if args.json is not None:
            args.log = args.json.with_name(args.json.stem + ".server.log")
        else:
            args.log = Path(tempfile.mkdtemp(prefix="server_bench-")) / "server.log"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    global _SERVER
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)

    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    config = {"deadline_s": args.deadline, "output_size": args.output_size, "max_sessions": 4}
    if args.height:
        config["height"] = args.height
    if args.width:
        config["width"] = args.width
    config_path = args.log.with_name(args.log.stem + ".config.json")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "server", "--model", args.model, "--devices", args.devices,
           "--host", "127.0.0.1", "--port", str(port), "--config", str(config_path), "--log-level", "INFO"]
    if args.weights:
        cmd += ["--weights", args.weights]
    cmd += args.server_arg
    server = _SERVER = ServerProcess(cmd, args.log)

    result: dict[str, Any] = {
        "benchmark": "server_bench", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_cmd": cmd, "server_config": config, "server_log": str(args.log), "paper": PAPER,
        "env": environment(),
    }
    status = 1

    # Hard limit: even if the event loop hangs, kill the server and leave.
    def watchdog() -> None:
        print(f"server_bench: hard timeout of {args.timeout:.0f} s reached: killing the server", file=sys.stderr, flush=True)
        server.stop(grace_s=5)
        _write(args, result | {"error": f"hard timeout {args.timeout:.0f} s"})
        os._exit(3)

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()
    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        log.info("starting: %s (log %s)", " ".join(cmd), args.log)
        server.start()
        asyncio.run(asyncio.wait_for(run(args, server, url, result), args.timeout - 30))
        status = 0
    except (BenchError, asyncio.TimeoutError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log.error("%s", result["error"])
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        log.error("interrupted")
    except Exception as exc:  # report and still clean up
        log.exception("benchmark failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["server_exit_code"] = server.stop()
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    _write(args, result)
    if "client" in result:
        print()
        print(table(result))
    print(f"\nserver log: {args.log}" + (f"\njson: {args.json}" if args.json else ""))
    return status


def _write(args: argparse.Namespace, result: dict) -> None:
    if args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
