"""Pipeline-parallel engine (docs/PARALLEL.md): N ranks, one process per device, the DiT's
blocks split into contiguous stages around a ring.

Modules, one job each:
- devices: the `--devices` grammar (`cpu:N`, `cuda:0,1`, `cuda*N`, `torchrun`);
- options: the knobs of the schedulers and of start-up (pydantic, no torch);
- errors: EngineFailure (no torch, so the server can import it);
- wire: one message per hop (pickled header + one packed tensor payload) and the ring's links;
- stage: a rank's share of a DiT forward, several sessions' rows in one batch;
- driver: rank 0's per-session streaming logic (what StreamSession does in one process);
- balance: the block scheduler; slo: the SLO-aware batch scheduler; timing: stage clocks;
- rank: a rank's process (build what it owns, serve the ring); engine: the caller's side (sessions);
- protocol: the commands and events between the caller and the ranks (pipes).

This package's __init__ imports nothing heavy: `engine.parallel.errors` and `.options` stay torch-free.
"""

from engine.parallel.errors import EngineFailure

__all__ = ["EngineFailure"]
