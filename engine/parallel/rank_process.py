"""A rank's process: its entry point (a spawned process, or rank 0's thread under torchrun), its
logging, and dying with its parent."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
import traceback
from typing import Any, Optional

import torch

from engine import protocol as P
from engine.parallel.rank import RankBase, RankSpec
from engine.parallel.rank0 import Rank0

log = logging.getLogger("engine.parallel.rank")


def _watch_parent(ppid: int) -> None:
    """Spawned ranks die with their caller, also when it is killed (no orphans holding GPUs)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(3)


def _setup_logging(rank: int, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")


def rank_main(spec: RankSpec, events: Any, commands: Any, ppid: Optional[int]) -> None:
    """Entry point of a rank (a spawned process, or rank 0's thread under torchrun)."""
    if ppid is not None:
        _setup_logging(spec.rank, logging.DEBUG if os.environ.get("STREAMGEN_PARALLEL_DEBUG") else logging.INFO)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is it stuck?
        threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
        # CPU ranks keep torch's default thread count even though they share the cores: some CPU
        # kernels (oneDNN convolutions) sum in another order with another thread count, and a rank
        # count must not change a frame.
    r: Optional[RankBase] = None
    try:
        with torch.no_grad():
            r = Rank0(spec, events, commands) if spec.rank == 0 else RankBase(spec, events)
            if spec.rank == 0:
                events.send(P.Ready(0, r.info(), r.split))  # type: ignore[attr-defined]
                r._maybe_send_stats(force=True)  # type: ignore[attr-defined]
            r.serve()
    except BaseException as exc:  # report, then die: a rank that failed leaves the ring inconsistent
        log.error("rank %d failed: %s", spec.rank, traceback.format_exc())
        if events is not None:
            try:
                events.send(P.Failed(spec.rank, f"rank {spec.rank}: {type(exc).__name__}: {exc}"))
            except Exception:
                pass
        if ppid is not None:
            os._exit(1)
        raise
    finally:
        if r is not None:
            try:
                r.profiler.finish()
            except Exception as exc:  # a profile is a diagnostic: it never masks how the rank ended
                log.warning("rank %d: profile not written: %s", spec.rank, exc)
            if r.stopped:
                r.close()
    log.info("rank %d stopped", spec.rank)
