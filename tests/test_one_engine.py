"""One engine (docs/ARCHITECTURE.md §5, §6): one schedule run by two executors, in process and on a ring
of ranks, gives the same frames; a session batched with another gives the frames it gives alone; and the
house has no import circle and no second copy of the streaming algorithm.

Float32 on CPU throughout: equality is exact (np.array_equal on the uint8 frames)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from engine import protocol as P
from engine.errors import EngineFailure
from engine.runtime import EngineOptions, StreamEngine
from interface.frame_ring import FrameRing
from interface.controls import StreamParams
from tests.streams import HeldCopies, push_interleaved
from tests.test_parallel import SIZE, assert_same, drive, tiny4, video  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def in_process(tiny4):
    return StreamEngine.create(EngineOptions(model=tiny4, device="cpu", **SIZE))


@pytest.fixture(scope="module")
def alone(in_process):
    """Each test stream alone on the in-process engine, at 1 and 3 steps."""
    frames = {1: video(29, seed=1), 2: video(29, seed=2)}
    return frames, {(k, steps): drive(in_process, frames[k], f"prompt {k}", seed=k, steps=steps)
                    for k in (1, 2) for steps in (1, 3)}


@pytest.mark.parametrize("devices", ["cpu:1", "cpu:2", "cpu:3"])
def test_in_process_and_rings_of_1_2_3_ranks_give_identical_frames(tiny4, alone, devices):
    """For 1 and 3 steps alone, and for two sessions batched into one forward (a ring that holds one
    forward at a time: while one session's forward runs, the other's waits and they meet in the queue)."""
    frames, want = alone
    opts = dict(ring_capacity=1, inflight=2, max_batch=2, rebalance=False, deadline_ms=60_000.0)
    with StreamEngine.create(EngineOptions(model=tiny4, device=devices, **SIZE, parallel=opts)) as e:
        for steps in (1, 3):
            assert_same(drive(e, frames[1], "prompt 1", seed=1, steps=steps), want[(1, steps)])
            a = e.open_session("prompt 1", StreamParams(seed=1, steps=steps))
            b = e.open_session("prompt 2", StreamParams(seed=2, steps=steps))
            a_out, b_out = push_interleaved([a, b], [frames[1], frames[2]])
            assert_same(a_out, want[(1, steps)])
            assert_same(b_out, want[(2, steps)])
            a.close()
            b.close()
        st = e.stats()
    assert st["batched_forwards"] > 0 and max(int(k) for k in st["batch"]["forwards"]) == 2


def test_frames_pushed_one_at_a_time_give_the_same_frames_on_a_ring(tiny4, in_process):
    """Frames pushed as a camera brings them go to the core ahead of their chunk (engine.protocol.AheadCmd,
    over a pipe to a ring's rank 0): a ring of 2 ranks gives the in-process engine's frames, alone and
    with two sessions interleaved frame by frame (batched where their chunks meet)."""
    frames = {1: video(17, seed=1), 2: video(17, seed=2)}

    def run(e) -> list:
        s = e.open_session("prompt 1", StreamParams(seed=1, steps=1))
        s.push(frames[1][:3], [0, 1, 2])
        assert s.chunk_frames == 2  # frames 1 and 2 went ahead of their chunk
        s.close()
        outs = [drive(e, frames[1], "prompt 1", seed=1, steps=1, step=1)]
        a = e.open_session("prompt 1", StreamParams(seed=1, steps=3))
        b = e.open_session("prompt 2", StreamParams(seed=2, steps=3))
        outs += push_interleaved([a, b], [frames[1], frames[2]], chunk=1)
        a.close()
        b.close()
        return outs

    want = run(in_process)
    assert [p for _, p in want[0]] == list(range(17))
    opts = dict(ring_capacity=1, inflight=2, max_batch=2, rebalance=False, deadline_ms=60_000.0)
    with StreamEngine.create(EngineOptions(model=tiny4, device="cpu:2", **SIZE, parallel=opts)) as e:
        got = run(e)
    for g, w in zip(got, want):
        assert_same(g, w)


@pytest.mark.parametrize("steps", [1, 3])
def test_sessions_batched_in_process_equal_each_alone(tiny4, alone, monkeypatch, steps):
    """One device batches sessions as a ring does. Frames whose copy to the host is slow (held here, as
    a busy GPU holds them) keep a forward in flight, so the next sessions' chunks wait and go through the
    DiT together."""
    frames, want = alone
    opts = dict(ring_capacity=1, inflight=2, max_batch=2, deadline_ms=60_000.0)
    e = StreamEngine.create(EngineOptions(model=tiny4, device="cpu", **SIZE, parallel=opts))
    monkeypatch.setattr(e.core.io, "to_uint8_later", HeldCopies(e.core.io))  # never released: waited for
    a = e.open_session("prompt 1", StreamParams(seed=1, steps=steps))
    b = e.open_session("prompt 2", StreamParams(seed=2, steps=steps))
    a_out, b_out = push_interleaved([a, b], [frames[1], frames[2]])
    st = e.stats()
    assert st["batched_forwards"] > 0 and max(int(k) for k in st["batch"]["forwards"]) == 2
    assert_same(a_out, want[(1, steps)])
    assert_same(b_out, want[(2, steps)])


def test_a_batched_forward_charges_each_session_its_own_decode(tiny4, monkeypatch):
    """Admission control adds up the sessions' stage times, so in a forward of two sessions each is charged
    its own decode (they run one after another), not the pair's. Each decode is made to take 50 ms."""
    frames = {k: video(21, seed=k) for k in (1, 2)}
    opts = dict(ring_capacity=1, inflight=2, max_batch=2, deadline_ms=60_000.0)
    e = StreamEngine.create(EngineOptions(model=tiny4, device="cpu", **SIZE, parallel=opts))
    monkeypatch.setattr(e.core.io, "to_uint8_later", HeldCopies(e.core.io))
    decode = e.core.decoder.stream_decode_parts

    def slow_decode(z, state):
        time.sleep(0.05)
        yield from decode(z, state)

    monkeypatch.setattr(e.core.decoder, "stream_decode_parts", slow_decode)
    charged: list[tuple[int, float]] = []  # (sessions in the forward, a session's decode ms)
    send_outputs, session_frames = e.core.send_outputs, e.core.session_frames
    batch = [0]

    def send(out):
        batch[0] = len(out.groups)
        send_outputs(out)

    def frames_of(sid, got, stats):
        if P.DECODE_MS in stats:  # not a fresh stream's frame 0, sent ahead
            charged.append((batch[0], stats[P.DECODE_MS]))
        return session_frames(sid, got, stats)

    monkeypatch.setattr(e.core, "send_outputs", send)
    monkeypatch.setattr(e.core, "session_frames", frames_of)
    a = e.open_session("prompt 1", StreamParams(seed=1, steps=1))
    b = e.open_session("prompt 2", StreamParams(seed=2, steps=1))
    push_interleaved([a, b], [frames[1], frames[2]])
    paired = [ms for n, ms in charged if n == 2]
    assert len(paired) >= 4
    assert all(45.0 <= ms < 80.0 for ms in paired), paired


def test_a_batched_forward_decodes_every_sessions_first_frame_first(tiny4, alone, monkeypatch):
    """In a forward of two sessions the decode parts are queued a session's in turn: both chunks' frame 0
    before either chunk's frames 1-3, so the second session's frame 0 does not wait for the first
    session's whole decode. The frames are those of each session alone."""
    frames, want = alone
    opts = dict(ring_capacity=1, inflight=2, max_batch=2, deadline_ms=60_000.0)
    e = StreamEngine.create(EngineOptions(model=tiny4, device="cpu", **SIZE, parallel=opts))
    order: list[tuple[int, int]] = []  # (the decode state's id, frames in the part), as the parts are made
    parts = e.core.decoder.stream_decode_parts

    def spy(z, state):
        for y in parts(z, state):
            order.append((id(state), y.shape[2]))
            yield y

    monkeypatch.setattr(e.core.decoder, "stream_decode_parts", spy)
    forwards: list[tuple[int, list]] = []
    finish = e.core.finish_forward

    def finish_spy(fwd, *args):
        order.clear()
        finish(fwd, *args)
        forwards.append((len(fwd.groups), list(order)))

    monkeypatch.setattr(e.core, "finish_forward", finish_spy)
    a = e.open_session("prompt 1", StreamParams(seed=1, steps=1))
    b = e.open_session("prompt 2", StreamParams(seed=2, steps=1))
    a_out, b_out = push_interleaved([a, b], [frames[1], frames[2]])
    assert_same(a_out, want[(1, 1)])
    assert_same(b_out, want[(2, 1)])
    steady = [o for n, o in forwards if n == 2 and len(o) == 4]  # two sessions' steady chunks, 2 parts each
    assert steady
    for o in steady:
        assert [n for _, n in o] == [1, 1, 3, 3] and o[0][0] != o[1][0] and (o[0][0], o[1][0]) == (o[2][0], o[3][0])


@pytest.mark.parametrize("wait_ms", [None, 0.0])
def test_a_forward_waits_for_a_session_due_soon_while_the_device_is_busy(tiny4, alone, monkeypatch, wait_ms):
    """Room for many forwards in flight (nothing makes chunks queue), yet sessions share forwards: while the
    device is busy a chunk waits, within the SLO's bound, for the other session whose chunk is due. With
    `batch_wait_ms=0` it never waits and every forward carries one session. Frames as each alone."""
    frames, want = alone
    opts = dict(ring_capacity=8, inflight=2, max_batch=2, deadline_ms=60_000.0, batch_wait_ms=wait_ms)
    e = StreamEngine.create(EngineOptions(model=tiny4, device="cpu", **SIZE, parallel=opts))
    monkeypatch.setattr(e.core.io, "to_uint8_later", HeldCopies(e.core.io))  # the device stays busy
    a = e.open_session("prompt 1", StreamParams(seed=1, steps=1))
    b = e.open_session("prompt 2", StreamParams(seed=2, steps=1))
    a_out, b_out = push_interleaved([a, b], [frames[1], frames[2]])
    batch = e.stats()["batch"]
    if wait_ms is None:
        assert e.stats()["batched_forwards"] >= 3 and batch["waits"] >= 3 and batch["joined"] >= 3
    else:
        assert e.stats()["batched_forwards"] == 0 and batch["waits"] == 0
    assert_same(a_out, want[(1, 1)])
    assert_same(b_out, want[(2, 1)])


def test_the_wait_for_other_sessions_is_bounded_by_the_slo():
    """The bound is what the deadline leaves after the chunk fill, the lag and the bigger batch's predicted
    latency (checked against the arithmetic); a session overdue by half its interval is not waited for."""
    from engine.parallel.rank0 import _Arrivals
    from engine.parallel.slo import BatchScheduler

    s = BatchScheduler(max_batch=3, target_fps=16.0, deadline_ms=400.0)
    assert s.wait_bound_ms(1, 0) == 0.0  # nothing measured: never waits
    s.observe(1, 40.0)
    s.observe(2, 60.0)
    assert s.wait_bound_ms(1, 0) == pytest.approx(400.0 - 250.0 - 60.0)
    assert s.wait_bound_ms(2, 0) == pytest.approx(400.0 - 250.0 - 80.0)  # L(3) on the line through 40, 60
    assert s.wait_bound_ms(2, 1) == 0.0  # one more chunk of lag: nothing left
    assert s.wait_bound_ms(3, 0) == 0.0  # the largest batch waits for no one
    a = _Arrivals(10.0)
    assert a.next_due(10.0) is None  # one chunk: no interval yet
    a.add(10.1)
    assert a.next_due(10.15) == pytest.approx(10.2)
    assert a.next_due(10.24) == pytest.approx(10.2)  # a little late: still waited for
    assert a.next_due(10.26) is None  # overdue by more than half an interval: paused


@pytest.mark.parametrize("devices", ["cpu", "cpu:2"])
def test_frames_go_straight_into_the_session_output_ring(tiny4, alone, devices):
    """Given the session's shared-memory output ring, the last stage writes the frames there and only
    their slots and pts travel back (in process, and from the last rank's process on a ring)."""
    frames, want = alone
    ring = FrameRing.create(64, SIZE["height"], SIZE["width"])
    try:
        with StreamEngine.create(EngineOptions(model=tiny4, device=devices, **SIZE,
                                               parallel=dict(rebalance=False))) as e:
            events = []
            on_event = e._on_event
            record = lambda ev: (events.append(ev), on_event(ev))  # noqa: E731
            if devices == "cpu":
                e.core.events.send = record  # the core in this thread hands its events over by a call
            else:
                e._on_event = record  # type: ignore[method-assign]  # the reader thread's
            s = e.open_session("prompt 1", StreamParams(seed=1, steps=1), output_ring=ring.name)
            out = []
            for i in range(0, len(frames[1]), 4):
                out += s.push(frames[1][i : i + 4], list(range(i, min(i + 4, len(frames[1])))))
            out += s.flush()
            s.close()
        outputs = [ev for ev in events if isinstance(ev, P.Output)]
        assert outputs and all(ev.frames == [] and ev.first_seq is not None for ev in outputs)
        assert [seq for seq, _ in out] == list(range(len(out)))  # slots in order, every frame once
        got = [ring.read(seq) for seq, _ in out]
        assert [p for _, p in got] == [p for _, p in out]
        assert_same([(f, p) for f, p in got], want[(1, 1)])
    finally:
        ring.close()
        ring.unlink()


def test_an_error_inside_the_core_fails_the_in_process_engine(tiny4, monkeypatch):
    """The core's state is shared by every session, so an exception in a forward fails the whole engine
    (as a rank failing fails a ring): every call then says so, none hangs."""
    e = StreamEngine.create(EngineOptions(model=tiny4, device="cpu", **SIZE))
    clip = video(9, seed=3)
    a, b = e.open_session("prompt 1"), e.open_session("prompt 2")
    a.push(clip[:5], list(range(5)))

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(e.core.stage, "run", broken)
    with pytest.raises(EngineFailure, match="a kernel failed"):
        a.push(clip[5:9], list(range(5, 9)))
    with pytest.raises(EngineFailure, match="a kernel failed"):
        b.push(clip[:5], list(range(5)))
    with pytest.raises(EngineFailure):
        e.open_session("prompt 3")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (a lazy import counts)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_no_import_circle_in_the_house():
    modules = {}
    for pkg in ("engine", "server", "interface", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ is not an edge to everything under it
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_streaming_algorithm_lives_in_one_module():
    """The schedule's decisions (noise keys, row positions, RoPE wrap, timesteps) are made in
    engine/schedule.py only; no executor computes them again."""
    marks = ("KeyedNoise.STREAM", "KeyedNoise.PRIME", "rope_reset_frames", "stream_timesteps(", "prime_timesteps(")
    found = {}
    for path in (ROOT / "engine").rglob("*.py"):
        text = path.read_text()
        for mark in marks:
            if mark in text:
                found.setdefault(mark, set()).add(path.relative_to(ROOT).as_posix())
    for mark in marks:
        users = found.get(mark, set()) - {"engine/schedule.py", "engine/kv_policy.py", "engine/config.py",
                                           "engine/build.py", "engine/noise.py"}
        assert not users, f"{mark} is used outside the schedule: {sorted(users)}"
