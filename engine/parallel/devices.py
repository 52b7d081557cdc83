"""The `--devices` grammar.

One device, in-process engine (parse_devices returns None): `auto`, `cpu`, `cuda`, `cuda:N` (device N).
Several ranks, one process each (parse_devices returns a RankDevices):
- `cpu:N` or `cpu*N`: N CPU ranks (gloo), e.g. for tests;
- `cuda:0,1` (a list, in ring order; `cuda:2,3` is fine) or `cuda*N` (the first N GPUs) (NCCL);
- `torchrun`: ranks started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one
  per local GPU (or CPU), possibly over several nodes; the process of RANK 0 is the engine's caller.
`cuda:N` stays one device N (never "the first N"); a one-element list `cuda:3,` is one rank on GPU 3.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RankDevices:
    kind: str  # "cpu" or "cuda"
    devices: tuple[str, ...]  # one torch device string per rank, in ring order ("cpu" repeated for CPU)
    external: bool = False  # ranks started by torchrun, not by the engine

    @property
    def world(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"


_COUNT = re.compile(r"^(cpu|cuda)[:*](\d+)$")
_LIST = re.compile(r"^cuda:(\d+(?:,\d*)+)$")


def parse_devices(spec: str) -> RankDevices | None:
    """None for a single-device spec; RankDevices for several ranks. ValueError on a bad spec."""
    s = spec.strip().lower()
    if s in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s):
        return None
    if s == "torchrun":
        return _from_torchrun()
    m = _LIST.match(s)
    if m:
        ids = [int(x) for x in m.group(1).split(",") if x != ""]
        if len(set(ids)) != len(ids):
            raise ValueError(f"--devices {spec!r}: a GPU can hold one rank (NCCL refuses duplicates)")
        return RankDevices("cuda", tuple(f"cuda:{i}" for i in ids))
    m = _COUNT.match(s)
    if m:
        kind, n = m.group(1), int(m.group(2))
        if n < 1:
            raise ValueError(f"--devices {spec!r}: need at least one rank")
        if kind == "cpu":
            return RankDevices("cpu", ("cpu",) * n)
        if s.startswith("cuda*"):
            return RankDevices("cuda", tuple(f"cuda:{i}" for i in range(n)))
    raise ValueError(
        f"bad device {spec!r}: use cpu, cuda, cuda:N (one device), or cpu:N, cuda:0,1, cuda*N, torchrun (ranks)"
    )


def _from_torchrun() -> RankDevices:
    try:
        world = int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ValueError("--devices torchrun: WORLD_SIZE is not set (start the command with torchrun)") from None
    # Devices of other nodes are not known here; each rank picks cuda:LOCAL_RANK (or cpu) itself.
    kind = os.environ.get("STREAMGEN_TORCHRUN_DEVICE", "cuda" if _cuda_available() else "cpu")
    return RankDevices(kind, (kind,) * world, external=True)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_local(ranks: RankDevices) -> None:
    """Check that the GPUs named exist on this host (spawned ranks only)."""
    if ranks.kind != "cuda" or ranks.external:
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"devices {','.join(ranks.devices)} requested but CUDA is not available")
    count = torch.cuda.device_count()
    for d in ranks.devices:
        if int(d.split(":")[1]) >= count:
            raise ValueError(f"device {d}: only {count} CUDA device(s)")
