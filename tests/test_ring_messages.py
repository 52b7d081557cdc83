"""The typed ring messages (engine/ring_messages.py) through the wire: every kind comes out of
wire.encode/decode (the pickled header and the one packed payload a DistLink sends) equal to what went
in, tensors included, and a LoopbackLink hands the message itself to its rank."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np
import torch

from engine import ring_messages as M
from engine.parallel.stage import Group
from engine.parallel.wire import LoopbackLink, decode, encode


def _one_of_each() -> list[M.RingMessage]:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    group = Group(sid=3, rows=2, frames=1, positions=[4, 3], t=[700, 400], renoise=[(0, 400, (1, 5, 1))],
                  decode=[1234], seed=9, epoch=1, done=17, stats={"timestep": 700.0})
    frames = M.SessionFrames(3, [np.arange(12, dtype=np.uint8).reshape(2, 2, 3)], [1234], {"decode_ms": 1.5})
    return [
        M.OpenSession(3, 1, t(1, 8, 16)),
        M.Note(3, 2),
        M.ResetStream(3),
        M.SetPrompt(3, 4, t(1, 8, 16, dtype=torch.bfloat16)),
        M.CloseSession(3, 5),
        M.CloseSession(3),
        M.PrepareFirstChunk(3, 2, 6),
        M.Forward(7, [group], (1, 2, 2), [(0, 7, 1.25, 0.5, False)], t(2, 4, 32), t(2, 32), t(2, 6, 32),
                  t(2, 16, 1, 4, 4)),
        M.ReturnedRows(7, {3: t(1, 16, 1, 4, 4), 5: t(2, 16, 1, 4, 4)}),
        M.ForwardOutput(7, [frames], [(3, 17)], [(0, 7, 1.0, 2.0, True), (1, 7, 3.0, 0.0, True)]),
        M.EarlyFrames([frames]),
        M.Rebalance(0, -1, [2], [1, 3]),
        M.Blocks([2], {"w.2.weight": t(4, 4), "s3.c.2.k": t(1, 2, 3, dtype=torch.float16),
                       "empty": torch.empty(0)}),
        M.Ping(1, torch.zeros(100, dtype=torch.uint8)),
        M.Profile("/tmp/prof", 12, 3),
        M.Stop(),
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return a == b


def test_every_ring_message_kind_is_exercised() -> None:
    assert {type(m) for m in _one_of_each()} == set(M.ALL)


def test_every_message_round_trips_through_the_wire_with_its_tensors() -> None:
    for msg in _one_of_each():
        raw, entries, buf = encode(msg, torch.device("cpu"))
        header, sent_entries = pickle.loads(raw)
        # the header carries no tensor: they all ride in the one payload
        assert not any(isinstance(getattr(header, f), torch.Tensor) for f in type(msg).TENSORS), msg
        tensors = sum(1 if isinstance(getattr(msg, f), torch.Tensor) else len(getattr(msg, f) or {})
                      for f in type(msg).TENSORS)
        assert len(sent_entries) == len(entries) == tensors
        assert (buf is None) == (tensors == 0)
        received = None if buf is None else buf.clone()  # what the receiving rank's buffer holds
        got = decode(header, sent_entries, received)
        assert _same(msg, got), (msg, got)


def test_the_loopback_link_hands_over_the_message_itself() -> None:
    link = LoopbackLink()
    msgs = _one_of_each()
    for msg in msgs:
        link.send(msg)
    assert all(link.recv() is msg for msg in msgs)
    assert not link.ready()
