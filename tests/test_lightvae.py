"""LightVAE (lightvaew2_1.pth): the Wan VAE with 75 % of every width pruned. Its file format checked
against the reference Wan VAE built at those widths, strict loading, and the --encoder/--decoder lightvae
wiring (engine, pipeline ranks, CLI, options). CPU, float32, small sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from engine.checkpoint import CheckpointError
from engine.config import VAEConfig, lightvae_config, load_model_config
from interface.catalogue import ConfigError
from engine.build import build_lightvae
from engine.runtime import EngineOptions, StreamEngine
from engine.vae import WanVAE
from tests.test_taehv import push_all, video
from tests.test_vae import _randomize, _ref_kwargs, _ref_module, _rel, _scale

ROOT = Path(__file__).resolve().parent.parent


def test_widths_are_a_quarter_of_the_wan_vae():
    """The publishers' code scales every width of the Wan VAE (base 96, mult 1,2,4,4) by 1 - 0.75 and
    loads the file into that with the Wan VAE's keys: base width 24, so these shapes."""
    light = lightvae_config(load_model_config("wan-1.3b").vae)
    assert light.dim == 24 and light.dim_mult == (1, 2, 4, 4) and light.z_dim == 16
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(light).state_dict().items()}
    assert shapes["encoder.conv1.weight"] == (24, 3, 3, 3, 3)
    assert shapes["encoder.head.2.weight"] == (32, 96, 3, 3, 3)  # 96 = 24·4, z·2 out
    assert shapes["decoder.conv1.weight"] == (96, 16, 3, 3, 3)
    assert shapes["decoder.head.2.weight"] == (3, 24, 3, 3, 3)
    assert len(shapes) == len(WanVAE(VAEConfig(dim=8)).state_dict())  # the Wan VAE's keys, no more, no fewer
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        lightvae_config(VAEConfig(dim=10))


@pytest.fixture(scope="module")
def light_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A lightvaew2_1.pth-format file: the reference Wan VAE built at a quarter of the 1.3B widths, with
    random weights, its state dict saved as is (the publishers load the file straight into that)."""
    ref = _ref_module().WanVAE_(**_ref_kwargs(lightvae_config(VAEConfig()))).eval()
    _randomize(ref, seed=7)
    path = tmp_path_factory.mktemp("lightvae") / "lightvaew2_1.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


def test_file_loads_and_matches_the_reference_stream(light_file):
    """Our loader reads the file strictly; streamed encode (5, 4 frames) and decode (2, 1 latents) equal
    the reference Wan VAE code at the LightVAE widths, with the Wan VAE's latent statistics."""
    path, ref = light_file
    cfg = load_model_config("wan-1.3b")
    ours = build_lightvae(cfg, path, torch.device("cpu"), torch.float32, seed=0).eval()
    assert ours.encoder.conv1.weight.shape[0] == 24
    v = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        state = ours.new_stream_state()
        for lo, hi in ((0, 5), (5, 9)):
            want = ref.stream_encode(v[:, :, lo:hi], None)  # raw mean, the engine's convention
            assert _rel(ours.stream_encode(v[:, :, lo:hi], state), want) <= 1e-3
        state = ours.new_stream_state()
        for lo, hi in ((0, 2), (2, 3)):
            want = ref.stream_decode(z[:, :, lo:hi], _scale()).clamp(-1, 1)
            got = ours.stream_decode(z[:, :, lo:hi], state)
            assert got.shape == want.shape and _rel(got, want) <= 1e-3


def test_wrong_file_is_named(tmp_path, light_file):
    cfg = load_model_config("wan-1.3b")
    wide = WanVAE(VAEConfig(dim=32))  # a Wan VAE of another width: every conv's shape differs
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"LightVAE, base width 24\) does not match.*shape mismatch: decoder"):
        build_lightvae(cfg, tmp_path / "wide.pth", torch.device("cpu"), torch.float32, seed=0)
    sd = torch.load(light_file[0], weights_only=True)
    sd.pop("encoder.conv1.bias")
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="missing keys: encoder.conv1.bias"):
        build_lightvae(cfg, tmp_path / "cut.pth", torch.device("cpu"), torch.float32, seed=0)


# -- engine, options, CLI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_light_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LightVAE file for `tiny` (its Wan VAE is base width 4, so its LightVAE is width 1)."""
    vae = WanVAE(lightvae_config(load_model_config("tiny").vae))
    _randomize(vae, seed=9)
    path = tmp_path_factory.mktemp("lightvae_tiny") / "lightvaew2_1.pth"
    torch.save(vae.state_dict(), path)
    return path


def test_engine_streams_with_the_file_on_both_sides(tiny_light_file):
    e = StreamEngine.create(EngineOptions(model="tiny", device="cpu", encoder="lightvae", decoder="lightvae",
                                          lightvae_weights=tiny_light_file, height=32, width=32))
    assert (e.info.encoder, e.info.decoder) == ("lightvae", "lightvae")
    assert e.vae is None and e.encoder is e.decoder and isinstance(e.encoder, WanVAE)
    file = torch.load(tiny_light_file, weights_only=True)
    assert all(torch.equal(v, file[k]) for k, v in e.encoder.state_dict().items())
    out = push_all(e, video(9, h=32, w=32))
    assert [p for _, p in out] == list(range(9)) and all(f.shape == (32, 32, 3) for f, _ in out)


def test_random_lightvae_is_seeded_and_says_so(caplog):
    opts = dict(model="tiny", device="cpu", decoder="lightvae", height=32, width=32)
    with caplog.at_level("WARNING"):
        a = StreamEngine.create(EngineOptions(seed=1, **opts))
    assert "LightVAE with RANDOM WEIGHTS" in caplog.text
    b = StreamEngine.create(EngineOptions(seed=1, **opts))
    c = StreamEngine.create(EngineOptions(seed=2, **opts))
    wa, wb, wc = (x.decoder.decoder.conv1.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.encoder is a.vae and a.decoder is not a.vae  # Wan VAE in, LightVAE out


def test_option_errors(tmp_path, tiny_light_file):
    with pytest.raises(ValidationError, match="decoder lightvae with real model weights needs lightvae_weights"):
        EngineOptions(model="wan-1.3b", weights=tmp_path, decoder="lightvae")
    with pytest.raises(ValidationError, match="lightvae_weights is only used with decoder lightvae or encoder lightvae"):
        EngineOptions(lightvae_weights=tiny_light_file, decoder="taehv")
    EngineOptions(model="wan-1.3b", weights=tmp_path, encoder="lightvae", lightvae_weights=tiny_light_file)


def test_server_flags_reach_the_engine_options(tmp_path, tiny_light_file):
    from engine.worker import engine_options
    from server.config import parse_args, worker_options

    options = worker_options(parse_args(["--model", "tiny", "--decoder", "lightvae", "--lightvae-weights",
                                         str(tiny_light_file)]))
    assert options.decoder == "lightvae" and options.lightvae_weights == str(tiny_light_file)
    assert engine_options(options).lightvae_weights == tiny_light_file
    for bad in (["--encoder", "lightvae", "--weights", str(tmp_path)], ["--lightvae-weights", str(tiny_light_file)],
                ["--decoder", "lightvae", "--lightvae-weights", str(tmp_path / "x.pth")]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_cli_renders_with_lightvae_and_names_errors(tmp_path, tiny_light_file):
    from tests.test_engine import write_mp4

    src = tmp_path / "in.mp4"
    write_mp4(src, 6)
    run = [sys.executable, "-m", "engine", "render", "--input", str(src), "--output", str(tmp_path / "o.npz"),
           "--prompt", "a cat", "--quiet", "--height", "32", "--width", "32", "--output-size", "model"]
    r = subprocess.run([*run, "--encoder", "lightvae", "--lightvae-weights", str(tiny_light_file)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "LightVAE loaded from" in r.stderr and "'encoder': 'lightvae'" in r.stderr
    assert np.load(tmp_path / "o.npz")["frames"].shape == (6, 32, 32, 3)
    r = subprocess.run([*run, "--decoder", "lightvae", "--weights", "."], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert "--decoder lightvae with real model weights needs --lightvae-weights" in lines[0]


def test_parallel_ranks_with_lightvae_like_one_process(tiny_light_file):
    """Rank 0 encodes with LightVAE, the last rank decodes with TAEHV: two CPU ranks give the in-process
    frames."""
    opts = dict(model="tiny", encoder="lightvae", decoder="taehv", lightvae_weights=tiny_light_file, height=32,
                width=32)
    frames = video(9, h=32, w=32)
    want = push_all(StreamEngine.create(EngineOptions(device="cpu", **opts)), frames)
    with StreamEngine.create(EngineOptions(device="cpu:2", parallel=dict(rebalance=False), **opts)) as e:
        assert (e.info.encoder, e.info.decoder) == ("lightvae", "taehv")
        got = push_all(e, frames)
    assert [p for _, p in got] == [p for _, p in want] == list(range(9))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, want))
