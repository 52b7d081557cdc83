"""The ring executor: the engine's core (rank 0) and the other ranks in processes of their own, behind
the same session API as the in-process engine (engine.frontend, engine.session).

    engine = StreamEngine.create(EngineOptions(model="tiny", device="cpu:2"))   # or "cuda:0,1"
    s = engine.open_session("a watercolor painting")
    outputs = s.push(frames, pts) + s.flush()
    engine.close()

The calling process is a coordinator, not a rank: it spawns one process per rank (multiprocessing
'spawn'), sends each session's chunks and updates to rank 0 over a pipe and gets frames back from it. A
reader thread takes every event as it comes (so no rank ever blocks on a full pipe) and watches the
rank processes: a rank that dies, reports an error or stops making progress fails the whole engine,
and every session call raises EngineFailure within about a second (stall: `stall_timeout_s`).

Sessions (engine.session.Session) cut frames into chunks here and send them to rank 0;
`parallel.inflight` chunks of a session may be in flight before push() waits.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from engine.config import ModelConfig, load_model_config
from engine import protocol as P
from engine.frontend import EngineFrontend
from engine.parallel.balance import even_split
from engine.parallel.devices import parse_devices, validate_local
from engine.errors import EngineFailure
from engine.parallel.rank import RankSpec
from engine.parallel.rank_process import rank_main
from interface.devices import RankDevices
from interface.messages import EngineInfo

log = logging.getLogger("engine.parallel")


class ParallelEngine(EngineFrontend):
    """N ranks behind the session API. See the module docstring and docs/PARALLEL.md."""

    def __init__(self, cfg: ModelConfig, options: Any, ranks: RankDevices) -> None:
        super().__init__(options)
        self.cfg, self.ranks = cfg, ranks
        validate_local(ranks)
        popts = options.parallel
        world = ranks.world
        split = list(popts.split) if popts.split else even_split(cfg.dit.num_layers, world)
        if len(split) != world or sum(split) != cfg.dit.num_layers or min(split) < 0:
            raise ValueError(f"parallel.split {split}: need {world} non-negative counts summing to "
                             f"{cfg.dit.num_layers} blocks")
        self.split = split
        height = options.height or cfg.stream.height
        width = options.width or cfg.stream.width
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
        self._procs: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._events: list[Any] = []
        self._store_dir: Optional[str] = None
        self._cmd_lock = threading.Lock()
        self._start(options)
        try:
            self._wait(lambda: self._ready is not None, "the ranks to start", timeout=popts.start_timeout_s)
        except BaseException:
            self.close()  # no rank left behind by a failed start
            raise
        assert self._ready is not None
        self.info: EngineInfo = self._ready.info
        log.info("parallel engine ready: %d ranks on %s, blocks per rank %s", world, ",".join(ranks.devices), split)

    # -- start / stop ----------------------------------------------------------------------------------
    def _start(self, options: Any) -> None:
        world = self.ranks.world
        opts = options.model_dump(mode="json")
        if self.ranks.external:
            rank = int(os.environ.get("RANK", "0"))
            if rank != 0:
                raise ValueError("under torchrun only RANK 0 creates the engine; other ranks serve "
                                 "(engine.parallel.engine.serve_torchrun_rank)")
            spec = RankSpec(0, world, self.ranks, opts, "env://", self.split)
            ev_r, ev_w = mpc.Pipe(duplex=False)
            cmd_r, cmd_w = mpc.Pipe(duplex=False)
            t = threading.Thread(target=rank_main, args=(spec, ev_w, cmd_r, None), name="rank0", daemon=True)
            t.start()
            self._threads.append(t)
            self._events, self._cmd = [ev_r], cmd_w
        else:
            import torch.multiprocessing as tmp

            ctx = tmp.get_context("spawn")
            # CPU ranks share the cores: OpenMP threads that spin after each parallel region (the
            # default) steal them from the other ranks; a passive wait changes timing, never results.
            env_before = os.environ.get("OMP_WAIT_POLICY")
            if self.ranks.kind == "cpu" and env_before is None:
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            self._store_dir = tempfile.mkdtemp(prefix="streamgen-pg-")
            init = f"file://{os.path.join(self._store_dir, 'store')}"
            for r in range(world):
                ev_r, ev_w = ctx.Pipe(duplex=False)
                cmd_r, cmd_w = ctx.Pipe(duplex=False) if r == 0 else (None, None)
                spec = RankSpec(r, world, self.ranks, opts, init, self.split)
                p = ctx.Process(target=rank_main, args=(spec, ev_w, cmd_r, os.getpid()), name=f"rank{r}", daemon=True)
                p.start()
                ev_w.close()  # the child holds it now: EOF here when the child is gone
                if cmd_r is not None:
                    cmd_r.close()
                    self._cmd = cmd_w
                self._procs.append(p)
                self._events.append(ev_r)
            if env_before is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
        reader = threading.Thread(target=self._reader, name="parallel-engine-reader", daemon=True)
        reader.start()
        self._threads.append(reader)

    def close(self) -> None:
        """Stop the ranks (gracefully, then by force) and release everything; idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._failure is None:
            try:
                self._command(P.StopCmd())
            except EngineFailure:
                pass
        deadline = time.monotonic() + 15.0
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            if t.name == "rank0":
                t.join(max(0.1, deadline - time.monotonic()))
        self._kill_ranks()
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        if self._store_dir:
            shutil.rmtree(self._store_dir, ignore_errors=True)

    def _kill_ranks(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)

    def __del__(self) -> None:  # a forgotten engine must not leave rank processes behind
        try:
            if not self._closed:
                self._closing = True
                self._kill_ranks()
        except Exception:
            pass

    # -- events from the ranks -------------------------------------------------------------------------
    def _reader(self) -> None:
        conns = list(self._events)
        sentinels = {p.sentinel: (r, p) for r, p in enumerate(self._procs)}
        while not self._closed:
            waitables = conns + list(sentinels)
            if not waitables:
                return
            for obj in mpc.wait(waitables, timeout=0.25):
                if obj in sentinels:
                    r, p = sentinels.pop(obj)
                    p.join(0.5)
                    if not self._closing:
                        self._fail(EngineFailure(f"rank {r} (pid {p.pid}) exited with code {p.exitcode}", r))
                    continue
                try:
                    ev = obj.recv()
                except (EOFError, OSError):
                    conns.remove(obj)
                    if not self._procs and not self._closing:  # torchrun: rank 0's thread is gone
                        self._fail(EngineFailure("rank 0 stopped answering", 0))
                    continue
                self._on_event(ev)

    def _blame(self, failure: EngineFailure) -> EngineFailure:
        """A rank reporting a broken connection has usually lost a peer: name the dead one, if one
        dies within half a second (its death and the report race)."""
        if not any(w in str(failure) for w in ("ConnectionError", "Connection closed", "Connection reset", "link ")):
            return failure  # the rank's own error
        deadline = time.monotonic() + 0.5
        while True:
            for r, p in enumerate(self._procs):
                if r != failure.rank and not p.is_alive():
                    return EngineFailure(f"rank {r} (pid {p.pid}) exited with code {p.exitcode}; {failure}", r)
            if time.monotonic() > deadline:
                return failure
            time.sleep(0.05)

    def _fail(self, failure: EngineFailure) -> None:
        super()._fail(failure)
        threading.Thread(target=self._kill_ranks, daemon=True).start()  # their ring is broken for good

    # -- plumbing --------------------------------------------------------------------------------------
    def _command(self, cmd: Any) -> None:
        if self._failure is not None:
            raise EngineFailure(str(self._failure), self._failure.rank)
        try:
            with self._cmd_lock:
                self._cmd.send(cmd)
        except (BrokenPipeError, OSError, EOFError) as exc:
            self._fail(EngineFailure(f"rank 0 is gone ({exc})", 0))
            raise EngineFailure(str(self._failure), 0) from exc

    def _wait(self, pred: Callable[[], bool], what: str, timeout: Optional[float] = None) -> None:
        limit = self.options.parallel.stall_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                if self._failure is not None:
                    raise EngineFailure(str(self._failure), self._failure.rank) from self._failure
                if pred():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail(EngineFailure(f"no progress for {limit:.0f} s while waiting for {what}"))
                    continue
                self._cond.wait(min(left, 0.5))

    # -- the ring's own operations ----------------------------------------------------------------------
    def stats(self) -> dict:
        return dict(super().stats(), pids=[p.pid for p in self._procs])

    @property
    def rank_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def rebalance(self, boundary: int, blocks: int) -> None:
        """Move `blocks` blocks across the boundary between rank `boundary` and `boundary + 1` (> 0:
        downstream, < 0: upstream), at the next forward boundary. For tests and operators."""
        self._check()
        self._command(P.RebalanceCmd(boundary, blocks))

    def set_rebalance(self, enabled: bool) -> None:
        """Turn the automatic block scheduler on or off."""
        self._check()
        self._command(P.ConfigureCmd(rebalance=enabled))

    def profile_ranks(self, directory: str, forwards: int) -> None:
        """Every rank profiles its part of the next `forwards` forwards and writes rank{r}.json.gz (a Chrome
        trace) and rank{r}.txt (its GPU's busy time per stream and idle gaps) into `directory` once the
        forward after the window reaches it (engine.parallel.profiling)."""
        self._check()
        if forwards < 1:
            raise ValueError("profile at least one forward")
        self._command(P.ConfigureCmd(profile=(os.path.abspath(directory), forwards)))

    def measure_hop(self, nbytes: int, repeats: int = 10) -> float:
        """Median ms of one hop for a payload of `nbytes` (ring round trips / ranks); run it when idle."""
        self._check()
        with self._cond:
            self._ping = None
        self._command(P.PingCmd(nbytes, repeats))
        self._wait(lambda: self._ping is not None, "the hop measurement")
        assert self._ping is not None
        return self._ping.ms_per_hop

    def synchronize(self) -> None:
        """Outputs arrive on the host already; nothing to wait for."""


def serve_torchrun_rank(options: Any) -> None:
    """Under torchrun, what every process but RANK 0 runs: serve the ring until rank 0 stops it."""
    ranks = parse_devices("torchrun")
    assert ranks is not None
    cfg = load_model_config(options.model)
    split = list(options.parallel.split) if options.parallel.split else even_split(cfg.dit.num_layers, ranks.world)
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    rank_main(RankSpec(rank, ranks.world, ranks, options.model_dump(mode="json"), "env://", split), None, None, None)
