"""The server under test: `python -m server` in its own process group, killed on every exit path."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("server_bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

class ServerProcess:
    """`python -m server` in its own process group (the engine is its child), killed on stop()."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                     "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    def exited(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> Optional[int]:
        """SIGINT (the server closes its sessions and stops the engine), then SIGKILL the group."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return None
            pgid = proc.pid  # start_new_session: the group id is the server's pid
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("server did not stop in %.0f s: killing it", grace_s)
            # Whatever is left of the group (the engine process, or the server itself).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            return proc.returncode
