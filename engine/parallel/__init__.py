"""The engine's core and its stages, and the ring executor (docs/ARCHITECTURE.md §5, §6, docs/PARALLEL.md):
N ranks, one process per device, the DiT's blocks split into contiguous stages around a ring; the
in-process engine (engine.runtime) is rank 0 of a ring of one.

Modules, one job each:
- rank0: the core: the sessions' schedules (engine.schedule), batching, the block scheduler;
- rank: what every rank does (build its parts, apply ring messages, run its stage, the last stage's
  flow step and decode); rank_process: a rank's process;
- stage, stage_graph: a rank's share of a DiT forward, several sessions' rows at once, as CUDA graphs;
- engine: the ring executor's caller side (spawns the ranks, reads their events);
- wire: how the typed ring messages (engine/ring_messages.py) travel (pickled header + one packed tensor
  payload per hop);
- balance: the block scheduler; slo: the SLO-aware batch scheduler; profiling: each rank's profile;
- devices: checks the `--devices` grammar's ranks against this machine.

The typed messages between ranks are engine/ring_messages.py, EngineFailure engine/errors.py, the knobs
engine.build.ParallelOptions: the schedule and the caller's side use them too, so they sit below this
package.
"""
