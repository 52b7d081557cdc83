"""The server <-> engine boundary: shared-memory frame rings and pipe messages."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from interface.controls import StreamUpdate
from interface.frame_ring import FrameRing, RingFull, StaleSlot
from interface.messages import (
    FramesOut,
    PushFrames,
    UpdateSession,
    decode_from_engine,
    decode_to_engine,
    encode,
)


def _frame(value: int, h: int = 16, w: int = 24) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_ring_round_trip_capacity_and_release() -> None:
    with FrameRing.create(slots=3, height=16, width=24) as ring:
        seqs = [ring.write(_frame(i), pts=1000 + i) for i in range(3)]
        assert seqs == [0, 1, 2] and ring.free_slots() == 0
        with pytest.raises(RingFull):
            ring.write(_frame(9), pts=9)
        frames, pts = ring.read_many(0, 3)
        assert pts == [1000, 1001, 1002] and [int(f[0, 0, 0]) for f in frames] == [0, 1, 2]
        ring.release(2)
        assert ring.free_slots() == 2
        with pytest.raises(StaleSlot):
            ring.read(0)  # released: the slot may be reused
        assert ring.write(_frame(7), pts=7) == 3
        frame, p = ring.read(3)
        assert p == 7 and int(frame.mean()) == 7
        with pytest.raises(ValueError):
            ring.write(np.zeros((16, 24, 3), np.float32), pts=0)  # uint8 only


def _child_reads(name: str, queue: multiprocessing.Queue) -> None:
    ring = FrameRing.attach(name)
    frames, pts = ring.read_many(0, 2)
    ring.release(2)
    ring.write(frames[1][::-1].copy(), pts[1] + 1)  # answers through the same memory
    queue.put((pts, int(frames[0].sum()), int(frames[1].sum())))
    ring.close()


def test_ring_crosses_a_spawned_process() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with FrameRing.create(slots=4, height=16, width=24) as ring:
        a, b = _frame(3), np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3)
        ring.write(a, 10)
        ring.write(b, 20)
        child = ctx.Process(target=_child_reads, args=(ring.name, queue))
        child.start()
        pts, sum_a, sum_b = queue.get(timeout=60)
        child.join(30)
        assert pts == [10, 20] and sum_a == int(a.sum()) and sum_b == int(b.sum())
        assert ring.read_seq == 2
        frame, p = ring.read(2)
        assert p == 21 and np.array_equal(frame, b[::-1])


def test_messages_round_trip_and_reject_bad_input() -> None:
    push = PushFrames(session_id="abc", first_seq=4, count=4)
    assert decode_to_engine(encode(push)) == push
    update = UpdateSession(session_id="abc", update=StreamUpdate(prompt="x", steps=3))
    assert decode_to_engine(encode(update)) == update
    out = FramesOut(session_id="abc", first_seq=0, count=1, pts=[5], chunk_frames=4, engine_ms=1.0)
    assert decode_from_engine(encode(out)) == out
    for bad in (
        {"kind": "push", "session_id": "abc", "first_seq": -1, "count": 4},
        {"kind": "push", "session_id": "../etc", "first_seq": 0, "count": 4},
        {"kind": "update", "session_id": "abc", "update": {"steps": 9}},
        {"kind": "nope"},
        [1, 2],
    ):
        with pytest.raises(ValidationError):
            decode_to_engine(bad)


_SERVER_WITHOUT_ENGINE = """
import asyncio, sys
from pathlib import Path
import server, server.__main__, server.cli
from server.app import create_app
from server.config import parse_args, worker_options
from server.media.engine_client import EngineClient

config = parse_args(["--model", "tiny", "--devices", "cpu", "--port", "0", "--weights", sys.argv[1]])
create_app(config)
options = worker_options(config).model_copy(update={"height": 32, "width": 32, "warmup": False})

async def start_and_stop():
    client = EngineClient(options, start_timeout_s=300)
    info = await client.start()  # the engine process imports the engine, by module path
    await client.stop()
    return info

info = asyncio.run(start_and_stop())
assert (info.width, info.max_chunk_frames, info.chunk_frames) == (32, 5, 4), info
assert "dit_ms" in info.stage_stats, info
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "engine")))
"""


def test_the_server_meets_the_engine_only_at_interface(tmp_path) -> None:
    """The server process parses its arguments, builds its app and runs an engine process without
    importing torch or any engine module: they meet only at interface/ (docs/ARCHITECTURE.md §1)."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _SERVER_WITHOUT_ENGINE, str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
