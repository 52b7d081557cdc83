"""One message per hop, and the links of the ring.

A message is one of the typed messages of `engine.ring_messages`. On the wire it is a small
pickled header (the message without its tensors: session/chunk ids, row positions, timesteps, ... and
host data such as decoded frames) plus at most one packed payload: every device tensor of the message
(the fields its class names in `TENSORS`) laid out in one byte buffer, so a hop is one transfer whatever the tensors (tokens, time embeddings, the
noisy latents; or a block's weights and KV caches). The header travels on a gloo group over TCP; the
payload on the data group (NCCL on GPUs, gloo on CPUs). Why the split: the receiver must know the
header on the host (positions drive the KV cache's host-side plan) and the payload's size before it
can post the receive; reading a header that came over NCCL would cost a host synchronisation per hop,
while a gloo header arrives straight into host memory. The NCCL payload runs on PyTorch's own NCCL
stream, which overlaps compute; `Work.wait()` only makes the compute stream wait for it (no host sync).

Per directed pair of ranks, messages are received in the order they were sent (headers and payloads
each match in order), so each rank's processing order is the ring's order.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import queue
import struct
import threading
from dataclasses import dataclass
from typing import Any, Hashable, Optional

import torch
import torch.distributed as dist

from engine.ring_messages import RingMessage, Stop

HEADER_BYTES = 4096  # fixed first transfer; larger headers send the rest in a second one
_ALIGN = 64  # payload offsets: any dtype can be viewed at any entry


# A payload entry's name: (the message's field, None) for a tensor field, (field, key) for a dict's value
TensorName = tuple[str, Optional[Hashable]]


@dataclass
class Entry:
    name: TensorName
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def split_tensors(msg: RingMessage) -> tuple[RingMessage, dict[TensorName, torch.Tensor]]:
    """The message without its tensors (the header to pickle), and its tensors by payload name."""
    tensors: dict[TensorName, torch.Tensor] = {}
    emptied: dict[str, Any] = {}
    for name in type(msg).TENSORS:
        value = getattr(msg, name)
        if isinstance(value, torch.Tensor):
            tensors[(name, None)] = value
            emptied[name] = None
        elif value:  # a dict of tensors
            for key, t in value.items():
                tensors[(name, key)] = t
            emptied[name] = {}
    if not tensors:
        return msg, tensors
    return dataclasses.replace(msg, **emptied), tensors


def join_tensors(header: RingMessage, tensors: dict[TensorName, torch.Tensor]) -> RingMessage:
    """split_tensors undone: the header with the received tensors put back in their fields."""
    if not tensors:
        return header
    fields: dict[str, Any] = {}
    for (name, key), t in tensors.items():
        if key is None:
            fields[name] = t
        else:
            fields.setdefault(name, {})[key] = t
    return dataclasses.replace(header, **fields)


def encode(msg: RingMessage, device: torch.device) -> tuple[bytes, list[Entry], Optional[torch.Tensor]]:
    """A message as it travels: the pickled header (with the payload's layout) and the packed payload."""
    header, tensors = split_tensors(msg)
    entries, buf = pack(tensors, device)
    return pickle.dumps((header, entries), protocol=pickle.HIGHEST_PROTOCOL), entries, buf


def decode(header: RingMessage, entries: list[Entry], buf: Optional[torch.Tensor]) -> RingMessage:
    """encode undone, once the pickled header is read and the payload received."""
    return join_tensors(header, unpack(entries, buf))


def pack(tensors: dict[TensorName, torch.Tensor], device: torch.device) -> tuple[list[Entry], Optional[torch.Tensor]]:
    """All tensors in one uint8 buffer on `device` (one copy kernel each, no host round trip)."""
    entries, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        entries.append(Entry(name, str(t.dtype).replace("torch.", ""), tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    if not entries:
        return [], None
    buf = torch.empty(max(offset, 1), dtype=torch.uint8, device=device)
    for e, t in zip(entries, tensors.values()):
        if e.nbytes:
            buf[e.offset : e.offset + e.nbytes].view(t.dtype).view(t.shape).copy_(t)
    return entries, buf


def unpack(entries: list[Entry], buf: Optional[torch.Tensor]) -> dict[TensorName, torch.Tensor]:
    """Views into the received buffer (no copies)."""
    out: dict[TensorName, torch.Tensor] = {}
    for e in entries:
        dtype = getattr(torch, e.dtype)
        if e.nbytes == 0:
            out[e.name] = torch.empty(e.shape, dtype=dtype, device=buf.device if buf is not None else "cpu")
        else:
            assert buf is not None
            out[e.name] = buf[e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
    return out


class Link:
    """A directed channel between two ranks (or a rank and itself)."""

    def send(self, msg: RingMessage) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """True when recv() would not wait for the next header."""
        raise NotImplementedError

    def recv(self) -> RingMessage:
        raise NotImplementedError


class LoopbackLink(Link):
    """A rank sending to itself (a ring of one): no copies, no torch.distributed."""

    def __init__(self) -> None:
        self._q: collections.deque[RingMessage] = collections.deque()

    def send(self, msg: RingMessage) -> None:
        self._q.append(msg)

    def ready(self) -> bool:
        return bool(self._q)

    def recv(self) -> RingMessage:
        if not self._q:
            raise RuntimeError("loopback link is empty: a rank of one waited for itself")
        return self._q.popleft()


class DistLink(Link):
    """src -> dst over torch.distributed, with its own two process groups: headers on `ctrl` (gloo),
    payloads on `data` (NCCL on GPUs, gloo on CPUs).

    Own groups per directed link, because NCCL runs the point-to-point operations of one communicator
    in issue order on one stream: with a ring of two (0 -> 1 and 1 -> 0 between the same ranks), or one
    communicator for every peer, a rank's send of forward k+1 queued before its receive of forward k's
    result waits for a peer that waits for that receive. One communicator per direction only ever
    carries sends one way, matched in order.

    The receiving side reads headers in a thread (a gloo receive cannot be polled: its Work completes
    only inside wait()), so rank 0 can poll `ready()` between other work; payloads are received by
    the caller's thread, in the same order.
    """

    def __init__(self, me: int, src: int, dst: int, ctrl: Any, data: Any, device: torch.device) -> None:
        self.me, self.src, self.dst = me, src, dst
        self.ctrl, self.data, self.device = ctrl, data, device
        self._pending: list[tuple[Any, tuple]] = []  # sends in flight, with what they must keep alive
        self._q: "queue.Queue[Any]" = queue.Queue()
        if me == dst:
            threading.Thread(target=self._read_headers, name=f"link{src}->{dst}", daemon=True).start()

    # -- sending -------------------------------------------------------------------------------------
    def send(self, msg: RingMessage) -> None:
        assert self.me == self.src
        raw, _, buf = encode(msg, self.device)
        head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        first = raw[: HEADER_BYTES - 8]
        head[:8] = torch.frombuffer(bytearray(struct.pack("<q", len(raw))), dtype=torch.uint8)
        head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        self._isend(head, self.ctrl)
        if len(raw) > len(first):
            self._isend(torch.frombuffer(bytearray(raw[len(first) :]), dtype=torch.uint8), self.ctrl)
        if buf is not None:
            self._isend(buf, self.data)
        self._prune()

    def _isend(self, t: torch.Tensor, group: Any) -> None:
        work = dist.isend(t, self.dst, group=group)
        self._pending.append((work, (t,)))

    def _prune(self) -> None:
        # Gloo sends only report completion through wait(); keep the last few alive and wait for the
        # old ones (long done by then) so that memory held by finished sends is released.
        while len(self._pending) > 64:
            work, _ = self._pending.pop(0)
            work.wait()
        keep = []
        for work, held in self._pending:
            if self.device.type == "cuda" and work.is_completed():
                work.wait()
            else:
                keep.append((work, held))
        self._pending = keep

    def flush(self) -> None:
        """Wait until every send has left (before shutting down)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    # -- receiving -----------------------------------------------------------------------------------
    def _read_headers(self) -> None:
        hdr = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        while True:
            try:
                dist.irecv(hdr, self.src, group=self.ctrl).wait()
                (n,) = struct.unpack("<q", hdr[:8].numpy().tobytes())
                raw = hdr[8 : 8 + min(n, HEADER_BYTES - 8)].numpy().tobytes()
                if n > HEADER_BYTES - 8:
                    rest = torch.empty(n - (HEADER_BYTES - 8), dtype=torch.uint8)
                    dist.irecv(rest, self.src, group=self.ctrl).wait()
                    raw += rest.numpy().tobytes()
                item = pickle.loads(raw)
            except Exception as exc:  # the peer died or the group was torn down: the reader fails
                self._q.put(exc)
                return
            self._q.put(item)
            if isinstance(item[0], Stop):
                return

    def ready(self) -> bool:
        return not self._q.empty()

    def recv(self) -> RingMessage:
        assert self.me == self.dst
        item = self._q.get()
        if isinstance(item, Exception):
            self._q.put(item)  # every later recv fails the same way
            raise ConnectionError(f"link {self.src}->{self.dst}: {item}") from item
        header, entries = item
        buf = None
        if entries:
            size = max(e.offset + -(-e.nbytes // _ALIGN) * _ALIGN for e in entries)
            buf = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            dist.irecv(buf, self.src, group=self.data).wait()  # NCCL: the compute stream waits, not the host
        return decode(header, entries, buf)
