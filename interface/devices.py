"""The `--devices` grammar, written once: the server validates it, the engine resolves it on its host.

One device, in-process engine (parse_device_spec returns None): `auto`, `cpu`, `cuda`, `cuda:N` (device N).
Several ranks, one process each (a RankDevices):
- `cpu:N` or `cpu*N`: N CPU ranks (gloo), e.g. for tests;
- `cuda:0,1` (a list, in ring order; `cuda:2,3` is fine) or `cuda*N` (the first N GPUs) (NCCL);
- `torchrun`: ranks started by torchrun, one per local GPU (or CPU), possibly over several nodes; their
  number and kind come from torchrun's environment (engine.parallel.devices reads it).
`cuda:N` stays one device N (never "the first N"); a one-element list `cuda:3,` is one rank on GPU 3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator

TORCHRUN = "torchrun"
_ONE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_COUNT = re.compile(r"^(cpu|cuda)[:*](\d+)$")
_LIST = re.compile(r"^cuda:(\d+(?:,\d*)+)$")


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


def parse_device_spec(spec: str) -> Union[None, RankDevices, Literal["torchrun"]]:
    """None for one device; RankDevices for ranks the engine starts; "torchrun". ValueError on a bad spec."""
    s = spec.strip().lower()
    if _ONE.match(s):
        return None
    if s == TORCHRUN:
        return TORCHRUN
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


def _checked(spec: str) -> str:
    parse_device_spec(spec)
    return spec


# A `--devices` value in a pydantic model (server config, engine process options).
DeviceSpec = Annotated[str, AfterValidator(_checked)]


def one_device(spec: str) -> Optional[str]:
    """The spec of a single device, lower-cased (`auto`, `cpu`, `cuda`, `cuda:N`); None if it names ranks."""
    return spec.strip().lower() if parse_device_spec(spec) is None else None
