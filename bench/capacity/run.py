"""The capacity run: one server for the row, N clients at once for each N, the verdicts, the table."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from bench.capacity import __doc__ as DOC
from bench.capacity.verdict import SessionResult, Slo, StepResult, capacity, parse_n_range, should_stop, table
from bench.server_bench import BenchError
from bench.server_bench.breakdown import breakdown_table, frame_breakdown
from bench.server_bench.client import Client, http_timeout
from bench.server_bench.cpu import busiest_child, cores_used, cpu_seconds
from bench.server_bench.latency import SessionPoller, client_stats
from bench.server_bench.process import ServerProcess, free_port
from bench.server_bench.prometheus_text import GAUGES, metrics_delta, parse_prometheus, summarize_metrics
from bench.server_bench.report import environment, write_json
from bench.server_bench.run import (add_stream_args, finish_stream_args, get_json, run_guarded, server_command,
                                    setup_logging, stream_sessions, wait_ready, wait_sessions_gone)

log = logging.getLogger("capacity")


def session_result(client: Client, final: Optional[dict], deadline_ms: float, warmup_s: float) -> tuple[SessionResult, dict]:
    """The SLO's numbers for one session, and the full client statistics they come from."""
    stats = client_stats(client, deadline_ms, warmup_s)
    steady = stats.get("e2e_steady") or {}
    lat, jit = steady.get("latency_ms") or {}, steady.get("jitter_ms") or {}
    dropped = ((final or {}).get("stats") or {}).get("dropped") or {}
    return SessionResult(
        session_id=client.session_id, fps_out=stats.get("fps_out_window"), latency_p50_ms=lat.get("p50"),
        latency_p99_ms=lat.get("p99"), jitter_p99_ms=jit.get("p99"), frames_sent=stats.get("frames_sent", 0),
        frames_received=stats.get("frames_received", 0), dropped={k: int(v) for k, v in dropped.items()},
    ), stats


async def _metrics(http: Any, url: str) -> dict:
    async with http.get(url + "/metrics", timeout=http_timeout(10)) as r:
        return parse_prometheus(await r.text())


def process_pids(server: ServerProcess) -> dict[str, int]:
    """The server, its engine process (its child) and this process (the N clients)."""
    pids = {"clients": os.getpid()}
    if server.proc is not None:
        pids["server"] = server.proc.pid
        engine = busiest_child(server.proc.pid)
        if engine is not None:
            pids["engine"] = engine
    return pids


async def measure_n(http: Any, server: ServerProcess, url: str, args: argparse.Namespace, n: int) -> tuple[StepResult, dict]:
    """N clients at once for --duration seconds. A refused or lost session fails this N; a server
    that exits ends the run."""
    before = await _metrics(http, url)
    pids = process_pids(server)
    cpu_before, wall_before = cpu_seconds(pids), time.monotonic()
    pollers = [SessionPoller() for _ in range(n)]
    seeds = [args.seed + 1234 + 101 * i for i in range(n)]  # distinct pts codes per camera
    detail: dict[str, Any] = {"n": n}
    try:
        pairs = await stream_sessions(http, server, url, args, args.duration, time.monotonic(),
                                      pollers, seeds, args.stagger)
    except BenchError as exc:
        if server.exited() is not None:
            raise
        log.warning("N=%d failed: %s", n, exc)
        await wait_sessions_gone(http, url, 30)
        return StepResult(n=n, error=str(exc)), detail | {"error": str(exc)}
    after = await _metrics(http, url)
    detail["cpu_cores"] = cores_used(cpu_before, cpu_seconds(pids), time.monotonic() - wall_before)
    for client, _ in pairs:
        with contextlib.suppress(Exception):
            async with http.delete(f"{url}/api/sessions/{client.session_id}", timeout=http_timeout(10)):
                pass
    await wait_sessions_gone(http, url, 30)
    sessions, clients = [], []
    for (client, final), poller in zip(pairs, pollers):
        result, stats = session_result(client, final, 1000.0 * args.deadline, args.warmup)
        sessions.append(result)
        # every frame's server-side times (arrived, pushed, returned, delivered, sent: when a tail happened),
        # and where each frame's time went, camera to screen, the client's legs included (as bench.server_bench)
        breakdown = frame_breakdown(client, poller.frames, args.warmup, [p.get("engine") for p in poller.polls])
        clients.append({"session_id": client.session_id, "client": stats, "final": final, "frames": poller.frames,
                        "breakdown": breakdown})
    detail |= {"sessions": clients, "metrics": summarize_metrics(metrics_delta(after, before, GAUGES))}
    return StepResult(n=n, sessions=sessions), detail


async def run(args: argparse.Namespace, slo: Slo, server: ServerProcess, url: str, steps: list[StepResult],
              result: dict) -> None:
    """Every N in turn, each step appended to `steps` and (as JSON) to result["steps"] when done."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        result["healthz"] = await wait_ready(http, server, url, args.startup_timeout)
        _, result["server_info"] = await get_json(http, url + "/api/info")
        log.info("engine: %s", (result["server_info"] or {}).get("engine"))
        if args.prewarm > 0:
            log.info("pre-warm session for %.0f s (not measured)", args.prewarm)
            await stream_sessions(http, server, url, args, args.prewarm, 0.0, [None], [99])
            await wait_sessions_gone(http, url, 30)
        for n in args.ns:
            log.info("N=%d: %d client(s) for %.0f s", n, n, args.duration)
            step, detail = await measure_n(http, server, url, args, n)
            steps.append(step)
            result["steps"].append(step.model_dump())  # the watchdog's JSON keeps what finished
            result["details"].append(detail)
            if should_stop(step, slo, args.keep_going):
                log.info("N=%d fails the SLO: stopping (--keep-going runs the rest)", n)
                break


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, Slo]:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=DOC.split("\n\n")[0])
    add_stream_args(p)
    p.add_argument("--n", default="1-6", help="the N to try, e.g. 1-6 or 1,2,4 (default 1-6)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds each N streams (the warm-up included)")
    p.add_argument("--slo-fps", type=float, default=30.0, help="output fps every session must hold")
    p.add_argument("--slo-fps-tolerance", type=float, default=0.03, help="share of --slo-fps a session may fall short by")
    p.add_argument("--slo-p99-ms", type=float, default=300.0, help="client latency p99 bound (ms)")
    p.add_argument("--keep-going", action="store_true", help="try every N even after one fails")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="seconds between two clients joining (default 0: all at once); each session's window "
                        "then holds the later ones' joins")
    args = p.parse_args(argv)
    finish_stream_args(p, args, "capacity")
    try:
        args.ns = parse_n_range(args.n)
    except ValueError as exc:
        p.error(f"--n {args.n!r}: {exc}")
    if args.ns[-1] > 64:
        p.error("--n: at most 64 sessions (the server's max_sessions limit)")
    if args.stagger < 0:
        p.error("--stagger must be 0 or more seconds")
    if args.duration <= args.warmup + 1:
        p.error(f"--duration {args.duration:g} must exceed --warmup {args.warmup:g} by more than 1 s")
    try:
        slo = Slo(fps=args.slo_fps, fps_tolerance=args.slo_fps_tolerance, p99_ms=args.slo_p99_ms)
    except ValueError as exc:
        p.error(f"SLO: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")  # type: ignore[attr-defined]
    if args.fps < slo.min_fps:
        p.error(f"--fps {args.fps} is below the SLO's {slo.min_fps:.1f} fps: no session could pass")
    if args.timeout is None:
        per_n = args.duration + args.connect_timeout + 40 + args.stagger * (args.ns[-1] - 1)  # + teardown and /metrics
        args.timeout = args.startup_timeout + args.prewarm + args.connect_timeout + len(args.ns) * per_n
    return args, slo


def row_name(args: argparse.Namespace, result: dict) -> str:
    engine = ((result.get("server_info") or {}).get("engine")) or {}
    size = f"{engine.get('width', args.width)}x{engine.get('height', args.height)}"
    return (f"{args.model} {size} (WxH), {args.steps} step(s), encoder {engine.get('encoder', args.encoder)}, "
            f"decoder {engine.get('decoder', args.decoder)}, on {engine.get('device', args.devices)}; camera "
            f"{args.camera_width}x{args.camera_height} at {args.fps} fps, {args.duration:g} s per N "
            f"({args.warmup:g} s warm-up)" + (f", joining {args.stagger:g} s apart" if args.stagger else ""))


def slowest_session(sessions: list[dict]) -> Optional[dict]:
    """The session whose client p99 was highest, among those with a breakdown (None if none has one)."""
    timed = [s for s in sessions if (s.get("breakdown") or {}).get("frames")]
    return max(timed, key=lambda s: s["breakdown"]["e2e_ms"]["p99"], default=None)


def main(argv: Optional[list[str]] = None) -> int:
    args, slo = parse_args(argv)
    setup_logging()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    # The server runs to the SLO's frame rate (its engine batches by it) and admits every session up to
    # the largest N: the benchmark measures what the server holds, not what admission control expects.
    config = {"deadline_s": args.deadline, "output_size": args.output_size, "max_sessions": args.ns[-1],
              "target_fps": slo.fps, "admission": "off"}
    cmd = server_command(args, port, config)
    server = ServerProcess(cmd, args.log)
    steps: list[StepResult] = []
    result: dict[str, Any] = {
        "benchmark": "capacity", "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "slo": slo.model_dump(), "server_cmd": cmd, "server_config": config, "server_log": str(args.log),
        "env": environment(), "steps": [], "details": [],
    }

    async def work() -> None:
        log.info("starting: %s (log %s)", " ".join(cmd), args.log)
        server.start()
        await run(args, slo, server, url, steps, result)

    status = run_guarded("capacity", args, server, work, result)
    result["capacity"] = capacity(steps, slo)
    result["row"] = row_name(args, result)
    write_json(args, result)
    print()
    print(table(steps, slo, result["row"]))
    for d in result["details"]:
        m = d.get("metrics") or {}
        if m.get("forwards_by_batch"):
            print(f"N={d['n']}: forwards by sessions carried {dict(sorted(m['forwards_by_batch'].items()))}, "
                  f"{m.get('batch_waits', 0)} waited to share")
        slowest = slowest_session(d.get("sessions") or [])
        if slowest is not None:
            print(f"N={d['n']}, the session with the highest client p99 ({slowest['session_id'][:8]}):")
            print(breakdown_table(slowest["breakdown"]))
        if d.get("cpu_cores"):
            print(f"N={d['n']}: CPU cores used (process / its main thread): " + ", ".join(
                f"{k} {v:.2f}/{d['cpu_cores'].get(k + '_main', float('nan')):.2f}"
                for k, v in d["cpu_cores"].items() if not k.endswith("_main")))
    if result.get("error"):
        print(f"the run ended early: {result['error'].splitlines()[0][:200]}")
    print(f"\nserver log: {args.log}" + (f"\njson: {args.json}" if args.json else ""))
    return status
