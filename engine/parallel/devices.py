"""The `--devices` grammar (interface.devices) resolved on this host: torchrun's environment, the GPUs
that exist."""

from __future__ import annotations

import os

from interface.devices import TORCHRUN, RankDevices, parse_device_spec


def parse_devices(spec: str) -> RankDevices | None:
    """None for a single-device spec; RankDevices for several ranks. ValueError on a bad spec."""
    parsed = parse_device_spec(spec)
    return _from_torchrun() if parsed == TORCHRUN else parsed


def _from_torchrun() -> RankDevices:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; the process of RANK 0 is the
    engine's caller."""
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
