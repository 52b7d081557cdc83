"""Measuring tools shared by the benchmarks: the card's matmul ceiling, timed and FLOP-counted stages,
and the synthetic input clip.

Model-FLOP utilisation (MFU) = FLOPs a stage needs (counted by torch's FlopCounterMode over one real
call: matmuls, convolutions and attention) / the stage's measured time / the bf16 matmul ceiling
measured on the same card in the same process.
"""

from __future__ import annotations

import inspect

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from bench.code_tree import code_tree

STAGES = ("vae_encode", "dit", "vae_decode")


def synthetic_video(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A moving pattern (motion matters to the noise controller), uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w + n * 4, 3), dtype=np.uint8)
    return np.stack([base[:, 4 * i : 4 * i + w] for i in range(n)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_ms(fn: Callable[[], object], repeats: int, warmup: int = 3, cuda: bool = True) -> float:
    """Mean ms of one call of `fn` after `warmup` calls: CUDA events around the repeats on a GPU (the
    device's time, the queue kept full), the host clock otherwise."""
    for _ in range(warmup):
        fn()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(repeats):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / repeats


def matmul_ceiling_tflops(device: torch.device, n: int = 8192, repeats: int = 30, fp8: bool = False) -> float:
    """Best sustained bf16 GEMM rate of this card (n×n×n), in TFLOP/s (0 off the GPU: no MFU there). With
    `fp8`: the e4m3 GEMM the fp8 engine runs (torch._scaled_mm, row-wise float32 scales, bf16 out)."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm: Callable[[], Any] = lambda: a @ b  # noqa: E731
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # b column-major, as the kernel wants
        sa = torch.ones(n, 1, device=device, dtype=torch.float32)
        sb = torch.ones(1, n, device=device, dtype=torch.float32)
        gemm = lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    for _ in range(3):
        gemm()
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            gemm()
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n**3 / best / 1e12


def mfu(flops: Optional[float], ms: Optional[float], ceiling_tflops: float) -> Optional[float]:
    if not flops or not ms or not ceiling_tflops:
        return None
    return flops / (ms / 1000) / (ceiling_tflops * 1e12)


def _addmm_activation_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.addmm_flop(self_shape, a_shape, b_shape)


# Ops torch's counter has no formula for (it would count them as 0): the FFN's GEMM with a GELU
# epilogue. Without this our DiT's MFU came out low by the FFN's first GEMM (2.6 of 13.5 TFLOP at P1).
_EXTRA_FLOPS = {torch.ops.aten._addmm_activation: _addmm_activation_flop}


class StageClock:
    """Wraps callables so each call is timed (device-synchronised on both sides) and, while `count` is
    on, its FLOPs are counted. Used on the reference package's own objects, whose methods it wraps in
    place; only timing and counting are added."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.flops: dict[str, float] = {}
        self.enabled = False
        self.count = False

    def wrap(self, obj: Any, method: str, stage: str) -> None:
        """A generator method (a decode in parts) is timed and counted over all its parts."""
        inner: Callable = getattr(obj, method)
        if inspect.isgeneratorfunction(inner):
            def timed_parts(*args: Any, **kwargs: Any) -> Iterator[Any]:
                if not self.enabled:
                    yield from inner(*args, **kwargs)
                    return
                with self.stage(stage):
                    yield from inner(*args, **kwargs)

            setattr(obj, method, timed_parts)
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return inner(*args, **kwargs)
            with self.stage(stage):
                return inner(*args, **kwargs)

        setattr(obj, method, timed)

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) if self.count else None
        sync(self.device)
        t0 = time.perf_counter()
        if counter is not None:
            with counter:
                yield
        else:
            yield
        sync(self.device)
        if counter is not None:
            self.flops[stage] = self.flops.get(stage, 0.0) + float(counter.get_total_flops())
        else:
            self.ms[stage].append(1000 * (time.perf_counter() - t0))

    def median_ms(self, stage: str) -> Optional[float]:
        v = self.ms.get(stage)
        return float(np.median(v)) if v else None


def run_meta() -> dict:
    """Card, date and software versions of this run."""
    import platform

    gpu = torch.cuda.is_available()
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        gpu=torch.cuda.get_device_name() if gpu else "cpu", gpus=torch.cuda.device_count() if gpu else 0,
        driver=_driver() if gpu else None, torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if gpu else None, python=platform.python_version(),
        **code_tree(),
    )


def _driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
