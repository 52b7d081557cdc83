"""The streaming DiT against the reference package's own code, and against our offline path.

Same random weights in both (ours loaded through our loader from a model.pt written in the real
layout from the reference module's state dict), same inputs, same noise draws.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("models.wan.causal_model")

from engine import flow  # noqa: E402
from engine.checkpoint import load_into, read_causal_dit, write_causal_dit  # noqa: E402
from engine.config import DiTConfig  # noqa: E402
from engine.dit import WanDiT  # noqa: E402
from engine.kv_cache import StreamKVCache  # noqa: E402
from engine.rope import Rope  # noqa: E402
from tests.latent_stream import LatentStream, dit_step  # noqa: E402
from tests.reference_dit import ReferenceStream, build_reference_model, patched_randn_like  # noqa: E402

# head_dim 128, as the reference pipeline's cache allocation assumes
CFG = DiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32)
LAT_HW = (8, 8)
FRAME_TOKENS = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Recorder:
    """Noise source that remembers every draw, so the reference can be fed the same noise."""

    def __init__(self, seed: int = 7) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        n = torch.randn(shape, generator=self.g)
        self.draws.append(n)
        return n


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    ref = build_reference_model(CFG)
    path: Path = tmp_path_factory.mktemp("w") / "wan_causal_dmd_v2v" / "model.pt"
    write_causal_dit(path, ref.state_dict(), wrapper="generator_ema", prefix=True)
    ours = WanDiT(CFG)
    load_into(ours, read_causal_dit(path), str(path))
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(3))
    ctx[:, 20:] = 0  # padded prompt, as the text encoder returns
    return ref, ours.eval(), ctx


def chunk_inputs(n: int, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(1, 16, 2, *LAT_HW, generator=g)
    rest = [torch.randn(1, 16, 1, *LAT_HW, generator=g) for _ in range(n)]
    t0s = [700 - 13 * (i % 5) for i in range(n)]  # the noise controller moves the first timestep
    return first, rest, t0s


def run_ours(dit, ctx, steps, chunks, num_sink=3, window=6, tau=None, rope_reset=50, noise=None):
    noise = noise or Recorder()
    sb = LatentStream(dit, ctx, steps, window, num_sink, tau, rope_reset, LAT_HW, noise)
    first, rest, t0s = chunk_inputs(chunks)
    outs = [sb.prime(first, 0.8, 700)]
    for lat, t0 in zip(rest, t0s):
        s = (t0 + 100) / 1000
        sb.push(lat, s, t0)
        outs.append(sb.outputs[-1].clone())
    return outs, noise, sb


def run_reference(ref, ctx, steps, chunks, noise: Recorder, monkeypatch, num_sink=3, window=6, tau=None, rope_reset=50, stream=None):
    """Feed the reference the same inputs and noise as `run_ours` drew."""
    n = steps
    groups = [noise.draws[i : i + n] for i in range(0, len(noise.draws), n)]
    renoise = [d for g in groups for d in g[1:]]
    monkeypatch.setattr(torch, "randn_like", patched_randn_like(renoise))
    stream = stream or ReferenceStream(ref, ctx, flow.step_list(steps), FRAME_TOKENS, window, num_sink, tau, rope_reset)
    first, rest, t0s = chunk_inputs(chunks)
    outs = [stream.prepare(0.8 * groups[0][0] + 0.2 * first)]
    for i, (lat, t0) in enumerate(zip(rest, t0s)):
        s = (t0 + 100) / 1000
        outs.append(stream.push(s * groups[i + 1][0] + (1 - s) * lat, t0))
    monkeypatch.undo()
    return outs, stream


@pytest.mark.parametrize("steps", [1, 2])
@torch.no_grad()
def test_stream_matches_reference_through_eviction(models, monkeypatch, steps):
    ref, ours, ctx = models
    chunks = 10  # window 6 (3 sinks) fills after 4 stream chunks; the rest evict
    a, noise, _ = run_ours(ours, ctx, steps, chunks)
    b, _ = run_reference(ref, ctx, steps, chunks, noise, monkeypatch)
    for i, (x, y) in enumerate(zip(a, b)):
        assert rel(x, y) <= 1e-3, f"chunk {i}: relative error {rel(x, y):.2e}"


@torch.no_grad()
def test_reference_flags_an_empty_sink_slot_we_do_not(models, monkeypatch):
    """With sink refresh on (tau 0.2) we agree until the first eviction. There the reference replaces
    sink slot 2, flagged at frame 2 when that slot was still empty (cosine with zeros = 0 < tau);
    we only compare a new frame against filled sinks, when it is about to evict."""
    ref, ours, ctx = models
    chunks = 5  # frames 2..5 fill the window, frame 6 is the first to evict
    a, noise, sb = run_ours(ours, ctx, 1, chunks, tau=0.2)
    noise_prefix = Recorder()
    noise_prefix.draws = noise.draws[: chunks]  # prime + 4 stream chunks (1 draw each with 1 step)
    b, stream = run_reference(ref, ctx, 1, chunks - 1, noise_prefix, monkeypatch, tau=0.2)
    for i, (x, y) in enumerate(zip(a[:chunks], b)):
        assert rel(x, y) <= 1e-3, f"chunk {i} before any eviction: {rel(x, y):.2e}"
    ref_k = stream.p.kv_cache1[0]["k"][0].clone().view(6, FRAME_TOKENS, -1)
    # one more chunk: the first eviction
    g = torch.Generator().manual_seed(99)
    lat = torch.randn(1, 16, 1, *LAT_HW, generator=g)
    eps = torch.randn(1, 16, 1, *LAT_HW, generator=g)
    stream.push(0.8 * eps + 0.2 * lat, 700)
    ref_k2 = stream.p.kv_cache1[0]["k"][0].view(6, FRAME_TOKENS, -1)
    changed = [s for s in range(6) if not torch.equal(ref_k[s], ref_k2[s])]
    assert changed == [2], f"reference evicted slots {changed}"
    assert stream.p.generator.model.blocks[0].self_attn.evict_idx[0][:3] == [4 * FRAME_TOKENS, 5 * FRAME_TOKENS, 6 * FRAME_TOKENS]


@torch.no_grad()
def test_rope_wrap_keeps_window_consistent(models, monkeypatch):
    """Without sinks, our stream after a position wrap equals a stream that never wrapped (RoPE sees
    only relative positions, and we re-rotate the cached keys); the reference's changes, because it
    leaves the cached keys rotated at their old positions."""
    ref, ours, ctx = models
    chunks, reset = 14, 10
    wrapped, noise, _ = run_ours(ours, ctx, 1, chunks, num_sink=0, rope_reset=reset)
    straight, _, _ = run_ours(ours, ctx, 1, chunks, num_sink=0, rope_reset=1000)
    ref_wrapped, _ = run_reference(ref, ctx, 1, chunks, noise, monkeypatch, num_sink=0, rope_reset=reset)
    ref_straight, _ = run_reference(ref, ctx, 1, chunks, noise, monkeypatch, num_sink=0, rope_reset=1000)
    for i in range(5):  # until the first eviction we are the same computation
        assert rel(wrapped[i], ref_wrapped[i]) <= 1e-3
    first_wrapped = reset - 1  # chunk whose position reaches `reset` (chunk 0 holds frames 0 and 1)
    for i in range(chunks + 1):
        assert rel(wrapped[i], straight[i]) <= 1e-4, f"chunk {i}: ours is not shift-invariant"
    for i in range(first_wrapped):
        assert rel(ref_wrapped[i], ref_straight[i]) <= 1e-5
    worst = max(rel(ref_wrapped[i], ref_straight[i]) for i in range(first_wrapped, chunks + 1))
    assert worst > 1e-2, "the reference was expected to change after the wrap"


@torch.no_grad()
def test_reference_never_evicts_slot_2_with_two_sinks(models, monkeypatch):
    """14B defaults (2 sinks in a window of 5): the reference's FIFO queue starts at slot 3, so slot 2,
    a rolling slot, is never evicted. Ours evicts it first. Same outputs until then."""
    ref, ours, ctx = models
    chunks = 4  # frames 2, 3, 4 fill the window; chunk 4 (frame 5) is the first to evict
    a, noise, sb = run_ours(ours, ctx, 1, chunks - 1, num_sink=2, window=5)
    b, stream = run_reference(ref, ctx, 1, chunks - 1, noise, monkeypatch, num_sink=2, window=5)
    for x, y in zip(a, b):
        assert rel(x, y) <= 1e-3
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 16, 1, *LAT_HW, generator=g)
    ours_before, ref_before = sb.cache.k[0][0].clone(), stream.p.kv_cache1[0]["k"][0].clone()
    sb.push(noisy, 1.0, 700)
    stream.push(noisy, 700)
    def changed(before, after):
        return [s for s in range(5) if not torch.equal(before.view(5, FRAME_TOKENS, -1)[s], after.view(5, FRAME_TOKENS, -1)[s])]
    assert changed(ours_before, sb.cache.k[0][0]) == [2]
    assert changed(ref_before, stream.p.kv_cache1[0]["k"][0]) == [3]


@torch.no_grad()
def test_reference_eviction_queue_survives_restart_ours_does_not(models, monkeypatch):
    """The reference keeps its eviction queue on the attention module: a restart (its prompt change)
    inherits the old queue. Our state lives in the session's cache, so a new stream equals a fresh one."""
    ref, ours, ctx = models
    chunks = 9
    _, noise, _ = run_ours(ours, ctx, 1, chunks)
    first, _ = run_reference(ref, ctx, 1, chunks, noise, monkeypatch)
    stale = ReferenceStream(ref, ctx, [700], FRAME_TOKENS, 6, 3, None)
    for b in ref.blocks:  # what a restart in the reference leaves behind
        b.self_attn.evict_idx = [[5 * FRAME_TOKENS, 6 * FRAME_TOKENS, 4 * FRAME_TOKENS]]
    again, _ = run_reference(ref, ctx, 1, chunks, noise, monkeypatch, stream=stale)
    # same inputs, different outputs: the old queue evicts the wrong frames
    assert max(rel(x, y) for x, y in zip(again, first)) > 1e-3
    ours_again, _, _ = run_ours(ours, ctx, 1, chunks, noise=None)
    ours_first, _, _ = run_ours(ours, ctx, 1, chunks)
    assert all(torch.equal(x, y) for x, y in zip(ours_again, ours_first))


@torch.no_grad()
def test_kv_cached_stream_equals_block_causal_forward(models):
    """Chunk by chunk with the KV cache == one block-causal forward over the clip (before eviction)."""
    _, ours, ctx = models
    g = torch.Generator().manual_seed(5)
    chunk_frames = [2, 1, 1, 1]
    x = torch.randn(1, 16, sum(chunk_frames), *LAT_HW, generator=g)
    t = torch.tensor([[700, 700, 650, 600, 550]])
    rope = Rope(CFG.head_dim)
    offline = ours.forward_block_causal(x, t, ctx, chunk_frames, rope)
    offline_x0 = flow.to_x0(offline, x, t)
    stage = LatentStream(ours, ctx, 1, 6, 3, None, 50, LAT_HW, Recorder()).stage  # window 6, 3 sinks
    start, outs = 0, []
    for f in chunk_frames:
        outs.append(dit_step(ours, stage, x[:, :, start : start + f], int(t[0, start]), start))
        start += f
    assert rel(torch.cat(outs, dim=2), offline_x0) <= 1e-5


def test_first_chunk_attends_to_its_own_frames_without_a_mask():
    """The first chunk's keys are the frames it wrote, unmasked (SDPA keeps its fastest kernel); a
    forward that does not fill rows alike sees the whole window behind a mask (as before)."""
    rope = Rope(128)
    c = StreamKVCache([0], 1, 6, 3, 1, 128, 2, None, rope, torch.float32, torch.device("cpu"))
    k = torch.randn(1, 6, 1, 128)
    c.begin([0], 2)
    keys, values, valid = c.update(0, k, k)
    assert valid is None and torch.equal(keys, k) and torch.equal(values, k)
    c.begin([2], 1)
    keys, _, valid = c.update(0, k[:, :3], k[:, :3])
    assert keys.shape[1] == 18 and valid.tolist() == [[True] * 9 + [False] * 9]


def test_sink_refresh_rule():
    """Cache full: a frame unlike every sink replaces the least similar sink; otherwise FIFO over the
    rolling slots, each layer deciding on its own keys."""
    rope = Rope(128)
    c = StreamKVCache([0], 1, 4, 1, 1, 128, 2, 0.2, rope, torch.float32, torch.device("cpu"))
    basis = torch.eye(128)
    keys = [basis[0], basis[0] + 0.2 * basis[5], basis[1], basis[2]]  # sinks 0,1 ~ e0; rolling e1, e2
    for p, k in enumerate(keys):
        c.begin([p], 1)
        c.update(0, k.view(1, 1, 1, 128), k.view(1, 1, 1, 128))
    def write(k: torch.Tensor, p: int) -> int:
        before = c.k[0].clone()
        c.begin([p], 1)
        c.update(0, k.view(1, 1, 1, 128), k.view(1, 1, 1, 128))
        return int((c.k[0] != before).any(-1).any(-1).nonzero()[0, 1])
    assert write(basis[0] + 0.1 * basis[3], 4) == 2  # like the sinks: oldest rolling slot
    assert write(basis[0] - 0.05 * basis[4], 5) == 3
    assert write(basis[7], 6) == 0  # unlike both sinks (sim 0): refresh the least similar (first) sink
    assert write(basis[0] + basis[7], 7) == 2  # FIFO resumes where it was
    assert write(basis[7] + 0.1 * basis[9], 8) == 1  # unlike sink 1 (sim 0): it is refreshed in turn
    # the sinks' means, kept up to date where sinks are written, equal a fresh computation
    kept = tuple(m.clone() for m in c.sink_mean[0])
    c._update_sink_mean(0)
    assert all(torch.equal(a, b) for a, b in zip(kept, c.sink_mean[0]))
    # a position wrap re-rotates the refreshed sinks (they held frames 6 and 8): their means change, in
    # the very tensors a captured CUDA graph of the steady state reads
    held = c.sink_mean[0]
    c.begin([3], 1)
    assert c.sink_mean[0][0] is held[0] and c.sink_mean[0][1] is held[1]
    assert not torch.equal(held[0], kept[0])
    fresh = c.k[0][:, :2].reshape(1, 2, 1, -1).mean(2)
    assert torch.equal(held[0], fresh)
