"""A ring of fixed-size uint8 frame slots in shared memory, one producer and one consumer.

One ring per direction per session: the server writes camera frames into an input ring and the
engine reads them; the engine writes generated frames into an output ring and the server reads
them. Sequence numbers grow forever; slot = seq % slots. The producer owns `write_seq`, the
consumer owns `read_seq`, so neither needs a lock. The "frames are ready" notice itself travels
as a message over the control pipe, which also orders the memory writes before the reads.

Layout: a 64-byte header of int64 [magic, slots, height, width, write_seq, read_seq, 0, 0], then
`slots` slots, each [seq: int64, pts: int64, H*W*3 bytes] padded to 64 bytes.

Segment names record the creating process (interface/shm_owner.py), so the rings of a server
killed with its engine can be removed by the next one.
"""

from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np

from interface.shm_owner import owned_name

_MAGIC = 0x53474652_494E4731  # "SGFRING1"
_HEADER = 64
_SLOT_META = 16
_ALIGN = 64
_WRITE, _READ = 4, 5


class RingFull(RuntimeError):
    """Every slot holds a frame the consumer has not released yet."""


class StaleSlot(RuntimeError):
    """The slot no longer (or not yet) holds the requested sequence number."""


def _slot_stride(height: int, width: int) -> int:
    raw = _SLOT_META + height * width * 3
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


def ring_bytes(slots: int, height: int, width: int) -> int:
    """Shared memory one ring takes (useful to size /dev/shm)."""
    return _HEADER + slots * _slot_stride(height, width)


def _create_segment(size: int) -> shared_memory.SharedMemory:
    """A new segment whose name says its owner, so a starting server can remove it once that died."""
    while True:
        try:
            return shared_memory.SharedMemory(owned_name(), create=True, size=size)
        except FileExistsError:  # 32 random bits collided: draw again
            continue


class FrameRing:
    """Use `FrameRing.create` (owner, unlinks) or `FrameRing.attach` (by name)."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self._owner = owner
        self._header = np.ndarray((8,), dtype=np.int64, buffer=shm.buf, offset=0)
        if int(self._header[0]) != _MAGIC:
            raise ValueError(f"shared memory {shm.name!r} is not a frame ring")
        self.slots = int(self._header[1])
        self.height = int(self._header[2])
        self.width = int(self._header[3])
        stride = _slot_stride(self.height, self.width)
        frame_bytes = self.height * self.width * 3
        # Views over each slot, built once; frames are copied in and out of them.
        self._meta = [
            np.ndarray((2,), dtype=np.int64, buffer=shm.buf, offset=_HEADER + i * stride)
            for i in range(self.slots)
        ]
        self._data = [
            np.ndarray(
                (self.height, self.width, 3),
                dtype=np.uint8,
                buffer=shm.buf,
                offset=_HEADER + i * stride + _SLOT_META,
            )
            for i in range(self.slots)
        ]
        assert frame_bytes == self._data[0].nbytes

    @classmethod
    def create(cls, slots: int, height: int, width: int) -> "FrameRing":
        if slots < 1 or height < 1 or width < 1:
            raise ValueError(f"bad ring geometry: {slots} slots of {height}x{width}")
        shm = _create_segment(ring_bytes(slots, height, width))
        header = np.ndarray((8,), dtype=np.int64, buffer=shm.buf, offset=0)
        header[:] = [_MAGIC, slots, height, width, 0, 0, 0, 0]
        del header
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "FrameRing":
        try:  # Python >= 3.13: the creator alone tracks (and unlinks) the segment
            shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        except TypeError:
            shm = shared_memory.SharedMemory(name=name)
        return cls(shm, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def write_seq(self) -> int:
        return int(self._header[_WRITE])

    @property
    def read_seq(self) -> int:
        return int(self._header[_READ])

    def free_slots(self) -> int:
        return self.slots - (self.write_seq - self.read_seq)

    def write(self, frame: np.ndarray, pts: int) -> int:
        """Copy one frame in; returns its sequence number. Producer side."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame must be uint8 [{self.height}, {self.width}, 3], got {frame.dtype} {list(frame.shape)}"
            )
        if self.free_slots() <= 0:
            raise RingFull(f"ring {self.name} is full ({self.slots} slots)")
        seq = self.write_seq
        slot = seq % self.slots
        self._data[slot][...] = frame
        self._meta[slot][:] = (seq, int(pts))
        self._header[_WRITE] = seq + 1
        return seq

    def read(self, seq: int) -> tuple[np.ndarray, int]:
        """A copy of frame `seq` and its pts. Consumer side; call `release` when done."""
        if not self.read_seq <= seq < self.write_seq:
            raise StaleSlot(f"seq {seq} is outside the readable range [{self.read_seq}, {self.write_seq})")
        slot = seq % self.slots
        stored_seq, pts = (int(v) for v in self._meta[slot])
        if stored_seq != seq:
            raise StaleSlot(f"slot {slot} holds seq {stored_seq}, not {seq}")
        return self._data[slot].copy(), pts

    def read_many(self, first_seq: int, count: int) -> tuple[np.ndarray, list[int]]:
        frames = np.empty((count, self.height, self.width, 3), dtype=np.uint8)
        pts: list[int] = []
        for i in range(count):
            frames[i], p = self.read(first_seq + i)
            pts.append(p)
        return frames, pts

    def release(self, upto_seq: int) -> None:
        """Give back every slot below `upto_seq`. Consumer side."""
        if upto_seq > self.write_seq:
            raise StaleSlot(f"cannot release up to {upto_seq}: only {self.write_seq} written")
        if upto_seq > self.read_seq:
            self._header[_READ] = upto_seq

    def close(self) -> None:
        # numpy views pin the buffer; drop them before unmapping.
        self._meta = []
        self._data = []
        self._header = np.zeros(8, dtype=np.int64)
        self._shm.close()

    def unlink(self) -> None:
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "FrameRing":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.unlink()

