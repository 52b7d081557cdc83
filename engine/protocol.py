"""What an engine's caller side (engine.frontend) and its core (rank 0, engine.parallel.rank0) say to
each other: over pipes when the core runs in a rank process, as plain calls when it runs in the caller's
thread (engine.runtime).

Commands go to the core only; it turns them into forwards and ring messages. Events come back from the
core (outputs, completions, stats) and from any rank (its failure). Plain dataclasses, pickled by a
pipe. No torch here. The chunk facts every engine shares are here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from interface.messages import BlockDecision, EngineInfo

FIRST_CHUNK = 5  # a stream's first DiT chunk: 5 pixel frames -> 2 latent frames
CHUNK = 4  # then 4 -> 1
# A chunk's stats that time its stages on the device, in ms (FramesOut.stats; EngineInfo names them)
ENCODE_MS, DIT_MS, DECODE_MS = STAGE_STATS = ("vae_encode_ms", "dit_ms", "vae_decode_ms")


def engine_info(**facts: Any) -> EngineInfo:
    """What an engine reports about itself, with the chunk facts the server sizes its frame rings and
    budgets by."""
    return EngineInfo(max_chunk_frames=FIRST_CHUNK, chunk_frames=CHUNK, stage_stats=STAGE_STATS, **facts)


# -- commands (caller -> rank 0) ----------------------------------------------------------------------
@dataclass
class OpenCmd:
    sid: int
    seq: int
    prompt: str
    params: dict  # interface.controls.StreamParams.model_dump()
    output_ring: Optional[str] = None  # the session's shared-memory output ring: the last stage writes it


@dataclass
class ChunkCmd:
    sid: int
    seq: int
    frames: Any  # np.ndarray uint8 [T, H, W, 3]
    pts: list  # one per frame; None for padding frames (flush)


@dataclass
class AheadCmd:
    """Frames of a stream's next chunk before it is whole (at most CHUNK - 1 of them, after the stream's
    frame 0): the core encodes what it can of them at once; the ChunkCmd with the chunk's last frames
    completes it. Nothing waits for this command, so no Done answers it."""

    sid: int
    seq: int
    frames: Any  # np.ndarray uint8 [T, H, W, 3]
    pts: list


@dataclass
class UpdateCmd:
    sid: int
    seq: int
    update: dict  # interface.controls.StreamUpdate.model_dump(exclude_unset=True)


@dataclass
class DrainCmd:
    sid: int
    seq: int


@dataclass
class CloseCmd:
    sid: int
    seq: int


@dataclass
class RebalanceCmd:
    boundary: int
    blocks: int


@dataclass
class ConfigureCmd:
    rebalance: Optional[bool] = None
    profile: Optional[tuple[str, int]] = None  # (directory, forwards): engine.parallel.profiling


@dataclass
class PingCmd:
    nbytes: int
    repeats: int = 10


@dataclass
class StopCmd:
    pass


# -- events (ranks -> caller) -------------------------------------------------------------------------
@dataclass
class Ready:
    rank: int
    info: EngineInfo
    split: list


@dataclass
class Output:
    sid: int
    frames: list  # uint8 [H, W, 3] each; empty when they were written into the session's output ring
    pts: list
    stats: dict = field(default_factory=dict)
    first_seq: Optional[int] = None  # the output ring's slots [first_seq, first_seq + len(pts)) hold them
    dropped: int = 0  # frames the output ring had no room for


@dataclass
class Done:
    sid: int
    seq: int
    error: Optional[str] = None


@dataclass(frozen=True)
class StageTimes:
    """A rank's median stage times since the last move, ms."""

    dit: float
    other: float
    total: float


@dataclass(frozen=True)
class Ban:
    boundary: int
    direction: str  # "downstream" or "upstream"


@dataclass(frozen=True)
class BalanceStats:
    enabled: bool
    split: list[int]
    stage_ms: Optional[list[StageTimes]]  # None until a window of forwards was measured
    decisions: list[BlockDecision] = field(default_factory=list)  # the latest, oldest first
    samples: int = 0
    banned: list[Ban] = field(default_factory=list)


@dataclass(frozen=True)
class RankForwards:
    """How a rank ran its blocks so far: forwards replayed from a CUDA graph, forwards run eagerly."""

    rank: int
    replayed: int
    eager: int


@dataclass(frozen=True)
class BlockMove:
    """A block move rank 0 made, decided by the scheduler (automatic) or asked for."""

    time: float
    forward: int  # the first forward after it
    boundary: int
    blocks: int
    layers: list[int]
    split_before: list[int]
    split_after: list[int]
    automatic: bool


@dataclass(frozen=True)
class RingStats:
    """Rank 0's report on the ring (engine.parallel.rank0.Rank0.stats); engine.worker.pipeline_stats
    turns it into the server's PipelineStats."""

    world: int
    devices: list[str]
    split: list[int]  # blocks per rank
    blocks: list[str]  # each rank's block range, e.g. "0-14"
    forwards: int
    batched_forwards: int  # forwards that carried several sessions
    early_frames: int  # first frames of fresh streams sent ahead of their chunks
    inflight: int
    capacity: int
    graphs: list[RankForwards]
    max_inflight: int  # most forwards in the ring at once so far
    max_stream_overlap: int  # most steady multi-step forwards of one stream in flight at once
    sessions: int
    hop_ms: Optional[float]  # measured by a PingCmd; None before
    moves: list[BlockMove]  # the latest, oldest first
    moves_total: int
    balance: BalanceStats
    batch: dict  # engine.parallel.slo.BatchScheduler.stats(): batch sizes and latencies, for benchmarks


@dataclass
class Stats:
    stats: RingStats


@dataclass
class PingResult:
    ms_per_hop: float
    round_trip_ms: list


@dataclass
class Failed:
    rank: int
    message: str
