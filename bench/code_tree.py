"""Which tree of the code a benchmark runs: recorded with every result, so a before/after shows it.

`python -m` puts the current folder ahead of PYTHONPATH on sys.path: a benchmark started from one tree
with PYTHONPATH naming another runs the first (docs/BENCHMARKS.md, twelfth round). The folder the
running `bench` package came from is the tree; its commit is known only where that folder is a git
checkout's top level (a `git archive` copy inside another checkout is not), and so is whether the run's
tracked files differ from that commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

TREE = Path(__file__).resolve().parents[1]


def code_tree(root: Path = TREE) -> dict[str, Any]:
    """{"tree": the folder, "commit": its HEAD where it is a checkout's top level, else None, "modified":
    whether tracked files differ from that commit (a run of uncommitted changes), None without one}."""
    commit, modified = None, None
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        lines = top.stdout.split()
        if top.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == root.resolve():
            commit = lines[1]
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            modified = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"tree": str(root), "commit": commit, "modified": modified}
