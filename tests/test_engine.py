"""The engine as a user drives it: loaders, sessions, live updates, the noise controller, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError, load_into, read_causal_dit, write_causal_dit
from engine.config import load_model_config
from engine.dit import WanDiT
from engine.noise_control import NoiseController
from engine.runtime import EngineOptions, StreamEngine
from interface.catalogue import ConfigError
from interface.controls import StreamParams, StreamUpdate
from tests.streams import HeldCopies, push_interleaved
from tests.weights_fixture import write_small_weights

ROOT = Path(__file__).resolve().parent.parent


def video(n: int, h: int = 128, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w + 3 * n, 3), dtype=np.uint8)
    return np.stack([base[:, 3 * i : 3 * i + w] for i in range(n)])


@pytest.fixture(scope="module")
def tiny() -> StreamEngine:
    return StreamEngine.create(EngineOptions(model="tiny", device="cpu"))


# -- configs ------------------------------------------------------------------------------------------

def test_configs_load_and_bad_values_name_field_and_file(tmp_path):
    assert load_model_config("wan-1.3b").dit.num_layers == 30
    assert load_model_config("wan-14b").dit.head_dim == 128
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/models/tiny.yaml").read_text().replace("num_heads: 2", "num_heads: 3", 1))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*dit.*divisible"):
        load_model_config(bad)
    bad.write_text((ROOT / "configs/models/tiny.yaml").read_text().replace("height: 128", "height: 120"))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*stream.*multiples of 16"):
        load_model_config(bad)
    with pytest.raises(ConfigError, match="unknown model 'wan-7b'"):
        load_model_config("wan-7b")


# -- loaders ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapper", ["generator", "generator_ema", "state_dict", None])
@pytest.mark.parametrize("prefix", [True, False])
def test_causal_checkpoint_layouts_load(tmp_path, wrapper, prefix):
    cfg = load_model_config("tiny").dit
    src = WanDiT(cfg)
    path = tmp_path / "model.pt"
    write_causal_dit(path, src.state_dict(), wrapper=wrapper, prefix=prefix)
    dst = WanDiT(cfg)
    load_into(dst, read_causal_dit(path), str(path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    cfg = load_model_config("tiny").dit
    sd = WanDiT(cfg).state_dict()
    path = tmp_path / "model.pt"
    broken = dict(sd)
    del broken["blocks.1.self_attn.q.weight"]
    broken["blocks.9.extra"] = torch.zeros(1)
    broken["head.head.weight"] = torch.zeros(3, 3)
    write_causal_dit(path, broken)
    with pytest.raises(CheckpointError) as e:
        load_into(WanDiT(cfg), read_causal_dit(path), str(path))
    msg = str(e.value)
    assert "missing keys: blocks.1.self_attn.q.weight" in msg
    assert "unexpected keys: blocks.9.extra" in msg
    assert "head.head.weight [3, 3]" in msg
    path.write_bytes(path.read_bytes()[:2000])  # truncated download
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_causal_dit(path)


def test_engine_loads_real_layout_and_streams(tmp_path):
    cfg_path, states = write_small_weights(tmp_path)
    e = StreamEngine.create(EngineOptions(model=str(cfg_path), weights=tmp_path, device="cpu"))
    assert not e.info.random_weights
    assert torch.equal(e.dit.state_dict()["blocks.0.self_attn.q.weight"], states["dit"]["blocks.0.self_attn.q.weight"])
    assert all(torch.equal(e.vae.state_dict()[k], v) for k, v in states["vae"].items())
    assert all(torch.equal(e.text.encoder.state_dict()[k], v) for k, v in states["t5"].items())
    s = e.open_session("a red fox jumps on the moon")
    out = s.push(video(13, 64, 64), list(range(13))) + s.flush()
    assert [p for _, p in out] == list(range(13))
    # each missing file is named
    (tmp_path / "wan_causal_dmd_v2v" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="wan_causal_dmd_v2v/model.pt"):
        StreamEngine.create(EngineOptions(model=str(cfg_path), weights=tmp_path, device="cpu"))
    other = tmp_path / "other"
    other.mkdir()
    cfg_path, _ = write_small_weights(other)
    (other / "Wan2.1-T2V-small" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        StreamEngine.create(EngineOptions(model=str(cfg_path), weights=other, device="cpu"))


# -- sessions -----------------------------------------------------------------------------------------

def run(engine: StreamEngine, frames: np.ndarray, prompt: str, seed: int, step: int = 4, **kw):
    s = engine.open_session(prompt, StreamParams(seed=seed, **kw))
    out = []
    for i in range(0, len(frames), step):
        out += s.push(frames[i : i + step], list(range(i, min(i + step, len(frames)))))
    return s, out + s.flush()


def test_every_frame_comes_out_once_in_order_with_its_pts(tiny):
    frames = video(23)
    s, out = run(tiny, frames, "a cat", 1, step=3)
    assert [p for _, p in out] == list(range(23))
    assert all(f.shape == (128, 128, 3) and f.dtype == np.uint8 for f, _ in out)
    assert s.chunk_frames == 4


def test_two_sessions_interleaved_equal_each_alone(tiny):
    a_frames, b_frames = video(21, seed=1), video(21, seed=2)
    _, a_alone = run(tiny, a_frames, "a cat", 1)
    _, b_alone = run(tiny, b_frames, "a dog", 2, steps=1)
    a = tiny.open_session("a cat", StreamParams(seed=1))
    b = tiny.open_session("a dog", StreamParams(seed=2, steps=1))
    a_out, b_out = push_interleaved([a, b], [a_frames, b_frames])
    assert len(a_out) == len(a_alone) == 21
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a_out, a_alone))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(b_out, b_alone))
    assert not np.array_equal(a_out[-1][0], b_out[-1][0])


def test_prompt_change_blends_cross_attention_without_restart(tiny):
    frames = video(29)
    s = tiny.open_session("a cat", StreamParams(seed=3, transition_chunks=2))
    s.push(frames[:9], list(range(9)))
    state = tiny.core.stage.sessions[s.sid]  # what the stage keeps of the session: KV cache, prompt K/V
    cache_before = state.cache.k[0].clone()
    old_kv, new_kv = (tiny.dit.cross_kv(tiny.embed_prompt(p)) for p in ("a cat", "a dog"))
    s.update(StreamUpdate(prompt="a dog"))
    used = []
    tick = state.prompt.tick
    state.prompt.tick = lambda: (tick(), used.append(dict(state.prompt.cur)))  # type: ignore[method-assign]
    out = s.push(frames[9:21], list(range(9, 21)))
    assert [p for _, p in out] == list(range(5, 17))  # the stream went on: no restart, no lost frames
    assert state.cache.filled[0] > 3 and not torch.equal(state.cache.k[0][:, :16], torch.zeros_like(state.cache.k[0][:, :16]))
    k0 = lambda kv: kv[0][0]  # noqa: E731  block 0's cross-attention keys
    # chunk 1 and 2 of the transition are blends strictly between the prompts; chunk 3 is the new prompt
    for kv, a in zip(used, [1 / 3, 2 / 3]):
        assert torch.allclose(k0(kv), k0(old_kv).lerp(k0(new_kv), a), atol=1e-6)
    assert torch.equal(k0(used[2]), k0(new_kv))
    assert cache_before.shape == state.cache.k[0].shape


@pytest.mark.parametrize("steps", [2, 3])
def test_a_reset_finishes_the_chunks_in_flight_first(tiny, steps):
    """With several steps a chunk leaves forwards after it entered; a reset lets those in flight leave
    (they are the old stream's frames) before the new stream starts: no frame is lost."""
    frames = video(17)
    s = tiny.open_session("a cat", StreamParams(seed=1, steps=steps))
    out = s.push(frames[:9], list(range(9)))
    s.update(StreamUpdate(reset=True))
    out += s.push(frames[9:17], list(range(9, 17))) + s.flush()
    assert [p for _, p in out] == list(range(17))


def test_steps_change_and_reset_lose_no_frame(tiny):
    frames = video(33)
    s = tiny.open_session("a cat", StreamParams(seed=0, steps=2))
    out = s.push(frames[:13], list(range(13)))
    s.update(StreamUpdate(steps=1))
    out += s.push(frames[13:21], list(range(13, 21)))
    assert tiny.core.drivers[s.sid][0].steps == [700]  # the session's schedule
    s.update(StreamUpdate(reset=True))
    out += s.push(frames[21:33], list(range(21, 33))) + s.flush()
    pts = [p for _, p in out]
    assert pts[:21] == list(range(21))  # nothing lost across the steps change
    assert pts[-12:] == list(range(21, 33))  # after a reset the stream restarts at a 5-frame chunk


def test_frame_zero_is_encoded_on_arrival_and_leaves_first(tiny):
    """A fresh stream takes frame 0 alone and encodes it on arrival (its encode overlaps the wait for
    frames 1-4); the push that completes the first chunk gives frames 0-4 (on CUDA frame 0 leaves alone,
    ahead of the rest: see the test below). The frames are those of a session fed all at once."""
    frames = video(13, seed=3)
    _, whole = run(tiny, frames, "a cat", 7, step=13)
    s = tiny.open_session("a cat", StreamParams(seed=7))
    assert s.chunk_frames == 1
    assert s.push(frames[:1], [0]) == [] and s.chunk_frames == 4
    assert tiny.core.drivers[s.sid][0].frame0 is not None  # its latent waits for frames 1-4
    early: list = []
    rest = s.push(frames[1:5], [1, 2, 3, 4], early=early.extend)
    got = early + rest
    assert [p for _, p in got] == [0, 1, 2, 3, 4]
    got += s.push(frames[5:13], list(range(5, 13))) + s.flush()
    assert [p for _, p in got] == list(range(13))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, whole))


def test_frames_pushed_one_at_a_time_are_encoded_before_their_chunk_is_whole(tiny, monkeypatch):
    """A push of fewer frames than complete a chunk (the server pushes each camera frame as it comes)
    hands them to the core at once: their encode through the VAE's per-frame blocks runs then, and the
    push that completes the chunk runs only the rest. The frames are those of chunks pushed whole (to
    float rounding: a conv over one frame or four may round differently), with every pts, in order; the
    chunk's encode time counts the work done ahead."""
    frames = video(17, seed=4)
    _, whole = run(tiny, frames, "a cat", 3, step=4)
    core = tiny.core
    ahead_calls: list[int] = []
    real = core.encoder.stream_encode_ahead
    monkeypatch.setattr(core.encoder, "stream_encode_ahead",
                        lambda v, st: (ahead_calls.append(v.shape[2]), real(v, st))[1])
    s = tiny.open_session("a cat", StreamParams(seed=3))
    schedule = core.drivers[s.sid][0]
    got = s.push(frames[:1], [0])
    needs = []
    for i in range(1, 17):
        needs.append(s.chunk_frames)
        got += s.push(frames[i : i + 1], [i])
        if i % 4:  # ahead of its chunk: encoded through the front now, nothing more
            assert ahead_calls[-1] == 1 and len(schedule.ahead) == i % 4
            assert schedule.vae_state.ahead_frames == i % 4
        else:
            assert schedule.ahead == [] and schedule.vae_state.ahead_frames == 0
    got += s.flush()
    assert needs == [4, 3, 2, 1] * 4  # what the engine tells the server a push may bring
    assert len(ahead_calls) == 12
    assert [p for _, p in got] == list(range(17))
    diff = [np.abs(a.astype(int) - b.astype(int)) for (a, _), (b, _) in zip(got, whole)]
    assert max(d.max() for d in diff) <= 2 and np.mean([d.mean() for d in diff]) < 0.01
    assert s.stats["vae_encode_ms"] >= sum(lap.ms() for lap in core.encode_laps[s.sid][:-1]) > 0
    assert len(core.encode_laps[s.sid]) == 4  # three frames ahead and the last one's


def test_an_update_waits_for_the_chunk_its_frames_started(tiny):
    """Live updates apply at chunk boundaries: one queued after frames went ahead of their chunk waits
    until that chunk is whole; a flush completes a chunk begun ahead, padding it."""
    frames = video(11, seed=5)
    s = tiny.open_session("a cat", StreamParams(seed=2, steps=1))  # no chunk in flight for the reset to drop
    out = s.push(frames[:7], list(range(7)))  # frame 0, a chunk, two frames ahead
    schedule = tiny.core.drivers[s.sid][0]
    assert schedule.vae_state.ahead_frames == 2 and s.chunk_frames == 2
    s.update(StreamUpdate(reset=True))
    out += s.push(frames[7:8], [7])
    assert schedule.vae_state.ahead_frames == 3  # the reset waits behind the chunk's frames
    out += s.push(frames[8:11], [8, 9, 10])  # completes the chunk; then the reset
    # a fresh stream: frame 9 is its frame 0, and frame 10 went ahead of its first chunk
    assert s.chunk_frames == 3 and schedule.vae_state.ahead_frames == 1
    out += s.flush()
    assert [p for _, p in out] == list(range(11))


def test_a_lone_frame_zero_still_comes_out(tiny):
    """A stream of one frame (flush), and a reset while frame 0 waits for its chunk, lose nothing."""
    s = tiny.open_session("a cat", StreamParams(seed=1))
    s.push(video(1), [0])
    assert [p for _, p in s.flush()] == [0]
    s = tiny.open_session("a cat", StreamParams(seed=1))
    s.push(video(1), [0])
    s.update(StreamUpdate(reset=True))
    out = s.push(video(6)[1:], [1, 2, 3, 4, 5]) + s.flush()
    assert [p for _, p in out] == [0, 1, 2, 3, 4, 5]


def test_a_push_returns_before_its_frames_and_they_follow_in_order(tiny, monkeypatch):
    """With two chunks in flight (a CUDA device's default) a push queues its chunk and returns; its
    frames come with a later push, from take_finished() once their copy to the host is done, or from
    flush(), always in order, across a reset too, and equal to a session that waits for every chunk."""
    frames = video(29, seed=4)
    _, whole = run(tiny, frames, "a cat", 5, step=4, steps=1)
    e = StreamEngine.create(EngineOptions(model="tiny", parallel=dict(inflight=2)))
    held = HeldCopies(e.core.io)
    monkeypatch.setattr(e.core.io, "to_uint8_later", held)
    s = e.open_session("a cat", StreamParams(seed=5, steps=1))
    assert s.push(frames[:1], [0]) == []
    assert e.core.drivers[s.sid][0].frame0 is not None  # encoded on arrival, before frames 1-4 come
    early: list = []
    got = s.push(frames[1:5], [1, 2, 3, 4], early=early.extend)
    assert early + got == []  # the push waits for no frame: none is on the host yet
    assert s.take_finished() == []
    held.release(1)  # the first copy queued, frame 0's alone, lands: it leaves ahead of frames 1-4
    got = s.take_finished()
    assert [p for _, p in got] == [0]
    assert s.take_finished() == []  # the copies of frames 1-4 are not done
    for a in range(5, 17, 4):
        got += s.push(frames[a : a + 4], list(range(a, a + 4)))
        assert len(s._chunks) <= 1  # one chunk may stay in flight, never more
        assert [p for _, p in got] == list(range(len(got)))
    assert len(got) < 17 and s.take_finished() == []  # frames 13-16 are still on their way
    held.released = True
    got += s.take_finished()
    assert [p for _, p in got] == list(range(17)) and s.take_finished() == []
    got += s.push(frames[17:29], list(range(17, 29))) + s.flush()
    assert [p for _, p in got] == list(range(29))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, whole))

    # a reset while a chunk is in flight: the old stream's frames leave before the new stream's frame 0
    held.released = False
    s = e.open_session("a cat", StreamParams(seed=5, steps=1))
    got = s.push(frames[:13], list(range(13)))
    s.update(StreamUpdate(reset=True))
    early = []
    got += s.push(frames[13:18], list(range(13, 18)), early=early.extend)
    got += early
    held.released = True
    got += s.flush()
    assert [p for _, p in got] == list(range(18))
    e.close()


def test_bad_frames_are_rejected_clearly(tiny):
    s = tiny.open_session("x")
    with pytest.raises(ValueError, match=r"uint8 \[T, 128, 128, 3\]"):
        s.push(np.zeros((4, 64, 64, 3), np.uint8), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="4 frames but 3 pts"):
        s.push(np.zeros((4, 128, 128, 3), np.uint8), [0, 1, 2])
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.push(np.zeros((4, 128, 128, 3), np.uint8), [0, 1, 2, 3])


# -- noise controller ---------------------------------------------------------------------------------

def reference_noise_function():
    """The reference's compute_noise_scale_and_step, taken from its installed source: its module
    imports torchvision at the top, which cannot be installed beside the CPU torch here."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("streamv2v")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("reference package not installed")
    src = (Path(list(spec.submodule_search_locations)[0]) / "inference.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "compute_noise_scale_and_step")
    ns: dict = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "streamv2v/inference.py", "exec"), ns)
    return ns["compute_noise_scale_and_step"]


def test_noise_controller_matches_reference():
    compute_noise_scale_and_step = reference_noise_function()
    g = torch.Generator().manual_seed(0)
    t = 1 + 4 * 12
    clip = torch.rand(1, 3, t, 16, 16, generator=g) * 2 - 1
    # vary the motion: still, slow, fast
    for i in range(1, t):
        amount = [0.0, 0.05, 0.6][(i // 12) % 3]
        clip[:, :, i] = (clip[:, :, i - 1] + amount * torch.randn(1, 3, 16, 16, generator=g)).clamp(-1, 1)
    ctl = NoiseController(s_max=0.8, s_min=0.7, sigma=0.2, smoothing=0.9)
    ours = [(ctl.step(clip[0, :, :5]), 700)]
    ref_scale, ref = 0.8, [(0.8, 700)]
    for end in range(9, t + 1, 4):
        ref_scale, step = compute_noise_scale_and_step(clip, end, 4, ref_scale, 0.8)
        ref.append((ref_scale, step))
        s = ctl.step(clip[0, :, end - 4 : end])
        ours.append((s, NoiseController.timestep(s)))
    assert len(ours) == len(ref) == 12
    for (a, ta), (b, tb) in zip(ours, ref):
        assert a == pytest.approx(b, rel=1e-6) and ta == tb
    assert len({round(s, 3) for s, _ in ours}) > 3  # the sequence actually moves


# -- CLI ----------------------------------------------------------------------------------------------

def write_mp4(path: Path, n: int, w: int = 160, h: int = 96) -> None:
    c = av.open(str(path), "w")
    st = c.add_stream("libx264", rate=30)
    st.width, st.height, st.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, (i * 7) % w :][:, :20] = (255, 128, 0)
        for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in st.encode():
        c.mux(p)
    c.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_renders_both_formats(tmp_path):
    src = tmp_path / "in.mp4"
    write_mp4(src, 14)
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.npz"), "--prompt", "a cat", "--quiet",
            "--height", "64", "--width", "96", "--output-size", "model")
    assert r.returncode == 0, r.stderr
    frames = np.load(tmp_path / "o.npz")["frames"]
    assert frames.shape == (14, 64, 96, 3) and frames.dtype == np.uint8
    r = cli("render", "--input", str(src), "--output", str(tmp_path / "o.mp4"), "--prompt", "a cat", "--quiet")
    assert r.returncode == 0, r.stderr
    with av.open(str(tmp_path / "o.mp4")) as c:
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(got) == 14 and got[0].shape == (96, 160, 3)  # the input's size (--output-size input)


@pytest.mark.parametrize("args, message", [
    (["--input", "/nonexistent.mp4"], "no such file"),
    (["--model", "wan-7b"], "unknown"),
    (["--height", "100", "--width", "96"], "multiple of 16"),
    (["--output", "/tmp/x.avi"], ".mp4 or .npz"),
])
def test_cli_bad_arguments_one_line_exit_2(tmp_path, args, message):
    src = tmp_path / "in.mp4"
    write_mp4(src, 5)
    base = {"--input": str(src), "--output": str(tmp_path / "o.npz"), "--prompt": "x"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = cli("render", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
