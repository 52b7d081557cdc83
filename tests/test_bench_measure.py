"""The benchmark's FLOP count, which every MFU figure in docs/BENCHMARKS.md rests on."""

from __future__ import annotations

import torch

from bench.measure import StageClock


def test_flop_count_includes_the_gemm_with_a_gelu_epilogue():
    # the DiT's FFN on CUDA runs its first GEMM as aten::_addmm_activation, which torch's counter
    # has no formula for; the clock must count it like the plain addmm it replaces
    clock = StageClock(torch.device("cpu"))
    clock.count = True
    b, x, w = torch.randn(64), torch.randn(10, 32), torch.randn(64, 32)
    with clock.stage("fused"):
        torch._addmm_activation(b, x, w.t(), use_gelu=True)
    with clock.stage("plain"):
        torch.nn.functional.gelu(torch.addmm(b, x, w.t()), approximate="tanh")
    assert clock.flops["fused"] == clock.flops["plain"] == 2 * 10 * 32 * 64
