"""The server's side of the engine process: spawn it, talk to it, notice when it dies.

The pipe is read from the event loop (`add_reader`), so replies are dispatched without threads.
Requests are small dicts and the sessions keep at most one chunk each in flight, so a send never
waits on a full pipe for long.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from multiprocessing.connection import Connection
from typing import Optional, Protocol

from pydantic import BaseModel, ValidationError

from interface.messages import (
    CloseSession,
    EngineFailed,
    EngineInfo,
    EngineReady,
    FramesOut,
    OpenSession,
    PipelineStats,
    SessionClosed,
    SessionError,
    SessionOpened,
    Shutdown,
    WorkerOptions,
    decode_from_engine,
    encode,
)
from interface.process import ENGINE_MODULE, run_main

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine process is starting, failed, or gone."""


class SessionHandler(Protocol):
    def on_engine_message(self, message: FramesOut | SessionError) -> None: ...

    def on_engine_lost(self, reason: str) -> None: ...


class EngineClient:
    def __init__(self, options: WorkerOptions, start_timeout_s: float = 900.0) -> None:
        self.options = options
        self.start_timeout_s = start_timeout_s
        self.state = "stopped"  # stopped | starting | ready | failed
        self.info: Optional[EngineInfo] = None
        self.pipeline: Optional[PipelineStats] = None  # the latest, from a pipeline-parallel engine
        self.error: Optional[str] = None
        self.fatal = False  # it failed to load (bad weights, no such device): restarting won't help
        self._lost_event = asyncio.Event()
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._conn: Optional[Connection] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready: Optional[asyncio.Future[EngineInfo]] = None
        self._handlers: dict[str, SessionHandler] = {}
        self._opening: dict[str, asyncio.Future[SessionOpened]] = {}
        self._closing: dict[str, asyncio.Future[None]] = {}

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    async def start(self) -> EngineInfo:
        """Spawn the engine process and wait until it has built its model."""
        self._loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        # Not a daemon: a pipeline-parallel engine starts its rank processes from here, which daemonic
        # processes may not. stop() shuts it down (Shutdown, then terminate/kill), and the worker also
        # exits on its own when this end of the pipe closes.
        process = ctx.Process(
            target=run_main, args=(ENGINE_MODULE, theirs, self.options.model_dump()), name="streamgen-engine",
            daemon=False,
        )
        if self._process is not None:
            self._process.join(0)  # reap the previous engine
        self.state, self.error, self.info, self.fatal = "starting", None, None, False
        self.pipeline = None
        self._lost_event = asyncio.Event()
        self._ready = self._loop.create_future()
        process.start()
        theirs.close()  # the child holds its end; closing ours lets EOF mean "engine gone"
        self._process, self._conn = process, ours
        self._loop.add_reader(ours.fileno(), self._on_readable)
        self._loop.add_reader(process.sentinel, self._on_exit)
        log.info("engine process %d starting: %s", process.pid, self.options.model_dump(exclude_none=True))
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), self.start_timeout_s)
        except asyncio.TimeoutError:
            self._lost(f"engine did not start within {self.start_timeout_s:.0f} s")
            raise EngineUnavailable(self.error) from None

    async def wait_lost(self) -> str:
        """Returns (with the reason) once the running engine is gone."""
        await self._lost_event.wait()
        return self.error or "engine lost"

    # -- requests ---------------------------------------------------------------------------------------
    def send(self, message: BaseModel) -> None:
        if self.state != "ready" or self._conn is None:
            raise EngineUnavailable(f"engine is {self.state}" + (f": {self.error}" if self.error else ""))
        try:
            self._conn.send(encode(message))
        except (BrokenPipeError, OSError) as exc:
            self._lost(f"engine pipe broke: {exc}")
            raise EngineUnavailable(self.error) from None

    async def open_session(self, request: OpenSession, handler: SessionHandler, timeout_s: float = 60.0) -> SessionOpened:
        assert self._loop is not None
        future: asyncio.Future[SessionOpened] = self._loop.create_future()
        self._opening[request.session_id] = future
        self._handlers[request.session_id] = handler
        try:
            self.send(request)
            return await asyncio.wait_for(future, timeout_s)
        except BaseException:
            self._handlers.pop(request.session_id, None)
            raise
        finally:
            self._opening.pop(request.session_id, None)

    async def close_session(self, session_id: str, timeout_s: float = 10.0) -> None:
        """Ask the engine to drop the session; returns once it let go of the rings (or gave up)."""
        self._handlers.pop(session_id, None)
        if self.state != "ready" or self._loop is None:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._closing[session_id] = future
        try:
            self.send(CloseSession(session_id=session_id))
            await asyncio.wait_for(future, timeout_s)
        except (EngineUnavailable, asyncio.TimeoutError) as exc:
            log.warning("session %s: engine did not confirm the close: %s", session_id, exc or "timeout")
        finally:
            self._closing.pop(session_id, None)

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is None:
            return
        if self.state == "ready" and self._conn is not None:
            try:
                self._conn.send(encode(Shutdown()))
            except OSError:
                pass
        process = self._process
        self._detach("engine stopped")
        self.state = "stopped"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, process.join, timeout_s)
        if process.is_alive():
            log.warning("engine process %d did not exit; terminating", process.pid)
            process.terminate()
            await loop.run_in_executor(None, process.join, 5.0)
        if process.is_alive():
            process.kill()
        self._process = None

    # -- replies ----------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        conn = self._conn
        try:
            while conn is not None and conn is self._conn and conn.poll():
                data = conn.recv()
                try:
                    message = decode_from_engine(data)
                except ValidationError as exc:
                    log.error("unreadable message from the engine: %s", exc)
                    continue
                self._dispatch(message)
        except (EOFError, OSError):
            self._lost("engine process closed its pipe")

    def _dispatch(self, message: BaseModel) -> None:
        if isinstance(message, EngineReady):
            self.info, self.state = message.info, "ready"
            if self._ready and not self._ready.done():
                self._ready.set_result(message.info)
        elif isinstance(message, PipelineStats):
            self.pipeline = message
        elif isinstance(message, EngineFailed):
            # Before it was ready: it cannot load (fatal). Later (a pipeline rank died): a crash, restarted.
            starting = self.state == "starting"
            self.fatal = starting
            self._lost(f"engine failed to start: {message.message}" if starting else message.message)
        elif isinstance(message, SessionOpened):
            future = self._opening.get(message.session_id)
            if future and not future.done():
                future.set_result(message)
        elif isinstance(message, SessionClosed):
            future = self._closing.get(message.session_id)
            if future and not future.done():
                future.set_result(None)
        elif isinstance(message, (FramesOut, SessionError)):
            opening = self._opening.get(message.session_id)
            if isinstance(message, SessionError) and opening and not opening.done():
                opening.set_exception(EngineUnavailable(f"engine could not open the session: {message.message}"))
                return
            handler = self._handlers.get(message.session_id)
            if handler is not None:
                handler.on_engine_message(message)
            elif isinstance(message, SessionError):
                log.warning("engine error for unknown session %s: %s", message.session_id, message.message)

    def _on_exit(self) -> None:
        code = self._process.exitcode if self._process else None
        self._lost(f"engine process exited (code {code})")

    def _detach(self, reason: str) -> None:
        if self._loop is not None:
            if self._conn is not None:
                self._loop.remove_reader(self._conn.fileno())
            if self._process is not None:
                self._loop.remove_reader(self._process.sentinel)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for future in [*self._opening.values(), *self._closing.values()]:
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        if self._ready and not self._ready.done():
            self._ready.set_exception(EngineUnavailable(reason))
            self._ready.exception()  # mark retrieved: start() may already have timed out

    def _lost(self, reason: str) -> None:
        if self.state in ("failed", "stopped"):
            return
        log.error("%s", reason)
        self.state, self.error = "failed", reason
        if self._process is not None and self._process.is_alive():
            self._process.kill()  # a broken or stuck engine serves no one; free its memory now
        self._detach(reason)
        handlers, self._handlers = self._handlers, {}
        for handler in handlers.values():
            handler.on_engine_lost(reason)
        self._lost_event.set()
