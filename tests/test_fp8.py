"""dtype fp8 (engine/fp8.py, README "FP8 (Hopper/Ada)"): FP8Linear against a quantisation done by hand, the
module swap on the DiT, a whole tiny DiT forward against float32, block moves between ranks, and the
start-up refusal off FP8 tensor cores (engine options, engine process, server, render CLI). FP8Linear
itself runs on CPU (torch's scaled matmul has a CPU kernel), so its numbers are checked here; speed and
CUDA-graph capture are for a GPU run (bench.fp8_quality, bench.engine_bench --dtype fp8)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from engine.build import EngineOptions, build_dit, stream_defaults
from engine.config import load_model_config
from engine.dit import WanDiT
from engine.fp8 import BLOCK_LINEARS, FP8Linear, FP8Unavailable, convert_block, convert_blocks, fp8_device_problem
from engine.rope import Rope
from tests.conftest import REPO
from tests.test_engine import cli, write_mp4

REFUSAL = "fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada/Hopper, compute capability 8.9+)"
TINY = load_model_config("tiny")


# -- an independent e4m3 rounding: nearest of the 254 finite e4m3 values, ties to the even code ---------

def _e4m3_grid() -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).double()  # every bit pattern's value (the format's table)
    keep = torch.isfinite(values) & ~((codes & 0x7F) == 0x00) | (codes == 0)  # one zero, no NaN
    values, codes = values[keep], codes[keep].long()
    order = values.argsort()
    return values[order], codes[order]


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (float64, |x| <= 448) rounded to the nearest e4m3 value, ties to the even code, as float64."""
    grid, codes = _e4m3_grid()
    hi = torch.searchsorted(grid, x).clamp(1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = x - grid[lo], grid[hi] - x
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    return torch.where(pick_hi, grid[hi], grid[lo])


def hand_fp8_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y = (x_q * s_x) @ (w_q * s_w)^T + b in float64: s_x per row of x, s_w per row of w, amax / 448."""
    x, w = x.double().reshape(-1, x.shape[-1]), w.double()
    sx = x.abs().amax(1, keepdim=True) / 448
    sw = w.abs().amax(1, keepdim=True) / 448
    xq, wq = round_e4m3(x / sx), round_e4m3(w / sw)
    return (xq * sx) @ (wq * sw).T + b.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_e4m3_rounding_by_hand_agrees_with_the_format_on_exact_values() -> None:
    grid, _ = _e4m3_grid()
    assert len(grid) == 253 and grid.max() == 448 and grid.min() == -448
    assert torch.equal(round_e4m3(grid), grid)


def test_fp8_linear_equals_the_quantisation_done_by_hand() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64) * torch.logspace(-2, 1, 7)[None, :, None]  # tokens of very different norms
    fp8 = FP8Linear.from_linear(lin)
    y = fp8(x)
    assert y.shape == (3, 7, 48) and y.dtype == torch.float32
    ref = hand_fp8_linear(x, lin.weight.detach(), lin.bias.detach()).reshape(3, 7, 48)
    # the same quantised operands: only float32 accumulation separates them
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_fp8_linear_in_bf16_is_the_hand_result_rounded_to_bf16() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(128, 64).to(torch.bfloat16)
    x = torch.randn(2, 9, 128, dtype=torch.bfloat16)
    y = FP8Linear.from_linear(lin)(x)
    assert y.dtype == torch.bfloat16
    ref = hand_fp8_linear(x, lin.weight.detach(), lin.bias.detach()).reshape(2, 9, 64)
    # bf16 keeps 8 significant bits: the GEMM's output and the bias add round twice, under 2^-8 each
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))


def test_fp8_linear_against_the_float32_linear() -> None:
    """e4m3 keeps 4 significant bits (relative rounding error up to 2^-4 per operand): with row-wise
    scales a layer's output stays within 5 % (relative Frobenius error; seen: 3.7 %) of float32's on Gaussian
    data."""
    torch.manual_seed(2)
    lin = nn.Linear(512, 256)
    x = torch.randn(64, 512)
    err = _rel(FP8Linear.from_linear(lin)(x), lin(x))
    assert 0.005 < err < 0.05, err  # > 0: it really quantises


def test_a_zero_token_stays_zero_and_finite() -> None:
    lin = nn.Linear(32, 16)
    x = torch.zeros(2, 32)
    x[1] = torch.randn(32)
    y = FP8Linear.from_linear(lin)(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], lin.bias.detach())


def _linear_names(module: nn.Module, kind: type) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, kind)}


def test_conversion_swaps_exactly_the_block_linears() -> None:
    torch.manual_seed(3)
    dit = WanDiT(TINY.dit)
    before = _linear_names(dit, nn.Linear)
    norms = {n: type(m) for n, m in dit.named_modules() if "norm" in n}
    convert_blocks(dit, range(TINY.dit.num_layers))
    swapped = _linear_names(dit, FP8Linear)
    assert swapped == {f"blocks.{i}.{n}" for i in range(TINY.dit.num_layers) for n in BLOCK_LINEARS}
    # everything else keeps its kind: the embeddings, the time projection, the head
    assert _linear_names(dit, nn.Linear) == before - swapped == {
        "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"}
    assert {n: type(m) for n, m in dit.named_modules() if "norm" in n} == norms
    assert isinstance(dit.patch_embedding, nn.Conv3d)
    sd = dit.state_dict()
    assert sd["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn
    assert sd["blocks.0.ffn.0.weight_scale"].shape == (1, TINY.dit.ffn_dim)
    assert sd["blocks.1.self_attn.q.bias"].dtype == torch.float32  # the bias keeps the model's dtype
    assert sd["head.head.weight"].dtype == torch.float32


def test_build_dit_converts_only_the_blocks_it_owns() -> None:
    dit = build_dit(TINY, None, torch.device("cpu"), torch.bfloat16, seed=0, blocks=[1], trunk=["head"], fp8=True)
    assert _linear_names(dit, FP8Linear) == {f"blocks.1.{n}" for n in BLOCK_LINEARS}
    assert isinstance(dit.blocks[0].ffn[0], nn.Linear) and dit.blocks[0].ffn[0].weight.is_meta
    assert dit.head.head.weight.dtype == torch.bfloat16


def _clip(dit: WanDiT, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    chunk_frames = [2, 1, 1]
    x = torch.randn(1, 16, sum(chunk_frames), 16, 16, generator=g)
    ctx = torch.randn(1, 32, TINY.dit.text_dim, generator=g)
    t = torch.tensor([[700, 700, 650, 600]])
    with torch.no_grad():
        return dit.forward_block_causal(x.to(dtype), t, ctx.to(dtype), chunk_frames, Rope(TINY.dit.head_dim)).float()


def test_a_tiny_dit_in_fp8_stays_near_float32() -> None:
    """The whole forward (every block's ten linears in FP8, the rest bf16) against float32 with the same
    weights: within 3 % relative error (seen: 0.9 %, bf16 alone 0.6 %), and above what bf16 alone costs."""
    torch.manual_seed(4)
    ref_dit = WanDiT(TINY.dit).eval()
    bf16_dit = copy.deepcopy(ref_dit).to(torch.bfloat16)
    fp8_dit = copy.deepcopy(bf16_dit)
    convert_blocks(fp8_dit, range(TINY.dit.num_layers))
    ref = _clip(ref_dit, torch.float32)
    err_bf16, err_fp8 = _rel(_clip(bf16_dit, torch.bfloat16), ref), _rel(_clip(fp8_dit, torch.bfloat16), ref)
    assert err_fp8 < 0.03, (err_fp8, err_bf16)
    assert err_fp8 > err_bf16  # it really ran the FP8 path


def test_block_moves_carry_fp8_weights_and_scales() -> None:
    """A rank gives an FP8 block away (Stage.export_layers -> the ring's packed payload -> import_layers on a
    rank that held it only on meta): the taker's block gives the giver's outputs exactly."""
    from engine.parallel.stage import Stage
    from engine.parallel.wire import pack, unpack

    cpu = torch.device("cpu")
    defaults = stream_defaults(TINY, EngineOptions())
    rope = Rope(TINY.dit.head_dim)
    giver_dit = build_dit(TINY, None, cpu, torch.bfloat16, seed=0, blocks=[0, 1], trunk=[], fp8=True)
    taker_dit = build_dit(TINY, None, cpu, torch.bfloat16, seed=0, blocks=[], trunk=[], fp8=True)
    x = torch.randn(1, 10, TINY.dit.dim, dtype=torch.bfloat16)
    want = giver_dit.blocks[1].ffn(x)
    giver = Stage(giver_dit, rope, defaults, cpu, torch.bfloat16, [0, 1], fp8=True)
    taker = Stage(taker_dit, rope, defaults, cpu, torch.bfloat16, [], fp8=True)
    entries, buf = pack(giver.export_layers([1]), cpu)
    assert any(e.dtype == "float8_e4m3fn" for e in entries)
    taker.import_layers([1], unpack(entries, buf))
    assert taker.layers == [1] and giver.layers == [0]
    assert _linear_names(taker_dit.blocks[1], FP8Linear) == set(BLOCK_LINEARS)
    assert torch.equal(taker_dit.blocks[1].ffn(x), want)
    assert giver_dit.blocks[1].ffn[0].weight.is_meta


def test_a_meta_block_converts_to_meta_fp8() -> None:
    with torch.device("meta"):
        dit = WanDiT(TINY.dit)
    convert_block(dit.blocks[0])
    q = dit.blocks[0].self_attn.q
    assert isinstance(q, FP8Linear) and q.weight.is_meta and q.weight.dtype == torch.float8_e4m3fn


# -- refusal at start-up ---------------------------------------------------------------------------------

def test_engine_options_take_fp8_and_nothing_else_new() -> None:
    assert EngineOptions(dtype="fp8").dtype == "fp8"
    with pytest.raises(ValueError):
        EngineOptions(dtype="int8")


@pytest.mark.parametrize("device", ["cpu", "cpu:2"])
def test_fp8_on_cpu_is_refused_before_anything_is_built(device: str) -> None:
    from engine.runtime import StreamEngine

    with pytest.raises(FP8Unavailable) as err:
        StreamEngine.create(EngineOptions(model="tiny", device=device, dtype="fp8"))
    assert str(err.value).startswith(REFUSAL) and "cpu" in str(err.value)


def test_a_gpu_without_fp8_tensor_cores_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    problem = fp8_device_problem(torch.device("cuda", 0))
    assert problem == f"{REFUSAL}; this device is NVIDIA A100-SXM4-80GB (compute capability 8.0)"
    for ok in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, ok=ok: ok)
        assert fp8_device_problem(torch.device("cuda", 0)) is None


def test_server_dtype_flag_reaches_the_engine_options() -> None:
    from engine.worker import engine_options
    from server.config import parse_args, worker_options

    options = worker_options(parse_args(["--dtype", "fp8"]))
    assert options.dtype == "fp8" and engine_options(options).dtype == "fp8"
    assert worker_options(parse_args([])).dtype is None  # the default stays the device's (bf16 on a GPU)
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "int8"])


def test_server_with_fp8_on_cpu_exits_with_one_clear_reason() -> None:
    r = subprocess.run([sys.executable, "-m", "server", "--dtype", "fp8", "--devices", "cpu", "--model", "tiny",
                        "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert REFUSAL in r.stderr.strip().splitlines()[-1]


def test_render_with_fp8_on_cpu_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    write_mp4(src, 5)
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.npz"), "--prompt", "x", "--quiet",
            "--devices", "cpu", "--dtype", "fp8")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and REFUSAL in lines[0], r.stderr
    assert not (tmp_path / "o.npz").exists()


# -- the GPU checks, run here on the tiny model ------------------------------------------------------------

def test_the_quality_script_runs_end_to_end_on_cpu_and_enforces_its_floor(capsys: pytest.CaptureFixture) -> None:
    from bench.fp8_quality import main

    argv = ["--rows", "p2", "--model", "tiny", "--device", "cpu", "--chunks", "3", "--size", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PSNR fp8|bf16" in out and "ffn.2" in out
    assert main([*argv, "--floor-db", "200"]) == 1  # no PSNR of an FP8 run reaches 200 dB
    assert "under the floor of 200 dB on: p2" in capsys.readouterr().out


def test_engine_bench_takes_a_dtype_list() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.engine_bench", "--rows", "p2", "--dtype", "bfloat16,int8"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dtype: unknown int8" in r.stderr
