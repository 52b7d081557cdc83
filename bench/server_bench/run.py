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
from typing import Any, Awaitable, Callable, Optional

import numpy as np

from bench.server_bench import BenchError, __doc__ as DOC
from bench.server_bench.breakdown import breakdown_table, frame_breakdown
from bench.server_bench.camera import CameraTrack
from bench.server_bench.client import Client, http_timeout
from bench.server_bench.latency import SessionPoller, client_stats, series_stats
from bench.server_bench.process import ServerProcess, free_port
from bench.server_bench.prometheus_text import GAUGES, metrics_delta, parse_prometheus, summarize_metrics
from bench.server_bench.report import PAPER, environment, table, write_json
from interface.catalogue import DECODERS, ENCODERS

log = logging.getLogger("server_bench")


async def get_json(http: Any, url: str, timeout: float = 10.0) -> tuple[int, Any]:
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
            status, last = await get_json(http, url + "/healthz", 5)
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

async def stream_sessions(http: Any, server: ServerProcess, url: str, args: argparse.Namespace, seconds: float,
                          t0: float, pollers: list[Optional[SessionPoller]],
                          seeds: list[int], stagger_s: float = 0.0) -> list[tuple[Client, Optional[dict]]]:
    """Connect one client per seed, at once or one every `stagger_s` seconds, stream each camera for
    `seconds` (the earlier ones go on until the last is done), poll each session (where its poller is
    not None). Returns each client with its session's final snapshot."""
    clients = [Client(url, CameraTrack(args.camera_width, args.camera_height, args.fps, seed=seed),
                      stock_receiver=args.stock_receiver) for seed in seeds]
    params = {"steps": args.steps, "seed": args.seed}
    if args.noise_strength is not None:
        params["noise_strength"] = args.noise_strength
    finals: list[Optional[dict]] = [None] * len(clients)
    try:
        if stagger_s > 0:
            for i, c in enumerate(clients):
                if i:
                    await asyncio.sleep(stagger_s)
                await c.connect(http, args.prompt, params, timeout=120)
        else:
            await asyncio.gather(*(c.connect(http, args.prompt, params, timeout=120) for c in clients))
        log.info("%d session(s) %s: streaming %dx%d at %d fps for %.0f s", len(clients),
                 ", ".join(c.session_id for c in clients), args.camera_width, args.camera_height, args.fps, seconds)
        begin = time.monotonic()
        next_log = begin + 10
        while True:
            now = time.monotonic()
            if any(c.camera.started_at is None for c in clients) and now - begin > args.connect_timeout:
                raise BenchError(f"a camera did not start in {args.connect_timeout:.0f} s (ICE/DTLS?)")
            if all(c.camera.started_at is not None and now - c.camera.started_at >= seconds for c in clients):
                break
            if now - begin > seconds + args.connect_timeout and not all(c.received_at for c in clients):
                raise BenchError(f"a session had no generated frame after {now - begin:.0f} s:\n" + server.log_tail())
            if server.exited() is not None:
                raise BenchError("the server exited during the run")
            for client, poller in zip(clients, pollers):
                if poller is None:
                    continue
                status, info = await get_json(http, f"{url}/api/sessions/{client.session_id}")
                if status == 200 and info:
                    poller.add(info, time.monotonic(), t0)
                    if info.get("state") in ("closed", "failed"):
                        raise BenchError(f"session {client.session_id} ended: {info.get('state')}: {info.get('error')}")
            if now >= next_log:
                log.info("t=%4.0f s: sent %s, received %s", now - begin, [len(c.camera.sent_at) for c in clients],
                         [len(c.received_at) for c in clients])
                next_log += 10
            await asyncio.sleep(args.poll_s)
        # Final snapshots while the cameras still run (their fps windows are live).
        for i, (client, poller) in enumerate(zip(clients, pollers)):
            status, info = await get_json(http, f"{url}/api/sessions/{client.session_id}")
            if status == 200 and info:
                finals[i] = info
                if poller is not None:
                    poller.add(info, time.monotonic(), t0)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return list(zip(clients, finals))

async def run(args: argparse.Namespace, server: ServerProcess, url: str, result: dict) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        result["healthz"] = await wait_ready(http, server, url, args.startup_timeout)
        _, result["server_info"] = await get_json(http, url + "/api/info")
        engine = (result["server_info"] or {}).get("engine") or {}
        log.info("engine: %s", engine)

        if args.prewarm > 0:
            log.info("pre-warm session for %.0f s (not measured)", args.prewarm)
            [(pre, _)] = await stream_sessions(http, server, url, args, args.prewarm, time.monotonic(), [None], [99])
            result["prewarm"] = {"seconds": args.prewarm, "frames_sent": len(pre.camera.sent_at),
                                 "frames_received": len(pre.received_at)}
            await wait_sessions_gone(http, url, 15)
        async with http.get(url + "/metrics", timeout=http_timeout(10)) as r:
            before = parse_prometheus(await r.text())

        poller = SessionPoller()
        t0 = time.monotonic()
        [(client, final)] = await stream_sessions(http, server, url, args, args.duration, t0, [poller], [args.seed + 1234])
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
    result["breakdown"] = frame_breakdown(client, poller.frames, args.warmup, [p["engine"] for p in poller.polls])
    result["breakdown"]["frames_missed_by_polls"] = poller.frames_missed
    result["session_final"] = final
    result["metrics"] = summarize_metrics(metrics_delta(after, before, GAUGES))
    result["metrics_text"] = metrics_text
    result["polls"] = poller.polls

async def wait_sessions_gone(http: Any, url: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, body = await get_json(http, url + "/api/sessions")
        if status == 200 and not (body or {}).get("sessions"):
            return
        await asyncio.sleep(0.3)
    log.warning("sessions are still listed after %.0f s", timeout)

def add_stream_args(p: argparse.ArgumentParser) -> None:
    """The options of the server under test and of its clients (this run and bench.capacity)."""
    p.add_argument("--model", default="wan-1.3b", help="tiny, wan-1.3b, wan-14b (random weights unless --weights)")
    p.add_argument("--weights", help="weights folder (optional; speed does not depend on weight values)")
    p.add_argument("--devices", default="cuda", help="cpu, cuda or cuda:N")
    p.add_argument("--height", type=int, default=None, help="model height (default 512; tiny: the model's own)")
    p.add_argument("--width", type=int, default=None, help="model width (default 512; tiny: the model's own)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps of the session (1-4)")
    p.add_argument("--decoder", choices=DECODERS, default=None, help="server --decoder (default: the server's, wan)")
    p.add_argument("--encoder", choices=ENCODERS, default=None, help="server --encoder (default: the server's, wan)")
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
    p.add_argument("--stock-receiver", action="store_true",
                   help="receive the output with aiortc's own jitter buffer (a frame interval later) instead of the "
                        "server's, which completes a frame on its RTP marker bit as a browser does")

def finish_stream_args(p: argparse.ArgumentParser, args: argparse.Namespace, prefix: str) -> None:
    """Checks and derived values of add_stream_args' options (a one-line error via p.error)."""
    try:
        w, h = (int(v) for v in args.camera.lower().split("x"))
    except ValueError:
        p.error(f"--camera {args.camera!r}: expected WxH")
    if w < 16 or h < 16:
        p.error(f"--camera {args.camera!r}: at least 16x16")
    args.camera_width, args.camera_height = w, h
    if args.fps < 1:
        p.error("--fps must be at least 1")
    if args.model != "tiny":
        args.height = args.height or 512
        args.width = args.width or 512
    if not 1 <= args.steps <= 4:
        p.error("--steps must be 1..4")
    if args.log is None:
        if args.json is not None:
            args.log = args.json.with_name(args.json.stem + ".server.log")
        else:
            args.log = Path(tempfile.mkdtemp(prefix=prefix + "-")) / "server.log"

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.server_bench", description=DOC.split("\n\n")[0])
    add_stream_args(p)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of camera streaming measured")
    args = p.parse_args(argv)
    finish_stream_args(p, args, "server_bench")
    if args.timeout is None:
        args.timeout = args.startup_timeout + args.prewarm + args.duration + args.connect_timeout + 60
    return args

def server_command(args: argparse.Namespace, port: int, config: dict) -> list[str]:
    """`python -m server` for these options; `config` (written next to the log: the CLI has no flags
    for height/width/deadline) gets the model size."""
    config = dict(config)
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
    if args.decoder:
        cmd += ["--decoder", args.decoder]
    if args.encoder:
        cmd += ["--encoder", args.encoder]
    return cmd + args.server_arg

def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)

def run_guarded(name: str, args: argparse.Namespace, server: ServerProcess, work: Callable[[], Awaitable[None]],
                result: dict) -> int:
    """Run `work` under a hard timeout (args.timeout, enforced by a watchdog thread even if the event
    loop hangs) and SIGTERM; the server is stopped on every exit path (result["server_exit_code"])
    and any error lands in result["error"]. Returns the exit status (0: the work finished)."""
    status = 1

    def stop_server(grace_s: float) -> None:
        result["server_exit_code"] = server.stop(grace_s=grace_s)

    def watchdog() -> None:
        print(f"{name}: hard timeout of {args.timeout:.0f} s reached: killing the server", file=sys.stderr, flush=True)
        stop_server(5)
        write_json(args, result | {"error": f"hard timeout {args.timeout:.0f} s"})
        os._exit(3)

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()

    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        asyncio.run(asyncio.wait_for(work(), max(1.0, args.timeout - 30)))
        status = 0
    except BenchError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log.error("%s", result["error"])
    except asyncio.TimeoutError:
        result["error"] = f"TimeoutError: the run went past its time limit (--timeout {args.timeout:.0f} s, less 30 s)"
        log.error("%s", result["error"])
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        log.error("interrupted")
    except Exception as exc:  # report and still clean up
        log.exception("benchmark failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_server(20)
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    return status

def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    config = {"deadline_s": args.deadline, "output_size": args.output_size, "max_sessions": 4}
    cmd = server_command(args, port, config)
    server = ServerProcess(cmd, args.log)
    result: dict[str, Any] = {
        "benchmark": "server_bench", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_cmd": cmd, "server_config": config, "server_log": str(args.log), "paper": PAPER,
        "env": environment(),
    }

    async def work() -> None:
        log.info("starting: %s (log %s)", " ".join(cmd), args.log)
        server.start()
        await run(args, server, url, result)

    status = run_guarded("server_bench", args, server, work, result)
    write_json(args, result)
    if "client" in result:
        print()
        print(table(result))
        print()
        print(breakdown_table(result.get("breakdown", {})))
    print(f"\nserver log: {args.log}" + (f"\njson: {args.json}" if args.json else ""))
    return status
