"""Live stream controls, shared by the engine API, the engine process and the server (docs/ARCHITECTURE.md §3)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 2000


class StreamParams(BaseModel):
    """A session's tunable parameters. None means: the model's default."""

    model_config = ConfigDict(extra="forbid")

    steps: Optional[int] = Field(None, ge=1, le=4, description="denoising steps (stream batch size)")
    noise_strength: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="upper bound s_max of the input noise strength"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1)
    motion_control: bool = Field(True, description="motion-aware noise controller on/off")
    transition_chunks: Optional[int] = Field(
        None, ge=0, le=64, description="chunks over which a prompt change blends in (0 = switch at once)"
    )


class StreamUpdate(BaseModel):
    """A live change, applied at the next chunk boundary. Absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS)
    transition_chunks: Optional[int] = Field(None, ge=0, le=64)
    steps: Optional[int] = Field(None, ge=1, le=4)
    noise_strength: Optional[float] = Field(None, ge=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    motion_control: Optional[bool] = None
    reset: bool = False
