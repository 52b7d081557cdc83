"""A session output that runs off the event loop: a worker thread fed through a bounded queue.

Encoding H.264, writing a file, pushing to an RTMP server or a virtual camera may block for
milliseconds or, when a network peer stalls, for seconds; none of it may happen on the event loop
that paces every session. The loop only hands frames over (`offer`, never blocks); when the worker
falls behind, the oldest waiting frame is dropped (counted), so memory and delay stay bounded and
what does go out is recent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Generic, Optional, TypeVar

from av import VideoFrame

from server.media.pacing import CLOCK_RATE
from server.schemas import OutputInfo, OutputKind, OutputState, Size

log = logging.getLogger(__name__)

T = TypeVar("T")
QUEUE_FRAMES = 32  # about a second of video: rides out a hiccup, never a backlog
STOP_TIMEOUT_S = 20.0


class DropOldestQueue(Generic[T]):
    """A thread-safe bounded FIFO whose `put` never blocks: a full queue drops its oldest item."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T) -> int:
        """Queue an item; returns how many old ones were dropped (0 or 1), or 1 when closed."""
        with self._cond:
            if self._closed:
                return 1
            self._items.append(item)
            dropped = 0
            while len(self._items) > self._maxsize:
                self._items.popleft()
                dropped += 1
            self._cond.notify()
            return dropped

    def get(self, timeout: Optional[float] = None) -> Optional[T]:
        """The oldest item; None once closed and empty (or after `timeout` with nothing)."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def close(self, discard: bool = False) -> None:
        """No more puts; `get` returns what is left, then None. `discard` empties it now."""
        with self._cond:
            self._closed = True
            if discard:
                self._items.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class FrameSink(ABC):
    """One output of a session. Subclasses say how to open, write one frame and close; this class
    owns the thread, the queue, the state and the counts."""

    kind: OutputKind

    def __init__(self, output_id: str, target: str, queue_frames: int = QUEUE_FRAMES) -> None:
        self.id = output_id
        self.target = target  # what the API shows: a path, or a URL with its secrets masked
        self.state: OutputState = "starting"
        self.error: Optional[str] = None
        self.frames_written = 0
        self.dropped = 0
        self.size: Optional[tuple[int, int]] = None
        self.started_at = time.time()
        self._first_pts: Optional[int] = None
        self._last_pts: Optional[int] = None
        self._queue: DropOldestQueue[VideoFrame] = DropOldestQueue(queue_frames)
        self._thread = threading.Thread(target=self._run, name=f"output-{self.kind}-{output_id[:8]}", daemon=True)
        self._opened = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._finished: Optional[asyncio.Future[None]] = None

    # -- the loop's side --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (on the event loop, which `stop` then waits on without a thread)."""
        self._loop = asyncio.get_running_loop()
        self._finished = self._loop.create_future()
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.state in ("stopped", "failed") or self._queue.closed

    def offer(self, frame: VideoFrame) -> None:
        """Hand a frame to the worker (never blocks). The frame is shared with other consumers:
        the worker must not change it."""
        if not self.done:
            self.dropped += self._queue.put(frame)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Let the worker write what is queued, finish (trailer, flush) and exit."""
        self._queue.close()
        if self._finished is None:  # never started
            return
        try:  # not thread.join in an executor: a stalled peer would hold a thread the sessions need
            await asyncio.wait_for(asyncio.shield(self._finished), timeout_s)
        except asyncio.TimeoutError:  # a network peer that stalls past every timeout: leave the daemon
            log.warning("output %s (%s) did not finish within %.0f s", self.id, self.target, timeout_s)
            self.error = self.error or f"did not finish within {timeout_s:.0f} s"

    def info(self) -> OutputInfo:
        duration = None
        if self._first_pts is not None and self._last_pts is not None:
            duration = round((self._last_pts - self._first_pts) / CLOCK_RATE, 3)
        return OutputInfo(
            output_id=self.id,
            kind=self.kind,
            target=self.target,
            state=self.state,
            error=self.error,
            frames_written=self.frames_written,
            dropped=self.dropped,
            duration_s=duration,
            size=Size(width=self.size[0], height=self.size[1]) if self.size else None,
            started_at=self.started_at,
        )

    # -- the worker's side ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (frame := self._queue.get()) is not None:
                if not self._opened:
                    self.size = (frame.width, frame.height)  # fixed from the first frame on
                    self._open(frame.width, frame.height)
                    self._opened = True
                self._write(frame)
                self.frames_written += 1
                if self.state == "starting":  # network outputs connect on their first write
                    self.state = "running"
                    log.info("output %s: %s %s running at %dx%d", self.id, self.kind, self.target,
                             frame.width, frame.height)
                if self._first_pts is None:
                    self._first_pts = frame.pts
                self._last_pts = frame.pts
        except Exception as exc:  # the output fails, the session goes on
            self._fail(exc)
        finally:
            self._queue.close(discard=True)
            try:
                if self._opened:
                    self._close()
                else:
                    self._abandon()
            except Exception as exc:
                self._fail(exc)
            if self.state != "failed":
                self.state = "stopped"
                log.info("output %s: %s stopped after %d frames", self.id, self.kind, self.frames_written)
            self._signal_finished()

    def _signal_finished(self) -> None:
        loop, finished = self._loop, self._finished
        if loop is None or finished is None:
            return
        def resolve() -> None:
            if not finished.done():
                finished.set_result(None)

        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits
            pass

    def _fail(self, exc: BaseException) -> None:
        if self.state != "failed":
            self.state = "failed"
            self.error = self._redact(f"{type(exc).__name__}: {exc}")
            log.warning("output %s (%s %s) failed: %s", self.id, self.kind, self.target, self.error)

    def _redact(self, text: str) -> str:
        """Error text as the API may show it (a subclass masks secrets such as stream keys)."""
        return text

    @abstractmethod
    def _open(self, width: int, height: int) -> None:
        """Open the destination for frames of this size (the worker thread; may block)."""

    @abstractmethod
    def _write(self, frame: VideoFrame) -> None:
        """Write one frame (the worker thread; may block). Must not modify `frame`."""

    @abstractmethod
    def _close(self) -> None:
        """Flush and close (the worker thread; may block)."""

    def _abandon(self) -> None:
        """The output ends without having opened (no frame came, or opening failed)."""
