"""Pydantic models of the HTTP API and of the data-channel messages."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel

from interface.controls import MAX_PROMPT_CHARS, StreamParams
from interface.messages import EngineInfo

SessionState = Literal["connecting", "streaming", "closed", "failed"]
SessionKind = Literal["browser", "whip"]
OutputKind = Literal["record", "restream", "virtual_camera"]
OutputState = Literal["starting", "running", "stopped", "failed"]
MAX_SDP_CHARS = 1_000_000  # the configured max_sdp_bytes (at most this) applies
MAX_URL_CHARS = 2000


class OfferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]
    prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS)
    params: Optional[StreamParams] = None


class OfferResponse(BaseModel):
    sdp: str
    type: Literal["answer"] = "answer"
    session_id: str


class Percentiles(BaseModel):
    """Milliseconds over the recent window; None until there is a sample."""

    p50: Optional[float] = None
    p95: Optional[float] = None
    p99: Optional[float] = None
    mean: Optional[float] = None
    max: Optional[float] = None


class FrameTimes(BaseModel):
    """Where one sent frame's time went inside the server: monotonic clock seconds (time.monotonic, comparable
    with another process's on the same host) at its camera frame's arrival, its chunk's push to the engine,
    its generated frame's return from the engine, its hand-over to the paced track, and its send to the encoder."""

    pts: int
    arrived: float
    pushed: float
    returned: float
    delivered: float
    sent: float


class SessionStats(BaseModel):
    """Pushed over the data channel once a second and returned by GET /api/sessions/{id}."""

    type: Literal["stats"] = "stats"
    session_id: str
    uptime_s: float
    fps_in: float
    fps_out: float
    ttff_ms: Optional[float] = None
    latency_ms: Percentiles
    jitter_ms: Percentiles
    deadline_ms: float
    miss_rate: float = Field(description="share of sent frames whose latency exceeded the deadline")
    frames_in: int
    frames_out: int
    chunks: int
    pushes: int = Field(0, description="requests that brought camera frames to the engine: one per chunk, or one "
                                       "per frame or so with encode ahead")
    dropped: dict[str, int]
    engine: dict[str, float] = Field(description="last chunk: vae_encode_ms, dit_ms, vae_decode_ms, ...")
    engine_prompt: str = ""
    engine_updates: int = 0
    latency_seq: int = Field(0, description="latency samples so far; the page appends the new ones")
    recent_latency_ms: list[float] = Field(default_factory=list)
    stages_ms: dict[str, Percentiles] = Field(
        default_factory=dict,
        description="per sent frame over the recent window: fill (arrival -> its chunk's push), engine (push -> "
        "back at the server), output (-> handed to the paced track, scaling included), pacing (-> sent)",
    )
    frame_seq: int = Field(0, description="frames timed so far (recent_frames holds the newest)")
    recent_frames: list[FrameTimes] = Field(
        default_factory=list, description="the newest frames' stage times; GET /api/sessions/{id} only"
    )


class Size(BaseModel):
    width: int
    height: int


class OutputInfo(BaseModel):
    """A recording, restream or virtual camera fed by a session."""

    output_id: str
    kind: OutputKind
    target: str = Field(description="file path, or the URL with its stream key masked")
    state: OutputState
    error: Optional[str] = None
    frames_written: int
    dropped: int = Field(description="frames the output could not keep up with (its bounded queue was full)")
    duration_s: Optional[float] = Field(None, description="pts span of the frames written")
    size: Optional[Size] = None
    started_at: float = Field(description="unix time")


class OutputList(BaseModel):
    outputs: list[OutputInfo]


class RecordRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["record"]
    path: Optional[str] = Field(
        None, max_length=255, description="file name (.mp4) under the server's recordings folder; default: generated"
    )
    bitrate_kbps: Optional[int] = Field(None, ge=100, le=100_000)


class RestreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["restream"]
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, description="rtmp://, rtmps://, srt://, tcp:// or udp://")
    bitrate_kbps: Optional[int] = Field(None, ge=100, le=100_000)


class VirtualCameraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["virtual_camera"]


class OutputRequest(RootModel[Annotated[Union[RecordRequest, RestreamRequest, VirtualCameraRequest], Field(discriminator="kind")]]):
    """POST /api/sessions/{id}/outputs: one of the request kinds, told apart by `kind`."""


class SessionInfo(BaseModel):
    session_id: str
    kind: SessionKind = "browser"
    state: SessionState
    created_at: float = Field(description="unix time")
    prompt: str
    params: StreamParams
    camera: Optional[Size] = None
    output: Optional[Size] = None
    error: Optional[str] = None
    stats: SessionStats
    viewers: int = Field(0, description="WHEP viewers of this session, connected or connecting")
    viewers_connecting: int = Field(0, description="of those, answered but not connected yet")
    outputs: list[OutputInfo] = Field(default_factory=list)


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class IceServerList(BaseModel):
    """The STUN/TURN servers for one peer connection, TURN credentials included."""

    ice_servers: list[dict[str, Any]]


class ServerInfo(BaseModel):
    """What the page needs before it starts: the model, and whether its output is meaningful."""

    model_config = ConfigDict(protected_namespaces=())

    engine_state: str
    engine_error: Optional[str] = None
    engine: Optional[EngineInfo] = None
    random_weights: Optional[bool] = None
    notice: Optional[str] = None
    deadline_s: float
    max_sessions: int
    sessions: int
    default_prompt: str
    output_size: str
    ice_servers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="RTCIceServer dicts that need no credentials (STUN); the full list, TURN included, "
                    "is at GET /api/ice-servers for authenticated callers",
    )
    turn: bool = Field(False, description="TURN servers are configured (credentials from GET /api/ice-servers)")
    whip_token_required: bool = False
    token_required: bool = Field(False, description="the API and WHEP need `Authorization: Bearer TOKEN`")
    virtual_camera: bool = False


class ErrorBody(BaseModel):
    error: str
    details: Optional[list[dict[str, Any]]] = None


class ChannelAck(BaseModel):
    type: Literal["ack"] = "ack"
    applied: dict[str, Any]


class ChannelError(BaseModel):
    type: Literal["error"] = "error"
    error: str
    details: Optional[list[dict[str, Any]]] = None
