"""Which tree of the code a benchmark runs: recorded with every result, so a before/after shows it.

`python -m` puts the current folder ahead of PYTHONPATH on sys.path: a benchmark started from one tree
with PYTHONPATH naming another runs the first (docs/BENCHMARKS.md, twelfth round). The folder the
running `bench` package came from is the tree; its commit is known only where that folder is a git
checkout's top level (a `git archive` copy inside another checkout is not).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

TREE = Path(__file__).resolve().parents[1]


def code_tree(root: Path = TREE) -> dict[str, Optional[str]]:
    """{"tree": the folder, "commit": its HEAD where it is a checkout's top level, else None}."""
    commit = None
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        lines = top.stdout.split()
        if top.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == root.resolve():
            commit = lines[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"tree": str(root), "commit": commit}
