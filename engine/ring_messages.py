"""The messages ranks send each other around the ring (docs/ARCHITECTURE.md §2, docs/PARALLEL.md "The ring").

One class per kind of message. Plain frozen dataclasses with slots rather than pydantic models: a
forward crosses every hop of the ring many times a second on the GPU path, and validating its header
(groups, positions, timesteps, timings) on each hop would cost host time the GPU waits for; the values
are made by rank 0's own code, not read from outside, so the types are checked statically instead.

Device tensors are fields too, named in each class's `TENSORS`: `engine.parallel.wire` takes them out
of the message and sends them all in the hop's one packed payload (the header, pickled without them,
goes on gloo), then puts views of the received buffer back in. A field in `TENSORS` holds a tensor
(or None), or a dict of tensors (each value one entry of the payload).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch


# (rank, forward id, dit ms, other ms, graphed): a rank's stage times of one forward
StageRecord = tuple[int, int, float, float, bool]


@dataclass
class Group:
    """One session's rows in a forward: everything but the tensors (those ride in the payload)."""

    sid: int
    rows: int
    frames: int
    positions: list[int]
    t: list[int]  # timestep of each row (all its frames)
    kv_tick: bool = True  # advance the prompt transition (once per chunk)
    new_batch: bool = False  # a fresh KV cache before this forward (new stream batch)
    new_vae: bool = False  # a fresh decode stream before this forward (new video stream)
    expand: int = 0  # after this forward, replicate the cache row into `expand` rows (end of priming)
    renoise: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)  # (row, t_next, noise key)
    decode: Optional[list] = None  # pts of the chunk leaving with the last row; None: nothing leaves
    seed: int = 0
    epoch: int = 0
    done: Optional[int] = None  # the caller's command this forward completes
    stats: dict = field(default_factory=dict)  # the schedule's figures for this chunk (strength, timestep)


@dataclass(frozen=True, slots=True)
class SessionFrames:
    """One session's decoded frames of a forward, on their way from the last rank to rank 0."""

    sid: int
    frames: list  # host uint8 frames (numpy), small enough for the header; empty when in the output ring
    pts: list
    stats: dict[str, float]
    first_seq: Optional[int] = None  # where they are in the session's output ring, when it has one
    dropped: int = 0  # frames the output ring had no room for


# -- session state, sent by rank 0 in order with the forwards; the last rank's copy is rank 0's ack ----


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A session opens on every rank with its prompt's text embedding; the last rank writes its frames
    into `output_ring` (shared memory, by name) when it has one."""

    TENSORS: ClassVar[tuple[str, ...]] = ("context",)
    sid: int
    done: int  # the caller's command this completes
    context: Optional[torch.Tensor] = None
    output_ring: Optional[str] = None


@dataclass(frozen=True, slots=True)
class Note:
    """Completes a command once everything before it has been round the ring (an update, a drain)."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    sid: int
    done: int


@dataclass(frozen=True, slots=True)
class ResetStream:
    """A live reset: every rank drops the session's KV cache, decode stream and prepared graphs."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    sid: int


@dataclass(frozen=True, slots=True)
class SetPrompt:
    """A new prompt, blended into the old one over `chunks` chunks."""

    TENSORS: ClassVar[tuple[str, ...]] = ("context",)
    sid: int
    chunks: int
    context: Optional[torch.Tensor] = None


@dataclass(frozen=True, slots=True)
class CloseSession:
    TENSORS: ClassVar[tuple[str, ...]] = ()
    sid: int
    done: Optional[int] = None  # None: closed after a failure, nothing to complete


@dataclass(frozen=True, slots=True)
class PrepareFirstChunk:
    """A fresh stream's frame 0 is in: every rank prepares its first chunk of `frames` latent frames."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    sid: int
    frames: int
    done: int


# -- forwards -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    """A forward's rows for the next rank: who they belong to and what each rank does with them."""

    TENSORS: ClassVar[tuple[str, ...]] = ("tokens", "e", "e6", "x")
    fid: int
    groups: list[Group]
    grid: tuple[int, ...]
    times: list[StageRecord]  # stage times of the ranks it went through so far
    tokens: Optional[torch.Tensor] = None
    e: Optional[torch.Tensor] = None  # time embeddings
    e6: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None  # the noisy latents the last rank's flow step starts from


@dataclass(frozen=True, slots=True)
class ReturnedRows:
    """Last rank -> rank 0, as soon as they exist: each session's re-noised rows of a forward."""

    TENSORS: ClassVar[tuple[str, ...]] = ("rows",)
    fid: int
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # sid -> rows


@dataclass(frozen=True, slots=True)
class ForwardOutput:
    """Last rank -> rank 0: a forward's frames, the commands it completes and the ranks' stage times."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    fid: int
    outputs: list[SessionFrames]
    done: list[tuple[int, int]]  # (sid, command seq)
    times: list[StageRecord]


@dataclass(frozen=True, slots=True)
class EarlyFrames:
    """Last rank -> rank 0: a fresh stream's frame 0, ahead of the rest of its chunk."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    outputs: list[SessionFrames]


# -- block moves ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rebalance:
    """Move `blocks` blocks across `boundary` (balance.Move); `split` is the split after it."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    boundary: int
    blocks: int
    layers: list[int]
    split: list[int]


@dataclass(frozen=True, slots=True)
class Blocks:
    """Giver -> taker: the moved blocks' weights and every session's state for them."""

    TENSORS: ClassVar[tuple[str, ...]] = ("tensors",)
    layers: list[int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# -- operations -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """A round trip of a payload of a given size (hop time)."""

    TENSORS: ClassVar[tuple[str, ...]] = ("buf",)
    i: int
    buf: Optional[torch.Tensor] = None


@dataclass(frozen=True, slots=True)
class Profile:
    """Every rank profiles its part of `count` forwards from forward `first_fid` into `directory`."""

    TENSORS: ClassVar[tuple[str, ...]] = ()
    directory: str
    first_fid: int
    count: int


@dataclass(frozen=True, slots=True)
class Stop:
    """The ring shuts down once this has been round it."""

    TENSORS: ClassVar[tuple[str, ...]] = ()


RingMessage = Union[OpenSession, Note, ResetStream, SetPrompt, CloseSession, PrepareFirstChunk, Forward,
                    ReturnedRows, ForwardOutput, EarlyFrames, Rebalance, Blocks, Ping, Profile, Stop]
ALL: tuple[type, ...] = RingMessage.__args__  # type: ignore[attr-defined]
