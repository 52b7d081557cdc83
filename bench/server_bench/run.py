"""The run: start the server, pre-warm, stream one measured session, collect, report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bench.server_bench import BenchError, __doc__ as DOC
from bench.server_bench.camera import CameraTrack
from bench.server_bench.client import Client, http_timeout
from bench.server_bench.latency import SessionPoller, client_stats, series_stats
from bench.server_bench.process import ServerProcess, free_port
from bench.server_bench.prometheus_text import GAUGES, metrics_delta, parse_prometheus, summarize_metrics
from bench.server_bench.report import PAPER, environment, table, write_json

log = logging.getLogger("server_bench")


async def _get_json(http: Any, url: str, timeout: float = 10.0) -> tuple[int, Any]:
    async with http.get(url, timeout=http_timeout(timeout)) as r:
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

async def stream_session(http: Any, server: ServerProcess, url: str, args: argparse.Namespace, seconds: float,
                         t0: float, poller: Optional[SessionPoller], seed: int) -> tuple[Client, Optional[dict]]:
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
                raise BenchError(f"no generated frame after {now - begin:.0f} s:\n" + server.log_tail())
            if server.exited() is not None:
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

async def run(args: argparse.Namespace, server: ServerProcess, url: str, result: dict) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        result["healthz"] = await wait_ready(http, server, url, args.startup_timeout)
        _, result["server_info"] = await _get_json(http, url + "/api/info")
        engine = (result["server_info"] or {}).get("engine") or {}
        log.info("engine: %s", engine)

        if args.prewarm > 0:
            log.info("pre-warm session for %.0f s (not measured)", args.prewarm)
            pre, _ = await stream_session(http, server, url, args, args.prewarm, time.monotonic(), None, seed=99)
            result["prewarm"] = {"seconds": args.prewarm, "frames_sent": len(pre.camera.sent_at),
                                 "frames_received": len(pre.received_at)}
            await _wait_sessions_gone(http, url, 15)
        async with http.get(url + "/metrics", timeout=http_timeout(10)) as r:
            before = parse_prometheus(await r.text())

        poller = SessionPoller()
        t0 = time.monotonic()
        client, final = await stream_session(http, server, url, args, args.duration, t0, poller, seed=args.seed + 1234)
        async with http.get(url + "/metrics", timeout=http_timeout(10)) as r:
            metrics_text = await r.text()
        after = parse_prometheus(metrics_text)
        if client.session_id:
            with contextlib.suppress(Exception):
                async with http.delete(f"{url}/api/sessions/{client.session_id}", timeout=http_timeout(10)):
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

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.server_bench", description=DOC.split("\n\n")[0])
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
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)

    port = args.port or free_port()
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
    server = ServerProcess(cmd, args.log)

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
        write_json(args, result | {"error": f"hard timeout {args.timeout:.0f} s"})
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
    write_json(args, result)
    if "client" in result:
        print()
        print(table(result))
    print(f"\nserver log: {args.log}" + (f"\njson: {args.json}" if args.json else ""))
    return status
