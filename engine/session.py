"""One stream session as the caller sees it: frames + pts in, generated frames + pts out, live updates
(docs/ARCHITECTURE.md §6). The same class serves every engine: the session cuts frames into chunks
and sends commands to the engine's core; the core's schedule (engine.schedule) does the streaming, in
the caller's thread (engine.runtime) or in rank processes (engine.parallel.engine).

    s = engine.open_session("a watercolor painting")
    outputs = s.push(frames_uint8_THW3, pts) + s.flush()   # [(frame, pts), ...]
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np

from engine import protocol as P
from engine.protocol import CHUNK
from interface.controls import StreamUpdate

OutputFrame = tuple[np.ndarray, int]
EarlyFrames = Callable[[list[OutputFrame]], None]


def check_frames(frames: np.ndarray, pts: Sequence[int], height: int, width: int) -> np.ndarray:
    """The input contract of push(): uint8 [T, height, width, 3] with one pts per frame."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != (height, width, 3) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, {height}, {width}, 3], got {frames.dtype} {list(frames.shape)}")
    if len(pts) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(pts)} pts")
    return frames


class ChunkBuffer:
    """push() input not yet cut into chunks, with its pts. The first `ahead` frames went to the core
    before their chunk was whole (their encode starts on arrival); they stay here until it is."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.frames: list[np.ndarray] = []
        self.pts: list[int] = []
        self.ahead = 0

    def add(self, frames: np.ndarray, pts: Sequence[int]) -> None:
        self.frames.extend(check_frames(frames, pts, self.height, self.width))
        self.pts.extend(int(p) for p in pts)

    def take(self, n: int) -> Optional[tuple[np.ndarray, list]]:
        """The n frames after those sent ahead, and their pts (the chunk's frames leave the buffer); None
        while fewer are buffered."""
        end = self.ahead + n
        if len(self.frames) < end:
            return None
        chunk, pts = np.stack(self.frames[self.ahead : end]), self.pts[self.ahead : end]
        del self.frames[:end], self.pts[:end]
        self.ahead = 0
        return chunk, pts

    def take_ahead(self) -> Optional[tuple[np.ndarray, list]]:
        """The frames not sent ahead yet (fewer than a chunk: take() comes first), now marked sent."""
        if len(self.frames) == self.ahead:
            return None
        chunk, pts = np.stack(self.frames[self.ahead :]), self.pts[self.ahead :]
        self.ahead = len(self.frames)
        return chunk, pts

    def take_rest(self, n: int) -> Optional[tuple[np.ndarray, list]]:
        """What is left of a chunk that needs n more frames than were sent ahead, padded with the last
        frame; the padding's pts are None (it is computed, never output). None when nothing is left."""
        if not self.frames:
            return None
        short = n - (len(self.frames) - self.ahead)
        chunk = np.stack(self.frames[self.ahead :] + [self.frames[-1]] * short)
        pts: list = self.pts[self.ahead :] + [None] * short
        self.frames, self.pts, self.ahead = [], [], 0
        return chunk, pts


class Session:
    def __init__(self, engine: Any, sid: int) -> None:
        """`engine` is the engine.frontend.EngineFrontend that opened it (commands, waits, its lock)."""
        self.engine, self.sid = engine, sid
        self.id = uuid.uuid4().hex[:12]
        self.stats: dict[str, float] = {}
        self.chunks_in = 0
        self.dropped = 0  # frames its output ring had no room for (sessions opened with one)
        self.closed = False
        self._started = False  # the VAE stream has had its frame 0
        self._frame0: Optional[tuple[np.ndarray, int]] = None  # a fresh stream's frame 0 and pts, sent alone, until more follow
        self._input = ChunkBuffer(engine.info.height, engine.info.width)
        self._updates: list[StreamUpdate] = []
        self._outputs: list[OutputFrame] = []  # filled by the engine's events
        self._seq = 0
        self._done = -1
        self._chunks: set[int] = set()  # chunk commands not completed yet
        self._error: Optional[str] = None

    # -- events from the core (under the engine's lock) --------------------------------------------------
    def _on_output(self, ev: P.Output) -> None:
        if ev.first_seq is None:
            self._outputs.extend(zip(ev.frames, ev.pts))
        else:  # in the output ring: (slot seq, pts)
            self._outputs.extend((ev.first_seq + i, p) for i, p in enumerate(ev.pts))
            self.dropped += ev.dropped
        self.stats = {k: float(v) for k, v in ev.stats.items()}

    def _on_done(self, ev: P.Done) -> None:
        self._done = max(self._done, ev.seq)
        self._chunks = {s for s in self._chunks if s > self._done}
        if ev.error and self._error is None:
            self._error = ev.error

    # -- public API --------------------------------------------------------------------------------------
    @property
    def chunk_frames(self) -> int:
        """How many frames complete the next chunk: a fresh stream's frame 0 alone (the core encodes it
        on arrival and prepares the first chunk's forward while frames 1-4 are on their way), then chunks
        of 4 (the first of them completes the DiT's 5-frame first chunk), less the frames of it already
        pushed. Fewer frames may come: they go to the core at once, ahead of their chunk (its encode
        starts on them; docs/ARCHITECTURE.md §8)."""
        return CHUNK - self._input.ahead if self._started else 1

    def push(self, frames: np.ndarray, pts: Sequence[int], early: Optional[EarlyFrames] = None) -> list[OutputFrame]:
        """frames uint8 [T, H, W, 3] at the engine's size, with one pts each; any T (buffered).

        Returns the generated frames that are ready, in order. Up to `engine.inflight` chunks of this
        session may still be on their way when it returns; their frames come with a later push, from
        take_finished(), or from flush(). With `early`, frames that arrive while the push waits (a
        fresh stream's first frame leaves ahead of the rest of its chunk) are handed to it at once and
        not returned again."""
        self._check_open()
        self._input.add(frames, pts)
        self._send_buffered(lambda: self._wait(self._room, "a chunk slot", early))
        if early is not None and self._outputs:  # e.g. a fresh stream's frame 0, ahead of its chunk
            early(self._take())
        self._wait(self._room, "chunks in flight", early)
        return self._take()

    def offer(self, frames: np.ndarray, pts: Sequence[int]) -> list[OutputFrame]:
        """push() that never waits, for a caller serving many sessions from one thread (the engine
        process's request loop, where a push waiting for one session's chunk left the other sessions'
        chunks unread meanwhile). The chunks go to the core at once; the frames that are ready come back,
        later ones from take_finished(). The caller keeps to has_room(): it offers the next chunk only
        once there is room (the core would queue it anyway)."""
        self._check_open()
        self._input.add(frames, pts)
        self._send_buffered(None)
        return self._take()

    def has_room(self) -> bool:
        """Whether fewer than `engine.inflight` of this session's chunks are in flight: a push would
        return now. Raises RuntimeError once the session has failed."""
        if self._error:
            raise RuntimeError(f"session {self.id} failed: {self._error}")
        return self._room()

    def update(self, update: StreamUpdate) -> None:
        """Queue a live change; it is applied at the next chunk boundary."""
        self._check_open()
        self._updates.append(update)

    def take_finished(self) -> list[OutputFrame]:
        """Frames finished since the last push or take, in order (never waits)."""
        if self.closed:
            return []
        self.engine._poll()
        return self._take()

    def flush(self) -> list[OutputFrame]:
        """Drain the chunks in flight (the stream can go on afterwards). Leftover frames short of a
        chunk are padded with the last frame so that every input frame yields one output frame."""
        self._check_open()
        if self._updates and not self._input.ahead:  # updates come at a chunk boundary
            self._send_updates()
        rest = self._input.take_rest(self.chunk_frames)
        if rest is not None:
            self._send_chunk(*rest)
        if self._updates:
            self._send_updates()
        if self._frame0 is not None:  # frame 0 alone: pad its first chunk with copies of it
            self._send_chunk(np.stack([self._frame0[0]] * CHUNK), [None] * CHUNK)
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
            self._chunks.add(self._seq)
        self._send(lambda s: P.ChunkCmd(self.sid, s, chunk, pts))
        self._frame0 = (chunk[0], pts[0]) if not self._started else None
        self._started = True
        if self._frame0 is None:  # frame 0 alone is not a chunk yet
            self.chunks_in += 1

    def _room(self) -> bool:
        return len(self._chunks) < self.engine.inflight

    def _send_buffered(self, before_chunk: Optional[Callable[[], None]]) -> None:
        """Updates (at chunk boundaries), the whole chunks buffered so far and then the frames of the next
        chunk ahead of it to the core (`before_chunk` runs before each chunk: push() waits there for a
        slot), then let the core take them in (encodes, the forwards queued)."""
        while True:
            if self._updates and not self._input.ahead:
                self._send_updates()
            got = self._input.take(self.chunk_frames)
            if got is None:
                break
            if before_chunk is not None:
                before_chunk()
            self._send_chunk(*got)
        if self._started and (ahead := self._input.take_ahead()) is not None:
            self._send(lambda s: P.AheadCmd(self.sid, s, *ahead))
        self.engine._pump()

    def _send_updates(self) -> None:
        updates, self._updates = self._updates, []
        for u in updates:
            if u.reset:
                self._started = False  # a new VAE stream: its frame 0 goes alone
                if self._frame0 is not None:  # not generated yet: the new stream starts from it again
                    self._input.frames.insert(0, self._frame0[0])
                    self._input.pts.insert(0, self._frame0[1])
                self._frame0 = None
            self._send(lambda s, u=u: P.UpdateCmd(self.sid, s, u.model_dump(exclude_unset=True)))

    def _wait(self, pred: Callable[[], bool], what: str, early: Optional[EarlyFrames] = None) -> None:
        while True:
            self.engine._wait(lambda: pred() or self._error is not None or (early is not None and bool(self._outputs)),
                              what)
            if self._error:
                raise RuntimeError(f"session {self.id} failed: {self._error}")
            if pred():  # frames that came with what it waited for are the push's return value
                return
            if early is not None and self._outputs:
                early(self._take())

    def _take(self) -> list[OutputFrame]:
        with self.engine._cond:
            out, self._outputs = self._outputs, []
        return out
