"""Names of the shared-memory segments this project creates, which say who owns them, and the
removal of segments whose owner is gone (docs/RELIABILITY.md, "Shared memory").

A process that dies with its engine (an OOM or cgroup kill, `kill -9` of the process group) cannot
unlink its frame rings, and Python's resource tracker dies with it. So each segment is named
`sg-{pid namespace}-{pid}-{start time}-{random}`: the creating process's pid, its start time in
clock ticks since boot (/proc/PID/stat field 22, so a reused pid is not taken for the owner), and
its pid namespace (a pid means nothing in another one: such segments are never touched). A
starting server removes the segments of this form whose owner no longer runs.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory
_NAME = re.compile(r"sg-(\d+)-(\d+)-(\d+)-[0-9a-f]{8}")
_PROC = Path("/proc")


@dataclass(frozen=True)
class Owner:
    pid_namespace: int  # 0: unknown (no /proc)
    pid: int
    start_ticks: int  # 0: unknown (no /proc)


def _stat_fields(pid: int) -> Optional[list[str]]:
    """/proc/PID/stat from the state field on (the command name may hold spaces), or None."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _pid_namespace() -> int:
    try:
        return os.stat(_PROC / "self" / "ns" / "pid").st_ino
    except OSError:
        return 0


def this_process() -> Owner:
    pid = os.getpid()
    fields = _stat_fields(pid)
    return Owner(_pid_namespace(), pid, int(fields[19]) if fields else 0)


def owned_name(owner: Optional[Owner] = None) -> str:
    """A fresh segment name owned by `owner` (default: this process)."""
    o = owner or this_process()
    return f"sg-{o.pid_namespace}-{o.pid}-{o.start_ticks}-{secrets.token_hex(4)}"


def parse_owner(name: str) -> Optional[Owner]:
    """The owner a segment name records, or None for a name this project did not make."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    ns, pid, start = (int(g) for g in match.groups())
    return Owner(ns, pid, start)


def owner_alive(owner: Owner) -> bool:
    """Whether the owner still runs: its pid exists, is not a zombie, and started when the name
    says (without /proc, only that the pid exists: a reused pid keeps its segments)."""
    if not (_PROC / "self" / "stat").exists():
        try:
            os.kill(owner.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat_fields(owner.pid)
    if fields is None or fields[0] == "Z":
        return False
    return owner.start_ticks == 0 or int(fields[19]) == owner.start_ticks


def remove_orphans(directory: Path = SHM_DIR) -> list[tuple[str, int]]:
    """Unlink the segments in `directory` named by `owned_name` in this pid namespace whose owner
    is gone; returns (name, bytes) of each removed. Anything else is left alone."""
    try:
        entries = list(directory.iterdir())
    except OSError:  # no /dev/shm (not Linux): nothing to look at
        return []
    namespace = _pid_namespace()
    removed = []
    for path in entries:
        owner = parse_owner(path.name)
        if owner is None or owner.pid_namespace != namespace or owner_alive(owner):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another starting server was first
            continue
        except OSError as exc:
            log.warning("cannot remove the orphaned shared memory %s: %s", path, exc)
            continue
        removed.append((path.name, size))
    return removed
