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


def _section(title: str, head: str, first: dict, second: dict, fmts: tuple[str, str],
             label: Callable[[tuple], str]) -> list[str]:
    """A table: per key its label, two measures' before / after / ratio, and the rounds per side."""
    lines = [title, head]
    for k in sorted(first):
        n = "/".join(str(len(first[k][s])) for s in SIDES)
        lines.append(f"{label(k)}   {_cells(first[k], fmts[0])}   {_cells(second[k], fmts[1])}   {n}")
    return lines


def table(out: Path) -> str:
    sections = []
    engine_key = lambda r: (r["row"], r.get("dtype") or "default", r["model"], r["size"], r["steps"])  # noqa: E731
    fps = collect(out, "engine", engine_key, "fps")
    if fps:
        sections.append(_section(
            "engine_bench (median over rounds; ratio = after / before)",
            f"{'row':5} {'dtype':9} {'model':9} {'size':8} {'st':>2}   {'fps before':>10} {'after':>8} {'ratio':>6}"
            f"   {'TTFF s before':>13} {'after':>8} {'ratio':>6}   rounds b/a",
            fps, collect(out, "engine", engine_key, "ttff_s"), ("10.2f", "13.3f"),
            lambda k: f"{k[0]:5} {k[1]:9} {k[2]:9} {k[3]:8} {k[4]:>2}"))
    sessions_key = lambda r: (r["sessions"], r["row"], r["model"], r["size"], r["steps"])  # noqa: E731
    agg = collect(out, "sessions", sessions_key, "aggregate_fps")
    if agg:
        sections.append(_section(
            "sessions_bench: N sessions round-robin on one engine (median over rounds; ratio = after / before)",
            f"{'N':>3} {'row':5} {'model':9} {'size':8} {'st':>2}   {'agg fps before':>14} {'after':>8} {'ratio':>6}"
            f"   {'min session fps b':>17} {'after':>8} {'ratio':>6}   rounds b/a",
            agg, collect(out, "sessions", sessions_key, "min_session_fps"), ("14.2f", "17.2f"),
            lambda k: f"{k[0]:>3} {k[1]:5} {k[2]:9} {k[3]:8} {k[4]:>2}"))
    if not sections:
        return f"no results in {out}"
    return "\n\n".join("\n".join(lines) for lines in sections)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="the before/after table of bench/ab.sh")
    ap.add_argument("out", type=Path, help="the folder bench/ab.sh wrote (its $OUT)")
    args = ap.parse_args(argv)
    if not args.out.is_dir():
        ap.error(f"{args.out}: no such folder")
    print(table(args.out))


if __name__ == "__main__":
    main()
