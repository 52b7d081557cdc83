"""Replay the output frames a capacity run recorded through the server's pacer with other settings: what
the playout delay and the output's evenness would have been (server/media/pacing.py is pure logic with
the clock passed in, so the recorded hand-over times drive it exactly as the server's clock did).

    python -m bench.pacing_replay out/capacity.json [--percentiles 100,98,95] [--windows 4]

Per N and session: server latency (camera frame arrived -> sent) p50/p99 and the output's frame gap
p99, first as recorded, then per setting. The replay leaves out what the delay would change downstream
(the client's jitter buffer); the first row checks the replay against what the server did.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from server.media.pacing import CLOCK_RATE, PtsPacer


def replay(frames: list[dict], percentile: float, window_s: float) -> tuple[dict[int, float], int]:
    """Each frame handed to a fresh pacer at its recorded `delivered` time; returns {pts: sent time} and
    the frames the pacer dropped as late."""
    pacer: PtsPacer[None] = PtsPacer(CLOCK_RATE, jitter_percentile=percentile, window_s=window_s)
    sent: dict[int, float] = {}
    order = sorted(frames, key=lambda f: f["delivered"])
    now = order[0]["delivered"]

    def drain(until: float) -> float:
        t = now
        while True:
            ready, wait = pacer.poll(t)
            if ready is not None:
                sent[ready[0]] = t
                continue
            if math.isinf(wait) or t + wait > until:
                return t
            t += wait

    for f in order:
        now = max(drain(f["delivered"]), f["delivered"])
        pacer.push([(f["pts"], None)], now)
    drain(math.inf)
    return sent, pacer.dropped_late


def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def summary(frames: list[dict], sent: dict[int, float], skip: float = 0.25) -> dict:
    """Latency (arrived -> sent) p50/p99 over the frames after the first `skip` share, and the p99 of
    the gaps between consecutive sent frames."""
    kept = [f for f in frames[int(len(frames) * skip):] if f["pts"] in sent]
    latency = [1000.0 * (sent[f["pts"]] - f["arrived"]) for f in kept]
    times = sorted(sent[f["pts"]] for f in kept)
    gaps = [1000.0 * (b - a) for a, b in zip(times, times[1:])]
    return {"frames": len(kept), "p50_ms": _pct(latency, 0.5), "p99_ms": _pct(latency, 0.99), "gap_p99_ms": _pct(gaps, 0.99)}


def usable(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f.get("delivered") is not None and f.get("sent") is not None and f.get("arrived") is not None]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pacing_replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a bench.capacity --json file (its sessions' recorded frames)")
    ap.add_argument("--percentiles", default="100,98,95,90")
    ap.add_argument("--windows", default="4")
    args = ap.parse_args(argv)
    try:
        result = json.loads(args.json.read_text())
        percentiles = [float(x) for x in args.percentiles.split(",")]
        windows = [float(x) for x in args.windows.split(",")]
    except (OSError, ValueError) as exc:
        ap.error(str(exc))
    fmt = "{:>3} {:>3}  {:<22} {:>7} {:>7} {:>9} {:>6}"
    print(fmt.format("N", "s", "pacing", "p50 ms", "p99 ms", "gap p99", "late"))
    for detail in result.get("details", []):
        for i, session in enumerate(detail.get("sessions", [])):
            frames = usable(session.get("frames") or [])
            if len(frames) < 8:
                continue
            rows = [("as recorded", summary(frames, {f["pts"]: f["sent"] for f in frames}), "")]
            for w in windows:
                for p in percentiles:
                    sent, late = replay(frames, p, w)
                    rows.append((f"replay {p:g}th, {w:g} s", summary(frames, sent), str(late)))
            for name, s, late in rows:
                print(fmt.format(detail["n"], i, name, *(f"{s[k]:.1f}" if s[k] is not None else "-"
                                                        for k in ("p50_ms", "p99_ms", "gap_p99_ms")), late))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
