"""What a run leaves: the environment it ran in, the JSON file and the table printed last."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from typing import Any

from bench.code_tree import code_tree

PAPER = {  # StreamDiffusionV2 paper, 1 H100, 1.3B, 512², 1 step
    "latency_mean_ms": 357.0,
    "latency_p99_ms": 585.0,
    "jitter_p99_ms": 132.0,
    "miss_rate": 0.002,
    "fps_out": 26.21,
}


def environment() -> dict:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        **code_tree(),  # the tree this benchmark and the server it starts run from
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

def fmt(v: Any, digits: int = 1) -> str:
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
        lines.append(f"{name:26s}{fmt(a, digits):>14s}{fmt(b, digits):>14s}{fmt(p, digits):>10s}")
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

def write_json(args: argparse.Namespace, result: dict) -> None:
    if args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
