"""What the caller (engine.parallel.engine) and the ranks say to each other over pipes.

Commands go to rank 0 only; rank 0 turns them into ring messages. Events come back from rank 0
(outputs, completions, stats) and from any rank (its failure). Plain dataclasses, pickled by the pipe.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from interface.messages import EngineInfo


# -- commands (caller -> rank 0) ----------------------------------------------------------------------
@dataclass
class OpenCmd:
    sid: int
    seq: int
    prompt: str
    params: dict  # interface.controls.StreamParams.model_dump()


@dataclass
class ChunkCmd:
    sid: int
    seq: int
    frames: Any  # np.ndarray uint8 [T, H, W, 3]
    pts: list  # one per frame; None for padding frames (flush)


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
    frames: list  # uint8 [H, W, 3] each
    pts: list
    stats: dict = field(default_factory=dict)


@dataclass
class Done:
    sid: int
    seq: int
    error: Optional[str] = None


@dataclass
class Stats:
    stats: dict


@dataclass
class PingResult:
    ms_per_hop: float
    round_trip_ms: list


@dataclass
class Failed:
    rank: int
    message: str
