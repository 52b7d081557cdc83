"""The light TAEHV encoder: parity with the reference package, streaming state per stream, the latent
convention the DiT gets, strict loading, and the --encoder wiring (engine, pipeline ranks, CLI, server).
CPU, float32, small sizes."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from engine.checkpoint import CheckpointError
from engine.runtime import EngineOptions, StreamEngine
from engine.taehv import TAEHV, load_taehv, write_taehv
from engine.vae import LATENT_MEAN, LATENT_STD, WanVAE
from interface.controls import StreamParams
from tests.streams import push_interleaved
from tests.test_taehv import push_all, taehv_file, video  # noqa: F401 (taehv_file: a fixture)

ROOT = Path(__file__).resolve().parent.parent
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def ours(taehv_file: Path) -> TAEHV:
    return load_taehv(taehv_file, encoder=True, decoder=False).eval()


def clip(t: int, rows: int = 1, hw: tuple[int, int] = (32, 48), seed: int = 1) -> torch.Tensor:
    """Frames [rows, 3, t, H, W] in [-1, 1]."""
    return torch.rand(rows, 3, t, *hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def stream(model: TAEHV, v: torch.Tensor, cuts: list[int], normalize: bool = True) -> list[torch.Tensor]:
    """Encode v chunk by chunk, cutting its frames at `cuts`; one state for the stream."""
    state = model.new_stream_state()
    edges = [0, *cuts, v.shape[2]]
    return [model.stream_encode(v[:, :, a:b], state, normalize) for a, b in zip(edges[:-1], edges[1:])]


# -- parity with the reference -------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [False, True])
def test_streaming_equals_reference_whole_clip(taehv_file, ours, parallel):
    """Chunk by chunk as a session encodes (frame 0 alone, then 4 frames, then 8) equals the reference
    TAEHV encoding the whole clip at once, loaded from the same file.

    The reference takes [N, T, 3, H, W] in [0, 1] and pools frames 4 by 4 from the first; ours takes
    [N, 3, T, H, W] in [-1, 1] and gives frame 0 a group of its own, [f0, f0, f0, f0] (Wan's latent 0
    is frame 0 alone). So the reference gets the clip with 3 copies of frame 0 in front, in [0, 1]."""
    ref_mod = pytest.importorskip("models.wan.taehv_wrapper", reason="reference package not installed")
    ref = ref_mod.TAEHV(checkpoint_path=str(taehv_file)).eval()
    v = clip(13, rows=2)
    chunks = stream(ours, v, cuts=[1, 5])
    assert [c.shape[2] for c in chunks] == [1, 1, 2]
    got = torch.cat(chunks, 2)
    padded = torch.cat([v[:, :, :1].expand(-1, -1, 3, -1, -1), v], 2)
    with torch.no_grad():
        want = ref.encode_video(((padded + 1) / 2).transpose(1, 2), parallel=parallel).transpose(1, 2)
    assert got.shape == want.shape == (2, 16, 4, 4, 6)
    assert want.std() > 0.05, "random weights should give latents that vary, or the comparison shows little"
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel
    assert got.dtype == torch.float32 and got.is_contiguous()


def test_reference_end_padding_would_shift_the_frames(taehv_file, ours):
    """Where we differ on purpose: the TAEHV project pools a video's frames from frame 0 (f0..f3 -> latent
    0) and pads its end. That groups frames 3 later than Wan does, so its latents differ from ours."""
    ref_mod = pytest.importorskip("models.wan.taehv_wrapper", reason="reference package not installed")
    ref = ref_mod.TAEHV(checkpoint_path=str(taehv_file)).eval()
    v = clip(13, seed=5)
    padded_end = torch.cat([v, v[:, :, -1:].expand(-1, -1, 3, -1, -1)], 2)
    with torch.no_grad():
        theirs = ref.encode_video(((padded_end + 1) / 2).transpose(1, 2)).transpose(1, 2)
    assert theirs.shape == (1, 16, 4, 4, 6)
    assert (ours.encode(v, normalize=True) - theirs).abs().max() > 1e-2


def test_raw_output_is_the_normalised_latent_mapped_back(ours):
    """The engine's convention (WanVAE.stream_encode: raw mean, which the DiT is fed): TAEHV's normalised
    latent z becomes z·std + mean per channel."""
    v = clip(5, seed=2)
    z = ours.encode(v, normalize=True)
    raw = ours.encode(v)
    for c in range(16):
        torch.testing.assert_close(raw[:, c], z[:, c] * LATENT_STD[c] + LATENT_MEAN[c], rtol=1e-5, atol=1e-5)


def test_whole_clip_encode_equals_streaming_group_by_group(ours):
    v = clip(17, hw=(32, 32), seed=3)
    whole = ours.encode(v)
    assert whole.shape == (1, 16, 5, 4, 4)
    one_by_one = torch.cat(stream(ours, v, cuts=[1, 5, 9, 13], normalize=False), 2)
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-5)


def test_frames_given_ahead_are_encoded_with_the_rest_of_their_chunk(ours):
    """The light encoder keeps frames given ahead (the Wan VAE's contract) and encodes them with the
    chunk's last frames: the same latents as the chunk given whole."""
    v = clip(9, hw=(32, 32), seed=5)
    whole = ours.encode(v)
    s = ours.new_stream_state()
    with pytest.raises(ValueError, match="frame 0 is encoded alone"):
        ours.stream_encode_ahead(v[:, :, 1:2], s)
    outs = [ours.stream_encode(v[:, :, :1], s)]
    ours.stream_encode_ahead(v[:, :, 1:2], s)
    ours.stream_encode_ahead(v[:, :, 2:4], s)
    with pytest.raises(ValueError, match="at most 3 frames"):
        ours.stream_encode_ahead(v[:, :, 4:5], s)
    outs.append(ours.stream_encode(v[:, :, 4:5], s))
    outs.append(ours.stream_encode(v[:, :, 5:9], s))
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-5, atol=1e-5)


def test_interleaved_streams_equal_each_alone(ours):
    """Each stream's MemBlock history lives in its own state."""
    va, vb = clip(9, seed=4), clip(9, seed=6)
    alone_a, alone_b = stream(ours, va, cuts=[1, 5]), stream(ours, vb, cuts=[1, 5])
    sa, sb = ours.new_stream_state(), ours.new_stream_state()
    for i, (a, b) in enumerate([(0, 1), (1, 5), (5, 9)]):
        assert torch.equal(ours.stream_encode(va[:, :, a:b], sa, True), alone_a[i])
        assert torch.equal(ours.stream_encode(vb[:, :, a:b], sb, True), alone_b[i])
    sa.reset()
    assert torch.equal(ours.stream_encode(va[:, :, :1], sa, True), alone_a[0])  # a reset starts a new stream


def test_bad_frames_are_rejected(ours):
    with pytest.raises(ValueError, match="first stream_encode call needs 1\\+4k frames, got 4"):
        ours.stream_encode(clip(4), ours.new_stream_state())
    state = ours.new_stream_state()
    ours.stream_encode(clip(1), state)
    with pytest.raises(ValueError, match="needs 4k frames after the first call, got 5"):
        ours.stream_encode(clip(5), state)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.stream_encode(clip(1, hw=(30, 32)), ours.new_stream_state())
    with pytest.raises(ValueError, match=r"video must be \[B,3"):
        ours.stream_encode(torch.zeros(1, 4, 1, 32, 32), ours.new_stream_state())
    with pytest.raises(ValueError, match="a stream keeps its batch and size"):
        ours.stream_encode(clip(4, hw=(16, 16)), state)
    decoder_only = TAEHV()
    with pytest.raises(ValueError, match="without its encoder"):
        decoder_only.stream_encode(clip(1), decoder_only.new_stream_state())


# -- files ---------------------------------------------------------------------------------------------

def test_encoder_loads_from_the_file_and_needs_one(tmp_path, taehv_file, ours):
    state = torch.load(taehv_file, weights_only=True)
    assert not hasattr(ours, "decoder")
    assert all(torch.equal(v, state["encoder." + k]) for k, v in ours.encoder.state_dict().items())
    write_taehv(tmp_path / "dec.pth", seed=0, with_encoder=False)
    with pytest.raises(CheckpointError, match="holds the TAEHV decoder only"):
        load_taehv(tmp_path / "dec.pth", encoder=True)
    both = load_taehv(taehv_file, encoder=True, decoder=True)
    assert torch.equal(both.encoder[0].weight, ours.encoder[0].weight) and both.has_decoder


# -- engine, options, CLI, server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def light_engine(taehv_file) -> StreamEngine:
    return StreamEngine.create(EngineOptions(model="tiny", device="cpu", encoder="taehv", decoder="taehv",
                                             taehv_weights=taehv_file, **SIZE))


def test_engine_encodes_with_the_file_and_feeds_the_dit_its_latents(light_engine, ours, monkeypatch):
    """Both sides light: no Wan VAE is built; the session's latents (frame 0 alone, then 4 frames a
    call) are the whole clip's TAEHV encoding in the raw convention."""
    e = light_engine
    assert e.info.encoder == "taehv" and e.info.decoder == "taehv"
    assert e.vae is None and e.encoder is e.decoder and isinstance(e.encoder, TAEHV)
    assert torch.equal(e.encoder.encoder[0].weight, ours.encoder[0].weight)
    seen: list[torch.Tensor] = []
    real = type(e.encoder).stream_encode

    def spy(self, video, state, normalize=False):
        out = real(self, video, state, normalize)
        seen.append(out)
        return out

    monkeypatch.setattr(type(e.encoder), "stream_encode", spy)
    frames = video(13)
    out = push_all(e, frames)
    assert [p for _, p in out] == list(range(13))
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f, _ in out)
    got = torch.cat(seen, 2)
    whole = ours.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    assert got.shape == whole.shape == (1, 16, 4, 8, 8)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


def test_encoder_and_decoder_are_chosen_independently(taehv_file):
    frames = video(9, h=32, w=32, seed=3)
    base = dict(model="tiny", device="cpu", height=32, width=32)
    wan = StreamEngine.create(EngineOptions(**base))
    light_in = StreamEngine.create(EngineOptions(encoder="taehv", taehv_weights=taehv_file, **base))
    assert isinstance(light_in.encoder, TAEHV) and isinstance(light_in.decoder, WanVAE)
    assert light_in.decoder is light_in.vae and not light_in.encoder.has_decoder
    assert (light_in.info.encoder, light_in.info.decoder) == ("taehv", "wan")
    a, b = push_all(wan, frames), push_all(light_in, frames)
    assert len(a) == len(b) == 9
    assert any(not np.array_equal(x, y) for (x, _), (y, _) in zip(a, b)), "the encoder choice changed nothing"


def test_sessions_interleaved_equal_each_alone(light_engine):
    fa, fb = video(9, seed=1), video(9, seed=2)
    alone_a, alone_b = push_all(light_engine, fa, seed=1), push_all(light_engine, fb, seed=2)
    a = light_engine.open_session("a cat", StreamParams(seed=1))
    b = light_engine.open_session("a cat", StreamParams(seed=2))
    out_a, out_b = push_interleaved([a, b], [fa, fb])
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(out_a, alone_a))
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(out_b, alone_b))


def test_random_taehv_encoder_for_random_models_is_seeded(caplog):
    opts = dict(model="tiny", device="cpu", encoder="taehv", height=32, width=32)
    with caplog.at_level("WARNING"):
        e1 = StreamEngine.create(EngineOptions(seed=5, **opts))
    assert "TAEHV encoder with RANDOM WEIGHTS" in caplog.text
    e2 = StreamEngine.create(EngineOptions(seed=5, **opts))
    e3 = StreamEngine.create(EngineOptions(seed=6, **opts))
    assert torch.equal(e1.encoder.encoder[0].weight, e2.encoder.encoder[0].weight)
    assert not torch.equal(e1.encoder.encoder[0].weight, e3.encoder.encoder[0].weight)
    # one process with both sides light draws the same encoder weights as one with the encoder only
    both = StreamEngine.create(EngineOptions(seed=5, decoder="taehv", **opts))
    assert torch.equal(both.encoder.encoder[5].conv[0].weight, e1.encoder.encoder[5].conv[0].weight)


def test_option_errors(tmp_path, taehv_file):
    with pytest.raises(ValidationError, match="encoder taehv with real model weights needs taehv_weights"):
        EngineOptions(model="wan-1.3b", weights=tmp_path, encoder="taehv")
    with pytest.raises(ValidationError, match="decoder taehv and encoder taehv with real model weights needs"):
        EngineOptions(model="wan-1.3b", weights=tmp_path, encoder="taehv", decoder="taehv")
    with pytest.raises(ValidationError, match="taehv_weights is only used with decoder taehv or encoder taehv"):
        EngineOptions(taehv_weights=taehv_file)
    with pytest.raises(ValidationError, match="encoder"):
        EngineOptions(encoder="tiny-vae")
    EngineOptions(model="wan-1.3b", weights=tmp_path, encoder="taehv", taehv_weights=taehv_file)


def test_server_flags_reach_the_engine_options(tmp_path, taehv_file):
    from engine.worker import engine_options
    from interface.messages import EngineInfo
    from server.config import parse_args, worker_options

    options = worker_options(parse_args(["--model", "tiny", "--encoder", "taehv", "--taehv-weights", str(taehv_file)]))
    assert options.encoder == "taehv" and options.decoder == "wan" and options.taehv_weights == str(taehv_file)
    assert engine_options(options).encoder == "taehv"
    assert EngineInfo.model_validate({**EngineInfo(model="tiny", height=16, width=16, steps=1, random_weights=True,
                                                   device="cpu", dtype="float32", attention="sdpa", max_chunk_frames=5,
                                                   chunk_frames=4, stage_stats=("dit_ms",)).model_dump(),
                                      "encoder": "taehv"}).encoder == "taehv"
    for bad in (["--encoder", "taehv", "--weights", str(tmp_path)], ["--encoder", "fast"],
                ["--encoder", "taehv", "--taehv-weights", str(tmp_path / "x.pth")]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_server_reports_the_encoder(tmp_path, taehv_file):
    """A real server (tiny, CPU) with --encoder taehv --decoder lightvae: /api/info, /metrics, the log and
    the page's badge name both."""
    from tests.conftest import run_server
    from tests.test_browser import CHROMIUM

    with run_server(tmp_path, "--encoder", "taehv", "--taehv-weights", str(taehv_file), "--decoder", "lightvae") as server:
        engine = server.get("/api/info")["engine"]
        assert engine["encoder"] == "taehv" and engine["decoder"] == "lightvae"
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        line = next(x for x in metrics.splitlines() if x.startswith("streamgen_engine_info{"))
        assert 'encoder="taehv"' in line and 'decoder="lightvae"' in line
        log = server.log.read_text()
        assert "light TAEHV encoder, LightVAE decoder" in log and "TAEHV encoder loaded from" in log
        if not Path(CHROMIUM).exists():
            pytest.skip("chromium is not installed (apt-get install chromium): the badge is not checked")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('engine-badge').textContent.includes('tiny')",
                                       timeout=30_000)
                badge = page.inner_text("#engine-badge")
            finally:
                browser.close()
        assert "light encoder (TAEHV)" in badge and "light decoder (LightVAE)" in badge, badge


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_renders_with_the_light_encoder(tmp_path, taehv_file):
    from tests.test_engine import write_mp4

    src = tmp_path / "in.mp4"
    write_mp4(src, 10)
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.npz"), "--prompt", "a cat", "--quiet",
            "--height", "64", "--width", "96", "--output-size", "model", "--encoder", "taehv", "--taehv-weights", str(taehv_file))
    assert r.returncode == 0, r.stderr
    assert "TAEHV encoder loaded" in r.stderr and "'encoder': 'taehv'" in r.stderr
    frames = np.load(tmp_path / "o.npz")["frames"]
    assert frames.shape == (10, 64, 96, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("decoder", ["wan", "taehv"])
def test_parallel_ranks_encode_with_taehv_like_one_process(taehv_file, decoder):
    """Rank 0 encodes with the chosen encoder (and builds no Wan VAE when nothing on it needs one): two
    CPU ranks give the in-process frames."""
    opts = dict(model="tiny", encoder="taehv", decoder=decoder, taehv_weights=taehv_file, height=32, width=32)
    frames = video(13, h=32, w=32)
    single = StreamEngine.create(EngineOptions(device="cpu", **opts))
    want = push_all(single, frames)
    with StreamEngine.create(EngineOptions(device="cpu:2", parallel=dict(rebalance=False), **opts)) as e:
        assert e.info.encoder == "taehv" and e.info.decoder == decoder
        got = push_all(e, frames)
    assert [p for _, p in got] == [p for _, p in want] == list(range(13))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, want))
