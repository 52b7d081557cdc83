"""The before/after table of bench/ab.sh, from the JSON files it leaves in its output folder:
engine-{before,after}-{round}.json (bench.engine_bench) and sessions-{before,after}-{round}.json
(bench.sessions_bench). Each figure is the median over the rounds that produced it; ratio = after /
before.

    python -m bench.ab_report ab-out
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

SIDES = ("before", "after")
log = logging.getLogger("bench.ab_report")
Key = tuple
Figures = dict[Key, dict[str, list[float]]]  # key -> side -> one figure per round


def collect(out: Path, part: str, key: Callable[[dict], Key], figure: str) -> Figures:
    """`figure` of every result of `part`'s JSON files, by `key(result)` and side."""
    found: Figures = defaultdict(lambda: {s: [] for s in SIDES})
    for side in SIDES:
        for path in sorted(out.glob(f"{part}-{side}-*.json")):
            try:
                results = json.loads(path.read_text())["results"]
            except (ValueError, KeyError) as exc:  # a run cut off while writing
                log.warning("%s skipped: %s", path, exc)
                continue
            for r in results:
                if r.get(figure) is not None:
                    found[key(r)][side].append(float(r[figure]))
    return found


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _cells(sides: dict[str, list[float]], fmt: str) -> str:
    b, a = _median(sides["before"]), _median(sides["after"])
    ratio = f"{a / b:6.3f}" if a is not None and b else "     -"
    show = lambda v: format(v, fmt) if v is not None else "-".rjust(len(format(0.0, fmt)))  # noqa: E731
    return f"{show(b)} {show(a)} {ratio}"


def table(out: Path) -> str:
    lines = []
    engine_key = lambda r: (r["row"], r.get("dtype") or "default", r["model"], r["size"], r["steps"])  # noqa: E731
    fps = collect(out, "engine", engine_key, "fps")
    ttff = collect(out, "engine", engine_key, "ttff_s")
    if fps:
        lines.append("engine_bench (median over rounds; ratio = after / before)")
        lines.append(f"{'row':5} {'dtype':9} {'model':9} {'size':8} {'st':>2}   {'fps before':>10} {'after':>8} {'ratio':>6}"
                     f"   {'TTFF s before':>13} {'after':>8} {'ratio':>6}   rounds b/a")
        for k in sorted(fps):
            row, dtype, model, size, steps = k
            n = "/".join(str(len(fps[k][s])) for s in SIDES)
            lines.append(f"{row:5} {dtype:9} {model:9} {size:8} {steps:>2}   {_cells(fps[k], '10.2f')}   "
                         f"{_cells(ttff[k], '13.3f')}   {n}")
    sessions_key = lambda r: (r["sessions"], r["row"], r["model"], r["size"], r["steps"])  # noqa: E731
    agg = collect(out, "sessions", sessions_key, "aggregate_fps")
    low = collect(out, "sessions", sessions_key, "min_session_fps")
    if agg:
        if lines:
            lines.append("")
        lines.append("sessions_bench: N sessions round-robin on one engine (median over rounds; ratio = after / before)")
        lines.append(f"{'N':>3} {'row':5} {'model':9} {'size':8} {'st':>2}   {'agg fps before':>14} {'after':>8} {'ratio':>6}"
                     f"   {'min session fps b':>17} {'after':>8} {'ratio':>6}   rounds b/a")
        for k in sorted(agg):
            n_sessions, row, model, size, steps = k
            n = "/".join(str(len(agg[k][s])) for s in SIDES)
            lines.append(f"{n_sessions:>3} {row:5} {model:9} {size:8} {steps:>2}   {_cells(agg[k], '14.2f')}   "
                         f"{_cells(low[k], '17.2f')}   {n}")
    if not lines:
        return f"no results in {out}"
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="the before/after table of bench/ab.sh")
    ap.add_argument("out", type=Path, help="the folder bench/ab.sh wrote (its $OUT)")
    args = ap.parse_args(argv)
    if not args.out.is_dir():
        ap.error(f"{args.out}: no such folder")
    print(table(args.out))


if __name__ == "__main__":
    main()
