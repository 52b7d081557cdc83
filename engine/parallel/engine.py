"""The caller's side of the pipeline-parallel engine: the same session API as engine.runtime's
StreamEngine (open_session -> push / flush / update / close, info, stats, close), backed by N ranks.

    engine = StreamEngine.create(EngineOptions(model="tiny", device="cpu:2"))   # or "cuda:0,1"
    s = engine.open_session("a watercolor painting")
    outputs = s.push(frames, pts) + s.flush()
    engine.close()

The calling process is a coordinator, not a rank: it spawns one process per rank (multiprocessing
'spawn'), sends each session's chunks and updates to rank 0 over a pipe and gets frames back from it. A
reader thread takes every event as it comes (so no rank ever blocks on a full pipe) and watches the
rank processes: a rank that dies, reports an error or stops making progress fails the whole engine,
and every session call raises EngineFailure within about a second (stall: `stall_timeout_s`).

Frames a session pushes are cut into chunks here, exactly as StreamSession does; `parallel.inflight`
chunks of a session may be in flight before push() waits (1: push returns its own chunks' outputs).
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np
from pydantic import TypeAdapter

from engine.config import ModelConfig
from engine.parallel import protocol as P
from engine.parallel.balance import even_split
from engine.parallel.devices import validate_local
from engine.parallel.errors import EngineFailure
from engine.session import CHUNK, ChunkBuffer
from interface.controls import StreamParams, StreamUpdate
from interface.devices import RankDevices
from interface.messages import EngineInfo

log = logging.getLogger("engine.parallel")
_PLAIN_STATS = TypeAdapter(P.RingStats)  # rank 0's report as plain dicts, for callers that read keys

OutputFrame = tuple[np.ndarray, int]


class ParallelSession:
    def __init__(self, engine: "ParallelEngine", sid: int) -> None:
        self.engine, self.sid = engine, sid
        self.id = uuid.uuid4().hex[:12]
        self.stats: dict[str, float] = {}
        self.chunks_in = 0
        self.closed = False
        self._started = False  # the VAE stream has had its frame 0
        self._frame0: Optional[np.ndarray] = None  # a fresh stream's frame 0, sent alone, until more follow
        self._input = ChunkBuffer(engine.info.height, engine.info.width)
        self._updates: list[StreamUpdate] = []
        self._outputs: list[OutputFrame] = []  # filled by the engine's reader thread
        self._seq = 0
        self._done = -1
        self._chunks: set[int] = set()  # chunk commands not completed yet
        self._error: Optional[str] = None

    # -- called by the reader thread (under the engine's lock) -----------------------------------------
    def _on_output(self, ev: P.Output) -> None:
        self._outputs.extend(zip(ev.frames, ev.pts))
        self.stats = {k: float(v) for k, v in ev.stats.items()}

    def _on_done(self, ev: P.Done) -> None:
        self._done = max(self._done, ev.seq)
        self._chunks = {s for s in self._chunks if s > self._done}
        if ev.error and self._error is None:
            self._error = ev.error

    # -- public API (as engine.session.StreamSession) --------------------------------------------------
    @property
    def chunk_frames(self) -> int:
        """As StreamSession: a fresh stream's frame 0 alone (rank 0 encodes it on arrival and the ranks
        prepare the first chunk's forward while frames 1-4 are on their way), then chunks of 4."""
        return CHUNK if self._started else 1

    def push(self, frames: np.ndarray, pts: Sequence[int], early: Optional[Callable] = None) -> list[OutputFrame]:
        """frames uint8 [T, H, W, 3] at the engine's size, with one pts each; any T (buffered). `early`
        is not used: a fresh stream's frame 0 comes back from the last rank ahead of the rest of its
        chunk on its own, and leaves with whatever returns or takes frames first."""
        self._check_open()
        self._input.add(frames, pts)
        depth = self.engine.options.parallel.inflight
        while True:
            if self._updates:
                self._send_updates()
            got = self._input.take(self.chunk_frames)
            if got is None:
                break
            self._wait(lambda: len(self._chunks) < depth, "a chunk slot")
            self._send_chunk(*got)
        self._wait(lambda: len(self._chunks) <= depth - 1, "chunks in flight")
        return self._take()

    def update(self, update: StreamUpdate) -> None:
        """Queue a live change; it is applied at the next chunk boundary."""
        self._check_open()
        self._updates.append(update)

    def take_finished(self) -> list[OutputFrame]:
        """Frames the ranks finished since the last push or take (never waits)."""
        return [] if self.closed else self._take()

    def flush(self) -> list[OutputFrame]:
        """Drain the chunks in flight; leftover frames are padded with the last one (as StreamSession)."""
        self._check_open()
        if self._updates:
            self._send_updates()
        rest = self._input.take_rest(self.chunk_frames)
        if rest is not None:
            self._send_chunk(*rest)
        if self._frame0 is not None:  # frame 0 alone: pad its first chunk with copies of it
            self._send_chunk(np.stack([self._frame0] * CHUNK), [None] * CHUNK)
        seq = self._send(lambda s: P.DrainCmd(self.sid, s))
        self._wait(lambda: self._done >= seq, "the drain")
        return self._take()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine._close_session(self)

    # -- internals -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")
        self.engine._check()
        if self._error:
            raise RuntimeError(f"session {self.id} failed: {self._error}")

    def _send(self, make: Callable[[int], Any]) -> int:
        seq = self._seq
        self._seq += 1
        self.engine._command(make(seq))
        return seq

    def _send_chunk(self, chunk: np.ndarray, pts: list) -> None:
        with self.engine._cond:
            seq = self._seq
            self._chunks.add(seq)
        self._send(lambda s: P.ChunkCmd(self.sid, s, chunk, pts))
        self._frame0 = chunk[0] if not self._started else None
        self._started = True
        if self._frame0 is None:  # frame 0 alone is not a chunk yet (as in StreamSession)
            self.chunks_in += 1

    def _send_updates(self) -> None:
        updates, self._updates = self._updates, []
        for u in updates:
            if u.reset:
                self._started = False  # a new VAE stream: its frame 0 goes alone
                self._frame0 = None
            self._send(lambda s, u=u: P.UpdateCmd(self.sid, s, u.model_dump(exclude_unset=True)))

    def _wait(self, pred: Callable[[], bool], what: str) -> None:
        self.engine._wait(lambda: pred() or self._error is not None, what)
        if self._error:
            raise RuntimeError(f"session {self.id} failed: {self._error}")

    def _take(self) -> list[OutputFrame]:
        with self.engine._cond:
            out, self._outputs = self._outputs, []
        return out


class ParallelEngine:
    """N ranks behind the StreamEngine API. See the module docstring and docs/PARALLEL.md."""

    finishes_in_background = True  # sessions' frames arrive between pushes: see take_finished()

    def __init__(self, cfg: ModelConfig, options: Any, ranks: RankDevices) -> None:
        self.cfg, self.options, self.ranks = cfg, options, ranks
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
        self._cond = threading.Condition(threading.RLock())
        self._failure: Optional[EngineFailure] = None
        self._sessions: dict[int, ParallelSession] = {}
        self._stats: dict = {}  # the latest RingStats as plain values (stats(), wait_stats())
        self._ring_stats: Optional[P.RingStats] = None
        self._ready: Optional[P.Ready] = None
        self._ping: Optional[P.PingResult] = None
        self._next_sid = 0
        self._closing = False
        self._closed = False
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
        from engine.parallel.rank import RankSpec
        from engine.parallel.rank_process import rank_main

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

    def __enter__(self) -> "ParallelEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _on_event(self, ev: Any) -> None:
        with self._cond:
            if isinstance(ev, P.Output):
                s = self._sessions.get(ev.sid)
                if s is not None:
                    s._on_output(ev)
            elif isinstance(ev, P.Done):
                s = self._sessions.get(ev.sid)
                if s is not None:
                    s._on_done(ev)
            elif isinstance(ev, P.Stats):
                self._ring_stats = ev.stats
                self._stats = _PLAIN_STATS.dump_python(ev.stats)  # nested dataclasses and models as dicts
            elif isinstance(ev, P.Ready):
                self._ready = ev
            elif isinstance(ev, P.PingResult):
                self._ping = ev
            elif isinstance(ev, P.Failed):
                if not self._closing:
                    self._fail(self._blame(EngineFailure(ev.message, ev.rank)))
            self._cond.notify_all()

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
        with self._cond:
            if self._failure is None:
                self._failure = failure
                log.error("parallel engine failed: %s", failure)
            self._cond.notify_all()
        threading.Thread(target=self._kill_ranks, daemon=True).start()  # their ring is broken for good

    # -- plumbing --------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._failure is not None:
            raise EngineFailure(str(self._failure), self._failure.rank) from self._failure
        if self._closed or self._closing:
            raise RuntimeError("the engine is closed")

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

    # -- public API ------------------------------------------------------------------------------------
    def open_session(self, prompt: str, params: Optional[StreamParams] = None) -> ParallelSession:
        self._check()
        params = params or StreamParams()
        with self._cond:
            sid = self._next_sid
            self._next_sid += 1
            s = ParallelSession(self, sid)
            self._sessions[sid] = s
        seq = s._send(lambda q: P.OpenCmd(sid, q, prompt, params.model_dump()))
        self._wait(lambda: s._done >= seq or s._error is not None, "the session to open")
        if s._error:
            with self._cond:
                self._sessions.pop(sid, None)
            raise ValueError(f"cannot open a session: {s._error}")
        return s

    def _close_session(self, s: ParallelSession) -> None:
        with self._cond:
            self._sessions.pop(s.sid, None)
        if self._failure is None and not self._closing and not self._closed:
            s._send(lambda q: P.CloseCmd(s.sid, q))

    def stats(self) -> dict:
        """The latest scheduler snapshot from rank 0 (split, stage times, block moves, batch sizes)."""
        with self._cond:
            out = dict(self._stats)
        out["failed"] = None if self._failure is None else str(self._failure)
        out["pids"] = [p.pid for p in self._procs]
        return out

    def ring_stats(self) -> Optional[P.RingStats]:
        """The latest report from rank 0, typed (None before its first)."""
        with self._cond:
            return self._ring_stats

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

    def wait_stats(self, pred: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """Block until the stats snapshot satisfies `pred` (tests, benchmarks)."""
        self._wait(lambda: pred(self._stats), "a stats condition", timeout=timeout)
        return self.stats()

    def synchronize(self) -> None:
        """Outputs arrive on the host already; nothing to wait for."""


def serve_torchrun_rank(options: Any) -> None:
    """Under torchrun, what every process but RANK 0 runs: serve the ring until rank 0 stops it."""
    from engine.parallel.devices import parse_devices
    from engine.parallel.rank import RankSpec
    from engine.parallel.rank_process import rank_main
    from engine.config import load_model_config

    ranks = parse_devices("torchrun")
    assert ranks is not None
    cfg = load_model_config(options.model)
    split = list(options.parallel.split) if options.parallel.split else even_split(cfg.dit.num_layers, ranks.world)
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    rank_main(RankSpec(rank, ranks.world, ranks, options.model_dump(mode="json"), "env://", split), None, None, None)
