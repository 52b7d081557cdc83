"""Messages between the server process and the engine process.

They travel over a multiprocessing Pipe as plain dicts (`encode`/`decode`), never as pickled
arrays: frames go through the shared-memory rings of `interface.frame_ring`, and a message only
names the ring slots that hold them.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from interface.catalogue import Decoder, DType, Encoder, KVPolicy
from interface.controls import MAX_PROMPT_CHARS, StreamParams, StreamUpdate
from interface.devices import DeviceSpec

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineInfo(BaseModel):
    """What the engine reports about itself: the model it runs and the facts the server sizes its
    sessions by (the engine fills them in: engine.protocol.engine_info)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    steps: int = Field(ge=1)
    random_weights: bool
    device: str
    dtype: str
    attention: str
    decoder: Decoder = "wan"  # latents -> pixels: the Wan VAE, or the light TAEHV or LightVAE
    encoder: Encoder = "wan"  # pixels -> latents, likewise
    max_chunk_frames: int = Field(ge=1, description="the most frames one push may carry (a stream's first chunk)")
    chunk_frames: int = Field(ge=1, description="frames of a chunk once a stream runs")
    stage_stats: tuple[str, ...] = Field(description="FramesOut.stats keys that time a chunk's stages, in ms")


class WorkerOptions(_Message):
    """How the server asks the engine process to start."""

    model: str = "tiny"
    weights: Optional[str] = None
    device: DeviceSpec = "auto"
    height: Optional[int] = Field(None, gt=0)
    width: Optional[int] = Field(None, gt=0)
    seed: int = 0
    decoder: Decoder = "wan"
    encoder: Encoder = "wan"
    taehv_weights: Optional[str] = None  # taew2_1.pth, for decoder or encoder taehv
    lightvae_weights: Optional[str] = None  # lightvaew2_1.pth, for decoder or encoder lightvae
    # Forwards between a chunk's denoising steps (EngineOptions.step_lag); None: the number of ranks
    # for a multi-step model on several ranks, else 1.
    step_lag: Optional[int] = Field(None, ge=1, le=8)
    # KV cache and first-chunk schedule (EngineOptions.kv_policy); None: the model config's
    kv_policy: Optional[KVPolicy] = None
    # Number format (EngineOptions.dtype); None: bf16 on CUDA, float32 on CPU; fp8 needs FP8 tensor cores
    dtype: Optional[DType] = None
    # The server's SLO, for the engine's batch scheduler (engine.parallel.slo): how many sessions share
    # a forward and how long a forward may wait for another session's chunk
    target_fps: float = Field(16.0, gt=0.0, le=120.0)
    deadline_ms: float = Field(1000.0, gt=0.0)
    max_batch: int = Field(4, ge=1, le=64)
    log_level: str = "INFO"
    warmup: bool = Field(True, description="run a throwaway session once before reporting ready")
    # Test-only: seconds the worker sleeps per pushed chunk, to simulate an engine slower than
    # its input. Also read from STREAMGEN_TEST_CHUNK_DELAY_S. Never set it in production.
    test_chunk_delay_s: float = Field(0.0, ge=0.0, le=10.0)


# ---- server -> engine -------------------------------------------------------------------------


class OpenSession(_Message):
    kind: Literal["open"] = "open"
    session_id: SessionId
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    params: Optional[StreamParams] = None
    input_ring: str  # shared-memory names, created and unlinked by the server
    output_ring: str


class PushFrames(_Message):
    """Frames [first_seq, first_seq + count) of the session's input ring are ready."""

    kind: Literal["push"] = "push"
    session_id: SessionId
    first_seq: int = Field(ge=0)
    count: int = Field(ge=1, le=64)


class UpdateSession(_Message):
    kind: Literal["update"] = "update"
    session_id: SessionId
    update: StreamUpdate


class CloseSession(_Message):
    kind: Literal["close"] = "close"
    session_id: SessionId


class Shutdown(_Message):
    kind: Literal["shutdown"] = "shutdown"


# ---- engine -> server -------------------------------------------------------------------------


class EngineReady(_Message):
    kind: Literal["ready"] = "ready"
    info: EngineInfo


class EngineFailed(_Message):
    """The engine could not start (bad weights, no such device...)."""

    kind: Literal["engine_failed"] = "engine_failed"
    message: str


class SessionOpened(_Message):
    kind: Literal["opened"] = "opened"
    session_id: SessionId
    chunk_frames: int = Field(ge=1)


class FramesOut(_Message):
    """Reply to one PushFrames: generated frames [first_seq, first_seq + count) of the output ring.
    A push has exactly one reply that is not `partial`. Partial ones carry frames ready before that
    reply (a fresh stream's frame 0) or finished between pushes (a pipeline-parallel engine).

    `count` may be 0 (the pipeline is still filling). `pts[i]` is the input pts of frame i.
    """

    kind: Literal["frames"] = "frames"
    session_id: SessionId
    first_seq: int = Field(ge=0)
    count: int = Field(ge=0)
    pts: list[int]
    dropped: int = Field(0, ge=0, description="outputs lost because the output ring was full")
    partial: bool = Field(False, description="frames sent outside a push's own reply (see above)")
    chunk_frames: int = Field(ge=1, description="frames that complete the engine's next chunk: a push carries as many, "
                                                "or fewer, which the engine starts encoding ahead of the chunk")
    engine_ms: float = Field(ge=0.0, description="wall time of this push inside the engine process")
    stats: dict[str, float] = {}
    prompt: str = Field("", description="the prompt the engine session was last given")
    updates_applied: int = Field(0, ge=0)


class SessionError(_Message):
    """A request for one session failed; the engine goes on serving the others."""

    kind: Literal["session_error"] = "session_error"
    session_id: str
    request: str
    message: str
    fatal: bool = Field(False, description="the engine dropped the session")


class SessionClosed(_Message):
    kind: Literal["closed"] = "closed"
    session_id: str


class RankStage(BaseModel):
    """One rank's share of a forward (medians since the last block move)."""

    blocks: int = Field(ge=0)
    dit_ms: Optional[float] = None  # its blocks
    other_ms: Optional[float] = None  # the rest of its share: VAE encode (rank 0), head and VAE decode (last)
    graph_forwards: int = Field(0, ge=0, description="forwards whose blocks replayed a CUDA graph")
    eager_forwards: int = Field(0, ge=0)


class BlockDecision(BaseModel):
    """A block scheduler decision (a move, or the rollback of one that made things worse)."""

    time: float
    forward: int
    boundary: int
    blocks: int  # > 0: downstream, < 0: upstream
    split_before: list[int]
    split_after: list[int]
    slowest_ms_before: float
    slowest_ms_predicted: float
    stage_ms: list[float] = []  # each rank's stage (dit + other) then
    rollback: bool = False


class PipelineStats(_Message):
    """The engine core's state (one device: a ring of one), sent by the engine process about once a
    second while it changes (for /metrics and /api/pipeline)."""

    kind: Literal["pipeline"] = "pipeline"
    ranks: list[RankStage]
    rebalance: bool = Field(description="the block scheduler is on")
    moves: int = Field(0, ge=0, description="block moves made since start (decided or asked for)")
    decisions: list[BlockDecision] = []  # the scheduler's latest, oldest first
    forwards: int = Field(0, ge=0)
    batched_forwards: int = Field(0, ge=0, description="forwards that carried several sessions")
    forwards_by_batch: dict[int, int] = Field({}, description="steady forwards by the sessions they carried")
    batch_waits: int = Field(0, ge=0, description="forwards that waited for other sessions' chunks")
    batch_wait_ms: float = Field(0.0, ge=0.0, description="their waits in all")
    early_frames: int = Field(0, ge=0)
    hop_ms: Optional[float] = None


ToEngine = Annotated[
    Union[OpenSession, PushFrames, UpdateSession, CloseSession, Shutdown], Field(discriminator="kind")
]
FromEngine = Annotated[
    Union[EngineReady, EngineFailed, SessionOpened, FramesOut, SessionError, SessionClosed, PipelineStats],
    Field(discriminator="kind"),
]

_to_engine: TypeAdapter[ToEngine] = TypeAdapter(ToEngine)
_from_engine: TypeAdapter[FromEngine] = TypeAdapter(FromEngine)


def encode(message: BaseModel) -> dict:
    """A message as a dict of plain Python values, for Connection.send."""
    return message.model_dump(mode="json")


def decode_to_engine(data: object) -> ToEngine:
    return _to_engine.validate_python(data)


def decode_from_engine(data: object) -> FromEngine:
    return _from_engine.validate_python(data)
