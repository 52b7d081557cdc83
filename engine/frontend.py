"""The caller's side of an engine (docs/ARCHITECTURE.md §6): sessions (engine.session) send
commands (engine.protocol) to the engine's core, rank 0 (engine.parallel.rank0), and its events come
back here. The two executors differ only in where the core runs:

- engine.runtime.StreamEngine: a ring of one in the caller's thread; waiting for a result steps it;
- engine.parallel.engine.ParallelEngine: rank processes; a reader thread takes their events.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable, Optional

from pydantic import TypeAdapter

from engine import protocol as P
from engine.errors import EngineFailure
from engine.session import Session
from interface.controls import StreamParams
from interface.messages import EngineInfo

log = logging.getLogger(__name__)
_PLAIN_STATS = TypeAdapter(P.RingStats)


def plain_stats(stats: P.RingStats) -> dict:
    """The core's report as plain dicts (nested dataclasses and models too), for callers that read keys."""
    return _PLAIN_STATS.dump_python(stats)


class EngineFrontend:
    info: EngineInfo
    # whether a session's frames may arrive between its pushes (take_finished() then gives them)
    finishes_in_background: bool = True

    def __init__(self, options: Any) -> None:
        self.options = options
        self._cond = threading.Condition(threading.RLock())
        self._failure: Optional[EngineFailure] = None
        # weak: a session holds its engine, and a dropped session must not keep a dropped engine alive
        self._sessions: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()
        self._stats: dict = {}  # the latest RingStats as plain values (stats(), wait_stats())
        self._ring_stats: Optional[P.RingStats] = None
        self._ready: Optional[P.Ready] = None
        self._ping: Optional[P.PingResult] = None
        self._next_sid = 0
        self._closing = False
        self._closed = False

    # -- what an executor provides ---------------------------------------------------------------------
    def _command(self, cmd: Any) -> None:
        """Hand a command to the core."""
        raise NotImplementedError

    def _wait(self, pred: Callable[[], bool], what: str, timeout: Optional[float] = None) -> None:
        """Return once pred() holds (checked under the lock); EngineFailure if the engine fails first."""
        raise NotImplementedError

    def _pump(self) -> None:
        """Let the core take in the commands sent so far and start their work, without waiting."""

    def _poll(self) -> None:
        """Let the core hand over what it finished, without waiting."""

    def _fail(self, failure: EngineFailure) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = failure
                log.error("engine failed: %s", failure)
            self._cond.notify_all()

    @property
    def inflight(self) -> int:
        """Chunks of one session that push() may leave in flight before it waits for outputs."""
        return self.options.parallel.inflight or 1

    # -- events from the core --------------------------------------------------------------------------
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
                self._stats = plain_stats(ev.stats)
            elif isinstance(ev, P.Ready):
                self._ready = ev
            elif isinstance(ev, P.PingResult):
                self._ping = ev
            elif isinstance(ev, P.Failed):
                if not self._closing:
                    self._fail(self._blame(EngineFailure(ev.message, ev.rank)))
            self._cond.notify_all()

    def _blame(self, failure: EngineFailure) -> EngineFailure:
        return failure

    def _check(self) -> None:
        if self._failure is not None:
            raise EngineFailure(str(self._failure), self._failure.rank) from self._failure
        if self._closed or self._closing:
            raise RuntimeError("the engine is closed")

    # -- public API ------------------------------------------------------------------------------------
    def open_session(self, prompt: str, params: Optional[StreamParams] = None,
                     output_ring: Optional[str] = None) -> Session:
        """A new session. With `output_ring` (the name of an interface.frame_ring.FrameRing at the
        engine's size) the last stage writes the frames into it and the session's outputs are (slot seq,
        pts) pairs; without, they are (frame, pts)."""
        self._check()
        params = params or StreamParams()
        with self._cond:
            sid = self._next_sid
            self._next_sid += 1
            s = Session(self, sid)
            self._sessions[sid] = s
        seq = s._send(lambda q: P.OpenCmd(sid, q, prompt, params.model_dump(), output_ring))
        self._wait(lambda: s._done >= seq or s._error is not None, "the session to open")
        if s._error:
            with self._cond:
                self._sessions.pop(sid, None)
            raise ValueError(f"cannot open a session: {s._error}")
        return s

    def _close_session(self, s: Session) -> None:
        with self._cond:
            self._sessions.pop(s.sid, None)
        if self._failure is None and not self._closing and not self._closed:
            s._send(lambda q: P.CloseCmd(s.sid, q))

    def stats(self) -> dict:
        """The core's latest report (split, stage times, block moves, batch sizes) as plain values."""
        with self._cond:
            out = dict(self._stats)
        out["failed"] = None if self._failure is None else str(self._failure)
        return out

    def ring_stats(self) -> Optional[P.RingStats]:
        """The core's latest report, typed (None before its first)."""
        with self._cond:
            return self._ring_stats

    def wait_stats(self, pred: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """Block until the stats snapshot satisfies `pred` (tests, benchmarks)."""
        self._wait(lambda: pred(self._stats), "a stats condition", timeout=timeout)
        return self.stats()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "EngineFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
