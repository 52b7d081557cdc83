"""Knobs of the engine's core and of the ring (no torch: validated with the engine's options)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class ParallelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Blocks per rank at start, e.g. [16, 14]; None: an even split (rank 0 and the last rank, which
    # also run the VAE, get the smaller shares when it does not divide evenly).
    split: Optional[list[int]] = None
    # Chunks of one session that push() may leave in flight before it waits for outputs. 1: push
    # returns the outputs of its own chunks; 2 or more lets the device (or the ranks) work on the next
    # chunk while the host hands over the last one (outputs then come back from later calls). None: 2 for
    # one CUDA device, 1 otherwise.
    inflight: Optional[int] = Field(None, ge=1, le=64)
    # Forwards in the ring at once; None: the number of ranks (each rank busy with one), two for a ring of
    # one (a forward's frames go back while the next is queued).
    ring_capacity: Optional[int] = Field(None, ge=1, le=64)

    # Block scheduler (engine.parallel.balance).
    rebalance: bool = True
    rebalance_every: int = Field(8, ge=1, description="forwards between two decisions")
    rebalance_gain: float = Field(0.04, ge=0.0, description="least relative gain of the slowest stage")
    rebalance_min_ms: float = Field(0.5, ge=0.0, description="least absolute gain in ms")
    min_blocks: int = Field(1, ge=0, description="blocks a rank keeps at least")
    rebalance_settle: int = Field(4, ge=0, description="forwards not measured after a move (old split, graph capture)")
    rebalance_ban_windows: int = Field(16, ge=0, description="windows a rolled-back direction is not tried again")

    # SLO-aware batch scheduler (engine.parallel.slo).
    max_batch: int = Field(4, ge=1, le=64, description="sessions in one forward at most")
    target_fps: float = Field(16.0, gt=0.0, description="output frames per second each session needs")
    deadline_ms: float = Field(1000.0, gt=0.0, description="input-to-output latency budget of a frame")

    # Start-up and failure detection.
    start_timeout_s: float = Field(600.0, gt=0.0)
    stall_timeout_s: float = Field(300.0, gt=0.0, description="a call waiting longer than this fails the engine")
    # Test hook: extra ms per owned block per forward on each rank (emulates a slower device).
    slow_block_ms: Optional[list[float]] = None
