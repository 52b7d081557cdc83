"""The engine process (engine/worker.py) driven directly over its pipe and rings, as the server
does: one process, several sessions with separate state, and a failing request that hurts only
its own session."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any, Iterator, Optional

import numpy as np
import pytest

from engine import worker
from interface.frame_ring import FrameRing
from interface.messages import (
    CloseSession,
    EngineReady,
    FramesOut,
    OpenSession,
    PipelineStats,
    PushFrames,
    SessionClosed,
    SessionError,
    SessionOpened,
    Shutdown,
    WorkerOptions,
    decode_from_engine,
    encode,
)

SIZE = 64  # the tiny model at 64x64 keeps this quick on two cores


def _recv(conn: Connection, timeout: float = 120.0, reports: Optional[list] = None) -> Any:
    """The next reply; a pipeline-parallel engine's state reports (sent on their own, about once a
    second) are skipped, and kept in `reports` when given."""
    while True:
        assert conn.poll(timeout), "the engine process did not answer"
        message = decode_from_engine(conn.recv())
        if not isinstance(message, PipelineStats):
            return message
        if reports is not None:
            reports.append(message)


@pytest.fixture(scope="module")
def engine_conn() -> Iterator[Connection]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    options = WorkerOptions(model="tiny", device="cpu", height=SIZE, width=SIZE, warmup=False)
    process = ctx.Process(target=worker.main, args=(theirs, options.model_dump()), daemon=True)
    process.start()
    theirs.close()
    ready = _recv(ours)
    assert isinstance(ready, EngineReady) and (ready.info.height, ready.info.width) == (SIZE, SIZE)
    yield ours
    ours.send(encode(Shutdown()))
    process.join(30)
    assert process.exitcode == 0


class Client:
    """One engine-side session seen from the server's side of the pipe."""

    def __init__(self, conn: Connection, session_id: str, prompt: str, seed: int = 0) -> None:
        self.conn, self.id = conn, session_id
        self.input = FrameRing.create(10, SIZE, SIZE)
        self.output = FrameRing.create(20, SIZE, SIZE)
        conn.send(encode(OpenSession(
            session_id=session_id, prompt=prompt, params={"seed": seed},
            input_ring=self.input.name, output_ring=self.output.name,
        )))
        opened = _recv(conn)
        assert isinstance(opened, SessionOpened) and opened.session_id == session_id
        self.chunk_frames = opened.chunk_frames
        self.pts = 0
        self.reports: list[PipelineStats] = []

    def send_chunk(self, frames: np.ndarray) -> None:
        first = self.input.write_seq
        for f in frames[: self.chunk_frames]:
            self.input.write(f, self.pts)
            self.pts += 3000
        self.conn.send(encode(PushFrames(session_id=self.id, first_seq=first, count=self.chunk_frames)))

    def exchange(self, frames: np.ndarray) -> tuple[list[FramesOut], list[tuple[np.ndarray, int]]]:
        """Push a chunk and read replies up to the push's own (partial ones come first)."""
        self.send_chunk(frames)
        replies, out = [], []
        while True:
            reply = _recv(self.conn, reports=self.reports)
            assert isinstance(reply, FramesOut), reply
            replies.append(reply)
            out += self.take(reply)
            if not reply.partial:
                return replies, out

    def take(self, reply: FramesOut) -> list[tuple[np.ndarray, int]]:
        assert reply.session_id == self.id
        self.chunk_frames = reply.chunk_frames
        out = [self.output.read(reply.first_seq + i) for i in range(reply.count)]
        self.output.release(reply.first_seq + reply.count)
        assert [p for _, p in out] == reply.pts
        return out

    def close(self) -> None:
        self.conn.send(encode(CloseSession(session_id=self.id)))
        reply = _recv(self.conn)
        while isinstance(reply, FramesOut) and reply.partial:  # frames finished after the last push
            reply = _recv(self.conn)
        assert isinstance(reply, SessionClosed), reply
        for ring in (self.input, self.output):
            ring.close()
            ring.unlink()


def _inputs(seed: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_sessions_in_one_engine_process_do_not_share_state(engine_conn: Connection) -> None:
    """A and C get the same prompt, seed and frames; B, in between them, gets others. A and C must
    come out bit-identical (state shared between sessions would make them differ), and B's
    frames must be B's (its own pts, other pixels)."""
    a = Client(engine_conn, "A", "a red fox", seed=1)
    b = Client(engine_conn, "B", "a blue whale", seed=2)
    c = Client(engine_conn, "C", "a red fox", seed=1)
    out: dict[str, list] = {"A": [], "B": [], "C": []}
    for round_ in range(3):
        for client, seed in ((a, 10 + round_), (b, 50 + round_), (c, 10 + round_)):
            out[client.id] += client.exchange(_inputs(seed))[1]
    assert len(out["A"]) >= 4
    assert [p for _, p in out["A"]] == [p for _, p in out["C"]] == [p for _, p in out["B"]]
    for (fa, _), (fc, _) in zip(out["A"], out["C"]):
        assert np.array_equal(fa, fc)
    assert not all(np.array_equal(fa, fb) for (fa, _), (fb, _) in zip(out["A"], out["B"]))
    for client in (a, b, c):
        client.close()


def test_a_failing_request_does_not_stop_other_sessions(engine_conn: Connection) -> None:
    good = Client(engine_conn, "good", "a forest")
    bad = Client(engine_conn, "bad", "a desert")

    engine_conn.send(encode(PushFrames(session_id="nobody", first_seq=0, count=4)))
    error = _recv(engine_conn)
    assert isinstance(error, SessionError) and error.session_id == "nobody" and not error.fatal

    engine_conn.send(encode(PushFrames(session_id="bad", first_seq=7, count=5)))  # never written
    error = _recv(engine_conn)
    assert isinstance(error, SessionError) and error.session_id == "bad" and error.fatal

    engine_conn.send({"kind": "push", "session_id": "good", "first_seq": "x"})  # malformed
    assert isinstance(_recv(engine_conn), SessionError)

    produced = 0
    for round_ in range(3):
        produced += len(good.exchange(_inputs(round_))[1])
    assert produced >= 4
    good.close()
    # The engine already dropped "bad": closing it again is harmless.
    bad.close()


def test_a_fresh_stream_sends_frame_zero_ahead(engine_conn: Connection) -> None:
    """A fresh session asks for frame 0 alone (encoded on arrival), then chunks of 4. The push that
    completes the first chunk sends the frames decoded first (frame 0 from its own latent, then frame 1)
    in a partial reply before its own reply with frames 2-4; every later chunk sends its frame 0 ahead
    of frames 1-3 (docs/ARCHITECTURE.md §8)."""
    client = Client(engine_conn, "F", "a harbour")
    assert client.chunk_frames == 1
    replies, out = client.exchange(_inputs(1, 1))
    assert [(r.partial, r.count) for r in replies] == [(False, 0)] and client.chunk_frames == 4
    replies, out = client.exchange(_inputs(2, 4))
    assert [(r.partial, r.count) for r in replies] == [(True, 2), (False, 3)]
    assert [p for _, p in out] == [0, 3000, 6000, 9000, 12000]
    later, split = [], 0
    for round_ in range(3):  # a chunk that lets none out (the stream batch fills up) gets an empty reply
        replies, out = client.exchange(_inputs(3 + round_, 4))
        counts = [(r.partial, r.count) for r in replies]
        assert counts in ([(False, 0)], [(True, 1), (False, 3)]), counts
        split += counts[0] == (True, 1)
        later += [p for _, p in out]
    assert split >= 2
    assert later == list(range(15000, 15000 + 3000 * len(later), 3000)) and len(later) >= 4
    client.close()


def test_engine_options_pipeline_one_stream_over_several_ranks() -> None:
    one = worker.engine_options(WorkerOptions(model="tiny", device="cpu"))
    assert one.step_lag == 1 and one.parallel.inflight is None  # one device: 2 chunks on CUDA, 1 on CPU
    two = worker.engine_options(WorkerOptions(model="tiny", device="cpu:2"))  # tiny runs 2 steps
    assert two.step_lag == 2 and two.parallel.inflight == 2
    assert worker.engine_options(WorkerOptions(model="tiny", device="cpu:3", step_lag=1)).step_lag == 1


def test_a_two_rank_engine_process_pipelines_one_session() -> None:
    """Over two ranks the server's engine keeps chunks of one session in flight: a push is answered
    before its chunk is done, and the frames come with later replies, every one once and in order."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    options = WorkerOptions(model="tiny", device="cpu:2", height=SIZE, width=SIZE, warmup=False)
    # not a daemon: the engine process starts its rank processes (as server/media/engine_client.py does)
    process = ctx.Process(target=worker.main, args=(theirs, options.model_dump()))
    process.start()
    theirs.close()
    try:
        assert isinstance(_recv(ours, 300.0), EngineReady)
        client = Client(ours, "P", "a lighthouse")
        counts, out, sent = [], [], []
        for round_ in range(8):
            sent += list(range(client.pts, client.pts + 3000 * client.chunk_frames, 3000))
            replies, got = client.exchange(_inputs(round_))
            counts.append(replies[-1].count)
            out += got
        assert counts[0] == 0, "the first push waited for its own chunk: nothing in flight"
        pts = [p for _, p in out]
        assert pts == sent[: len(pts)] and len(pts) >= 5 + 4 * 3
        time.sleep(1.2 * worker.PIPELINE_STATS_S)  # the ranks' latest figures reach the next report
        client.exchange(_inputs(99))
        # the engine process reported the pipeline on its own: both ranks, their blocks and stage times
        assert client.reports, "no pipeline report"
        last = client.reports[-1]
        assert [r.blocks for r in last.ranks] == [1, 1] and last.forwards > 0
        assert all(r.eager_forwards > 0 and r.graph_forwards == 0 for r in last.ranks)  # CPU: no CUDA graphs
        assert all(r.dit_ms is not None and r.other_ms is not None for r in last.ranks)
        client.close()
    finally:
        ours.send(encode(Shutdown()))
        process.join(60)
        if process.is_alive():
            process.kill()


class _BackgroundStream:
    """A session whose frames get finished between pushes (as a pipeline-parallel engine's do): written
    into its output ring by the engine, announced as (slot seq, pts)."""

    chunk_frames = 4
    stats: dict = {}
    dropped = 0

    def __init__(self, output_ring: str) -> None:
        self.ring = FrameRing.attach(output_ring)
        seq = self.ring.write(np.full((SIZE, SIZE, 3), 7, np.uint8), 1234)
        self.finished = [(seq, 1234)]

    def offer(self, frames: Any, pts: Any) -> list:
        return []

    def has_room(self) -> bool:
        return True

    def take_finished(self) -> list:
        out, self.finished = self.finished, []
        return out

    def close(self) -> None:
        self.ring.close()


class _BackgroundEngine:
    finishes_in_background = True

    def open_session(self, prompt: str, params: Any, output_ring: str) -> _BackgroundStream:
        return _BackgroundStream(output_ring)


def test_frames_finished_in_the_background_leave_without_a_push() -> None:
    """With an engine that finishes chunks on its own, the loop sends their frames as a partial reply
    at once, without waiting for the session's next push."""
    import threading

    ours, theirs = multiprocessing.Pipe()
    loop = worker.Worker(_BackgroundEngine(), theirs)
    thread = threading.Thread(target=loop.serve, daemon=True)
    thread.start()
    client = Client(ours, "B", "a quiet street")
    reply = _recv(ours, 10.0)
    assert isinstance(reply, FramesOut) and reply.partial and reply.pts == [1234]
    frame, pts = client.output.read(reply.first_seq)
    assert pts == 1234 and int(frame[0, 0, 0]) == 7
    assert not ours.poll(0.2)  # taken once, sent once
    client.close()
    ours.send(encode(Shutdown()))
    thread.join(10)
    assert not thread.is_alive()


class _AheadStream(_BackgroundStream):
    """The frame of its chunk is in the output ring before the session learns of it (as a ring's last rank
    writes frames before rank 0's event about them reaches the engine process): the push is answered
    first, the frame is finished at the next look."""

    def __init__(self, output_ring: str) -> None:
        self.ring = FrameRing.attach(output_ring)
        self.held: list = []
        self.looks = 0

    def offer(self, frames: Any, pts: Any) -> list:
        seq = self.ring.write(np.full((SIZE, SIZE, 3), 7, np.uint8), 1234)
        self.held.append((seq, 1234))
        self.looks = 0  # counted from the offer: the loop also looks while it waits for the push
        return []

    def take_finished(self) -> list:
        self.looks += 1
        if self.looks == 1:
            return []
        out, self.held = self.held, []
        return out


class _AheadEngine(_BackgroundEngine):
    def open_session(self, prompt: str, params: Any, output_ring: str) -> _BackgroundStream:
        return _AheadStream(output_ring)


def test_an_empty_reply_never_announces_slots_ahead_of_their_frames() -> None:
    """A reply with no frames must not move the server past frames the engine wrote but has not
    announced yet: the server releases the ring up to first_seq + count."""
    import threading

    ours, theirs = multiprocessing.Pipe()
    loop = worker.Worker(_AheadEngine(), theirs)
    thread = threading.Thread(target=loop.serve, daemon=True)
    thread.start()
    client = Client(ours, "A", "a quiet street")
    time.sleep(0.3)  # the loop looks for finished frames while it waits for the push, as it does in service
    client.chunk_frames = 1
    client.send_chunk(_inputs(0, 1))
    replies = [_recv(ours, 10.0), _recv(ours, 10.0)]  # the push's reply, and the frame's partial one
    reply = next(r for r in replies if not r.partial)
    assert reply.count == 0 and reply.first_seq == 0  # the ring's write_seq is 1 already
    later = next(r for r in replies if r.partial)
    assert (later.first_seq, later.count, later.pts) == (0, 1, [1234])
    frame, pts = client.output.read(0)
    assert pts == 1234 and int(frame[0, 0, 0]) == 7
    client.close()
    ours.send(encode(Shutdown()))
    thread.join(10)
    assert not thread.is_alive()


class _GatedStream:
    """A session whose engine has room for its next chunk only once its gate opens (its chunks still on
    the device until then). `push` is what a blocking push does meanwhile."""

    chunk_frames = 4
    stats: dict = {}
    dropped = 0

    def __init__(self, output_ring: str, gate: Any) -> None:
        self.ring = FrameRing.attach(output_ring)
        self.gate = gate

    def push(self, frames: Any, pts: Any, early: Any = None) -> list:
        self.gate.wait()
        return []

    def offer(self, frames: Any, pts: Any) -> list:
        return []

    def has_room(self) -> bool:
        return self.gate.is_set()

    def take_finished(self) -> list:
        return []

    def close(self) -> None:
        self.ring.close()


class _GatedEngine:
    finishes_in_background = True

    def __init__(self) -> None:
        import threading

        self.gates: dict[str, Any] = {p: threading.Event() for p in ("a", "b")}

    def open_session(self, prompt: str, params: Any, output_ring: str) -> _GatedStream:
        return _GatedStream(output_ring, self.gates[prompt])


def test_one_session_in_flight_never_holds_up_another_sessions_push() -> None:
    """The loop serves every session: while session A's chunk keeps the engine from taking A's next one,
    session B's push is taken and answered (a loop that waited inside A's push left B's chunk unread, so
    two sessions' chunks never met in one forward). A's reply follows once its engine has room."""
    import threading

    ours, theirs = multiprocessing.Pipe()
    engine = _GatedEngine()
    loop = worker.Worker(engine, theirs)
    thread = threading.Thread(target=loop.serve, daemon=True)
    thread.start()
    a, b = Client(ours, "A", "a"), Client(ours, "B", "b")
    engine.gates["b"].set()
    a.send_chunk(_inputs(0, 4))
    b.send_chunk(_inputs(1, 4))
    reply = _recv(ours, 10.0)
    assert isinstance(reply, FramesOut) and reply.session_id == "B" and not reply.partial
    assert not ours.poll(0.3)  # A's reply waits for room
    engine.gates["a"].set()
    reply = _recv(ours, 10.0)
    assert isinstance(reply, FramesOut) and reply.session_id == "A" and not reply.partial
    b.close()
    a.close()
    ours.send(encode(Shutdown()))
    thread.join(10)
    assert not thread.is_alive()


class _QueuingEngine:
    """A real engine that answers as a CUDA one does: a push returns once its chunk is queued and the
    frames follow (here: held until the test releases them)."""

    finishes_in_background = True

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_queued_chunks_leave_as_partial_replies_when_done(monkeypatch) -> None:
    """In-process sessions on CUDA: the push's reply waits for no frame; frame 0 leaves in a partial
    reply as soon as its own copy is done, ahead of frames 1-4, which leave in another as soon as theirs
    are, with no push."""
    import threading

    from engine.runtime import EngineOptions, StreamEngine
    from tests.streams import HeldCopies

    # two chunks in flight, as on CUDA
    engine = StreamEngine.create(EngineOptions(model="tiny", device="cpu", height=SIZE, width=SIZE,
                                               parallel=dict(inflight=2)))
    held = HeldCopies(engine.core.io)
    monkeypatch.setattr(engine.core.io, "to_uint8_later", held)
    ours, theirs = multiprocessing.Pipe()
    loop = worker.Worker(_QueuingEngine(engine), theirs)
    thread = threading.Thread(target=loop.serve, daemon=True)
    thread.start()
    client = Client(ours, "Q", "a harbour")
    client.exchange(_inputs(1, 1))
    replies, out = client.exchange(_inputs(2, 4))
    assert [(r.partial, r.count) for r in replies] == [(False, 0)]
    reports: list = []
    with pytest.raises(AssertionError, match="did not answer"):  # no frames while the copies are in flight
        _recv(ours, 0.3, reports)
    held.release(1)  # frame 0's copy, queued first and alone
    reply = _recv(ours, 10.0, reports)
    assert isinstance(reply, FramesOut) and reply.partial and reply.pts == [0]
    assert len(client.take(reply)) == 1
    with pytest.raises(AssertionError, match="did not answer"):
        _recv(ours, 0.3, reports)
    assert all(r.ranks[0].blocks == 2 for r in reports)  # the core's report, if one came: a ring of one
    held.released = True
    reply = _recv(ours, 10.0)
    assert isinstance(reply, FramesOut) and reply.partial and reply.pts == [3000, 6000, 9000, 12000]
    assert len(client.take(reply)) == 4
    client.close()
    ours.send(encode(Shutdown()))
    thread.join(10)
    assert not thread.is_alive()


def test_the_servers_slo_reaches_the_engines_batch_scheduler() -> None:
    """The engine batches sessions and bounds a forward's wait by the server's SLO (target fps, deadline,
    sessions at once), not by the engine's own defaults."""
    from server.config import parse_args, worker_options

    opts = worker.engine_options(worker_options(parse_args(["--target-fps", "30", "--max-sessions", "6"])))
    assert (opts.parallel.target_fps, opts.parallel.deadline_ms, opts.parallel.max_batch) == (30.0, 1000.0, 6)
