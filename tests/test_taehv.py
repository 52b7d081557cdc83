"""The light TAEHV decoder: parity with the reference package, streaming state per stream, strict loading,
the engine/CLI/server wiring and its option checks. CPU, float32, small sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from engine.checkpoint import CheckpointError
from engine.runtime import EngineOptions, StreamEngine
from engine.taehv import TAEHV, load_taehv, random_taehv_state, write_taehv
from interface.controls import StreamParams
from tests.streams import push_interleaved

ROOT = Path(__file__).resolve().parent.parent
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def taehv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    write_taehv(path, seed=0)
    return path


@pytest.fixture(scope="module")
def ours(taehv_file: Path) -> TAEHV:
    return load_taehv(taehv_file).eval()


def latents(t: int, rows: int = 1, hw: tuple[int, int] = (4, 4), seed: int = 1) -> torch.Tensor:
    """Normalised Wan latents [rows, 16, t, h, w] (the DiT's x0 is roughly unit-variance)."""
    return torch.randn(rows, 16, t, *hw, generator=torch.Generator().manual_seed(seed))


def stream(model: TAEHV, z: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """Decode z chunk by chunk, cutting its latent frames at `cuts`; one state for the stream."""
    state = model.new_stream_state()
    edges = [0, *cuts, z.shape[2]]
    return [model.stream_decode(z[:, :, a:b], state) for a, b in zip(edges[:-1], edges[1:])]


# -- parity with the reference -------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [False, True])
def test_streaming_equals_reference_whole_clip(taehv_file, ours, parallel):
    """Chunk by chunk as a session decodes (first chunk 2 latents -> 5 frames, then 1 -> 4) equals the
    reference TAEHV decoding the whole clip at once, loaded from the same file.

    Ranges and layouts: the reference takes [N, T, C, h, w] and returns [N, 4T, 3, H, W] meant to be in
    [0, 1] (unclamped, untrimmed); ours takes [N, C, t, h, w] and returns [N, 3, 4t-3, H, W] in [-1, 1].
    So the reference's output is clamped to [0, 1], its first 3 frames dropped (the TAEHV project's
    frames_to_trim), mapped y -> 2y - 1 and moved to our layout before comparing."""
    ref_mod = pytest.importorskip("models.wan.taehv_wrapper", reason="reference package not installed")
    ref = ref_mod.TAEHV(checkpoint_path=str(taehv_file)).eval()
    z = latents(6, rows=2, hw=(6, 6))
    chunks = stream(ours, z, cuts=[2, 3, 4, 5])
    assert [c.shape[2] for c in chunks] == [5, 4, 4, 4, 4]
    got = torch.cat(chunks, 2)
    with torch.no_grad():
        want = ref.decode_video(z.transpose(1, 2), parallel=parallel, show_progress_bar=False)
    assert want.shape == (2, 24, 3, 48, 48)
    inside = ((want > 0) & (want < 1)).float().mean().item()
    assert inside > 0.8, "random weights should keep most outputs inside [0, 1], or the clamp hides differences"
    want = want.clamp(0, 1)[:, 3:].transpose(1, 2) * 2 - 1
    assert got.shape == want.shape == (2, 3, 21, 48, 48)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert got.min() >= -1 and got.max() <= 1


def test_whole_clip_decode_equals_streaming_latent_by_latent(ours):
    z = latents(4, hw=(4, 6))
    whole = ours.decode(z)
    assert whole.shape == (1, 3, 13, 32, 48)
    chunks = stream(ours, z, cuts=[1, 2, 3])
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    one_by_one = torch.cat(chunks, 2)
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-5)


def test_interleaved_streams_equal_each_alone(ours):
    """Each stream's MemBlock history lives in its own state: decoding two streams interleaved, chunk
    by chunk, gives exactly what each gives alone."""
    za, zb = latents(4, seed=2), latents(4, seed=3)
    alone_a, alone_b = stream(ours, za, cuts=[2, 3]), stream(ours, zb, cuts=[2, 3])
    sa, sb = ours.new_stream_state(), ours.new_stream_state()
    for i, (a, b) in enumerate([(0, 2), (2, 3), (3, 4)]):
        assert torch.equal(ours.stream_decode(za[:, :, a:b], sa), alone_a[i])
        assert torch.equal(ours.stream_decode(zb[:, :, a:b], sb), alone_b[i])
    sa.reset()
    assert torch.equal(ours.stream_decode(za[:, :, :2], sa), alone_a[0])  # a reset starts a new stream


def test_bad_latents_and_mismatched_state_are_rejected(ours):
    with pytest.raises(ValueError, match=r"latent must be \[B,16"):
        ours.stream_decode(torch.zeros(1, 12, 1, 8, 8), ours.new_stream_state())
    state = ours.new_stream_state()
    ours.stream_decode(latents(1), state)
    with pytest.raises(ValueError, match="a stream keeps its batch and size"):
        ours.stream_decode(latents(1, hw=(2, 2)), state)


# -- files ---------------------------------------------------------------------------------------------

def test_file_round_trip_and_decoder_only_files(tmp_path, ours, taehv_file):
    state = torch.load(taehv_file, weights_only=True)
    assert any(k.startswith("encoder.") for k in state) and "decoder.13.conv.weight" in state
    assert tuple(state["decoder.13.conv.weight"].shape) == (256, 128, 1, 1)  # TGrow(128, 2): 2 frames
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    # a file with the decoder only loads too, with the same decoder weights for the same seed
    write_taehv(tmp_path / "dec.pth", seed=0, with_encoder=False)
    dec_only = load_taehv(tmp_path / "dec.pth")
    assert all(torch.equal(a, b) for a, b in zip(dec_only.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("decoder.10.conv.2.weight"), "missing keys: decoder.10.conv.2.weight"),
    (lambda sd: sd.update({"decoder.23.weight": torch.zeros(3)}), "unexpected keys: decoder.23.weight"),
    (lambda sd: sd.pop("encoder.5.conv.4.bias"), "missing keys: encoder.5.conv.4.bias"),
    (lambda sd: sd.update({"decoder.19.conv.weight": torch.zeros(64, 64, 1, 1)}),
     r"shape mismatch: decoder.19.conv.weight \[64, 64, 1, 1\] != \[128, 64, 1, 1\]"),
])
def test_strict_loading_names_the_key(tmp_path, change, message):
    sd = random_taehv_state(seed=1)
    change(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message) as e:
        load_taehv(path)
    assert str(path) in str(e.value) and "TAEHV" in str(e.value)


def test_missing_or_unreadable_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="missing weights file.*nope.pth"):
        load_taehv(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_taehv(tmp_path / "junk.pth")


# -- engine, options, CLI, server -------------------------------------------------------------------------

def push_all(engine, frames: np.ndarray, seed: int = 1) -> list:
    s = engine.open_session("a cat", StreamParams(seed=seed))
    out = []
    for i in range(0, len(frames), 4):
        out += s.push(frames[i : i + 4], list(range(i, min(i + 4, len(frames)))))
    out += s.flush()
    s.close()
    return out


def video(n: int, seed: int = 0, h: int = 64, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w + 3 * n, 3), dtype=np.uint8)
    return np.stack([base[:, 3 * i : 3 * i + w] for i in range(n)])


@pytest.fixture(scope="module")
def taehv_engine(taehv_file) -> StreamEngine:
    return StreamEngine.create(EngineOptions(model="tiny", device="cpu", decoder="taehv", taehv_weights=taehv_file, **SIZE))


def test_engine_decodes_with_the_file_and_says_so(taehv_engine, ours):
    e = taehv_engine
    assert e.info.decoder == "taehv" and e.info.random_weights  # tiny: a random DiT, a real TAEHV file
    assert isinstance(e.decoder, TAEHV)
    assert all(torch.equal(a, b) for a, b in zip(e.decoder.state_dict().values(), ours.state_dict().values()))
    out = push_all(e, video(13))
    assert [p for _, p in out] == list(range(13))
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f, _ in out)


def test_sessions_interleaved_equal_each_alone(taehv_engine):
    fa, fb = video(13, seed=1), video(13, seed=2)
    alone_a, alone_b = push_all(taehv_engine, fa, seed=1), push_all(taehv_engine, fb, seed=2)
    a = taehv_engine.open_session("a cat", StreamParams(seed=1))
    b = taehv_engine.open_session("a cat", StreamParams(seed=2))
    out_a, out_b = push_interleaved([a, b], [fa, fb])
    assert len(out_a) == len(out_b) == 13
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(out_a, alone_a))
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(out_b, alone_b))


def test_random_taehv_for_random_models_is_seeded(caplog):
    with caplog.at_level("WARNING"):
        e1 = StreamEngine(*_tiny(seed=5))
    assert "TAEHV decoder with RANDOM WEIGHTS" in caplog.text
    e2 = StreamEngine(*_tiny(seed=5))
    e3 = StreamEngine(*_tiny(seed=6))
    sd1, sd2, sd3 = (list(e.decoder.state_dict().values()) for e in (e1, e2, e3))
    assert all(torch.equal(a, b) for a, b in zip(sd1, sd2))
    assert not torch.equal(sd1[0], sd3[0])


def _tiny(seed: int):
    from engine.config import load_model_config

    return load_model_config("tiny"), EngineOptions(model="tiny", device="cpu", decoder="taehv", seed=seed, **SIZE)


def test_option_errors(tmp_path, taehv_file):
    with pytest.raises(ValidationError, match="decoder taehv with real model weights needs taehv_weights"):
        EngineOptions(model="wan-1.3b", weights=tmp_path, decoder="taehv")
    with pytest.raises(ValidationError, match="taehv_weights is only used with decoder taehv"):
        EngineOptions(taehv_weights=taehv_file)
    with pytest.raises(ValidationError, match="decoder"):
        EngineOptions(decoder="tiny-vae")
    # fine: random model weights with a random TAEHV, or real files for both
    EngineOptions(model="wan-1.3b", decoder="taehv")
    EngineOptions(model="wan-1.3b", weights=tmp_path, decoder="taehv", taehv_weights=taehv_file)
    with pytest.raises(CheckpointError, match="missing weights file"):
        StreamEngine.create(EngineOptions(model="tiny", device="cpu", decoder="taehv", taehv_weights=tmp_path / "x.pth"))


def test_server_flags_reach_the_engine_options(tmp_path, taehv_file):
    from engine.worker import _create_engine
    from server.config import parse_args, worker_options

    options = worker_options(parse_args(["--model", "tiny", "--decoder", "taehv", "--taehv-weights", str(taehv_file)]))
    assert options.decoder == "taehv" and options.taehv_weights == str(taehv_file)
    engine = _create_engine(options.model_copy(update={"device": "cpu", **SIZE}))
    assert engine.info.decoder == "taehv"
    from interface.messages import EngineInfo

    assert EngineInfo.model_validate(engine.info.model_dump()).decoder == "taehv"
    for bad in (["--decoder", "taehv", "--weights", str(tmp_path)], ["--taehv-weights", str(taehv_file)],
                ["--decoder", "taehv", "--taehv-weights", str(tmp_path / "x.pth")], ["--decoder", "fast"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_renders_with_the_light_decoder(tmp_path, taehv_file):
    from tests.test_engine import write_mp4

    src = tmp_path / "in.mp4"
    write_mp4(src, 14)
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.npz"), "--prompt", "a cat", "--quiet",
            "--height", "64", "--width", "96", "--decoder", "taehv", "--taehv-weights", str(taehv_file),
            "--output-size", "model")
    assert r.returncode == 0, r.stderr
    assert "TAEHV decoder loaded" in r.stderr and "'decoder': 'taehv'" in r.stderr
    frames = np.load(tmp_path / "o.npz")["frames"]
    assert frames.shape == (14, 64, 96, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("args, message", [
    (["--decoder", "taehv", "--weights", "."], "--decoder taehv with real model weights needs --taehv-weights"),
    (["--encoder", "taehv", "--weights", "."], "--encoder taehv with real model weights needs --taehv-weights"),
    (["--taehv-weights", "FILE"], "--taehv-weights is only used with --decoder taehv or --encoder taehv"),
    (["--decoder", "taehv", "--taehv-weights", "/nonexistent.pth"], "no such file"),
    (["--decoder", "fast"], "invalid choice"),
    (["--encoder", "fast"], "invalid choice"),
])
def test_cli_codec_errors_one_line_exit_2(tmp_path, taehv_file, args, message):
    from tests.test_engine import write_mp4

    src = tmp_path / "in.mp4"
    write_mp4(src, 5)
    args = [str(taehv_file) if a == "FILE" else a for a in args]
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.npz"), "--prompt", "x", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_parallel_ranks_decode_with_taehv_like_one_process(taehv_file):
    """The last rank decodes with the chosen decoder: two CPU ranks give the in-process frames."""
    opts = dict(model="tiny", decoder="taehv", taehv_weights=taehv_file, height=32, width=32)
    frames = video(13, h=32, w=32)
    single = StreamEngine.create(EngineOptions(device="cpu", **opts))
    want = push_all(single, frames)
    with StreamEngine.create(EngineOptions(device="cpu:2", parallel=dict(rebalance=False), **opts)) as e:
        assert e.info.decoder == "taehv"
        got = push_all(e, frames)
    assert [p for _, p in got] == [p for _, p in want] == list(range(13))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, want))


def test_reference_wrapper_window_only_approximates_the_stream(taehv_file, ours):
    """Where we differ on purpose: the reference wrapper decodes each new latent with the 3 before it
    (TAEHVWanVAEWrapper.decode_context_latents) and keeps the last 4 frames. The window's first latent
    starts from empty memories, and the memories reach back more than 3 latents, so its frames differ
    from the whole-clip decode that our stream equals. With these random weights the gap is small
    (about 3e-3 in [-1, 1], a third of a uint8 step) but far above float noise (our stream: 0)."""
    ref_mod = pytest.importorskip("models.wan.taehv_wrapper", reason="reference package not installed")
    ref = ref_mod.TAEHV(checkpoint_path=str(taehv_file)).eval()
    z = latents(6, hw=(4, 4), seed=4)
    with torch.no_grad():
        window = ref.decode_video(z[:, :, 2:6].transpose(1, 2), parallel=True)[:, -4:]  # latent 5's frames
    windowed = window.clamp(0, 1).transpose(1, 2) * 2 - 1
    ours_last = torch.cat(stream(ours, z, cuts=[2, 3, 4, 5]), 2)[:, :, -4:]
    assert (ours_last - windowed).abs().max() > 1e-3
