"""Wan VAE: parity with the reference package, streaming == whole clip, state isolation, shapes, keys."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import VAEConfig
from engine.vae import LATENT_MEAN, LATENT_STD, CausalConv3d, ResidualBlock, RMSNorm, Upsample, WanVAE, _norm_conv

SMALL = VAEConfig(dim=8)  # real z_dim/mult/blocks/temporal layout, narrow channels
H, W = 32, 48


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights at a scale that keeps activations O(1) (and decoder outputs mostly inside
    [-1,1], so the clamp does not hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        head = model.decoder.head[2]
        head.weight.mul_(0.3)


def _ref_module():
    return pytest.importorskip("models.wan.wan_base.modules.vae", reason="reference package not installed")


def _ref_kwargs(cfg: VAEConfig) -> dict:
    return dict(dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0)


@pytest.fixture(scope="module")
def ours() -> WanVAE:
    vae = WanVAE(SMALL).eval()
    _randomize(vae)
    return vae


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 13, H, W, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 4, H // 8, W // 8, generator=g)


def _scale() -> list[torch.Tensor]:
    mean, std = torch.tensor(LATENT_MEAN), torch.tensor(LATENT_STD)
    return [mean, 1.0 / std]


@pytest.mark.parity
def test_parity_with_reference_stream_and_offline(video: torch.Tensor, latent: torch.Tensor):
    vae_mod = _ref_module()
    ref = vae_mod.WanVAE_(**_ref_kwargs(SMALL)).eval()
    _randomize(ref, seed=3)
    ours = WanVAE(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    scale = _scale()

    with torch.no_grad():
        # Streaming encode, chunks of 5, 4, 4 frames (reference: scale=None, its pipeline's call).
        state = ours.new_stream_state()
        for lo, hi in ((0, 5), (5, 9), (9, 13)):
            want = ref.stream_encode(video[:, :, lo:hi], None)
            got = ours.stream_encode(video[:, :, lo:hi], state)
            assert got.shape == want.shape
            assert _rel(got, want) <= 1e-3
        # Streaming decode, chunks of 2, 1, 1 latents (reference: de-normalises, no clamp).
        state = ours.new_stream_state()
        for lo, hi in ((0, 2), (2, 3), (3, 4)):
            want = ref.stream_decode(latent[:, :, lo:hi], scale).clamp(-1, 1)
            got = ours.stream_decode(latent[:, :, lo:hi], state)
            assert got.shape == want.shape
            assert _rel(got, want) <= 1e-3
        # A bigger first chunk (1+8 frames) and a 2-latent later chunk take the reference's other loops.
        ref.first_encode, ref.first_decode = True, True
        state = ours.new_stream_state()
        for lo, hi in ((0, 9), (9, 13)):
            assert _rel(ours.stream_encode(video[:, :, lo:hi], state), ref.stream_encode(video[:, :, lo:hi], None)) <= 1e-3
        for lo, hi in ((0, 3), (3, 4)):
            want = ref.stream_decode(latent[:, :, lo:hi], scale).clamp(-1, 1)
            assert _rel(ours.stream_decode(latent[:, :, lo:hi], state), want) <= 1e-3
        # Whole-clip paths: ours run the clip in one pass, the reference chunk by chunk.
        assert _rel(ours.encode(video, normalize=True), ref.encode(video, scale)) <= 1e-3
        assert _rel(ours.decode(latent), ref.decode(latent, scale).clamp(-1, 1)) <= 1e-3


def test_decoder_outputs_not_saturated(ours: WanVAE, latent: torch.Tensor):
    # Guards the parity tests: if most pixels sat at +-1 the clamp would hide differences.
    out = ours.decode(latent)
    assert (out.abs() < 0.99).float().mean().item() > 0.9


def test_stream_decode_equals_whole_clip(ours: WanVAE, latent: torch.Tensor):
    whole = ours.decode(latent)
    state = ours.new_stream_state()
    chunks = [ours.stream_decode(latent[:, :, lo:hi], state) for lo, hi in ((0, 2), (2, 3), (3, 4))]
    assert [c.shape[2] for c in chunks] == [5, 4, 4]
    assert _rel(torch.cat(chunks, 2), whole) <= 1e-4


def test_a_later_latent_decodes_its_first_frame_before_the_others(ours: WanVAE, latent: torch.Tensor):
    """A steady chunk's decode comes in two parts, frame 0 and then frames 1-3, each decoded only when
    the caller takes it (so frame 0's copy to the host can be queued ahead of the others' decode); the
    parts are the whole clip's frames, decoded in one pass."""
    whole = ours.decode(latent)
    state = ours.new_stream_state()
    first_chunk = list(ours.stream_decode_parts(latent[:, :, :2], state))
    assert [p.shape[2] for p in first_chunk] == [5]
    head_frames: list[int] = []
    hook = ours.decoder.head[2].register_forward_hook(lambda m, a, y: head_frames.append(y.shape[2]))
    try:
        parts = ours.stream_decode_parts(latent[:, :, 2:3], state)
        first = next(parts)
        assert first.shape[2] == 1 and head_frames == [1]  # the other three are not decoded yet
        rest = next(parts)
        assert rest.shape[2] == 3 and head_frames == [1, 3]
        assert next(parts, None) is None
    finally:
        hook.remove()
    assert _rel(torch.cat([*first_chunk, first, rest], 2), whole[:, :, :9]) <= 1e-4


def test_stream_encode_equals_whole_clip(ours: WanVAE, video: torch.Tensor):
    raw = ours.encode(video)
    state = ours.new_stream_state()
    chunks = [ours.stream_encode(video[:, :, lo:hi], state) for lo, hi in ((0, 5), (5, 9), (9, 13))]
    assert [c.shape[2] for c in chunks] == [2, 1, 1]
    assert _rel(torch.cat(chunks, 2), raw) <= 1e-4
    # normalize=True is the standard convention (mu - mean) / std, in streaming and whole-clip alike.
    mean = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
    assert _rel(ours.encode(video, normalize=True), (raw - mean) / std) <= 1e-5
    state = ours.new_stream_state()
    normed = torch.cat([ours.stream_encode(video[:, :, lo:hi], state, normalize=True)
                        for lo, hi in ((0, 9), (9, 13))], 2)
    assert _rel(normed, (raw - mean) / std) <= 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frames_encoded_ahead_give_the_whole_clips_latents(ours: WanVAE, video: torch.Tensor, layout: str):
    """A chunk's frames may reach the encoder before the chunk is whole: they go through the encoder's
    per-frame blocks at once (`stream_encode_ahead`), and the call with the chunk's last frames runs the
    rest. Any split of a chunk gives the whole clip's latents, and the work done ahead is the front's
    (the back runs only on the call that completes a chunk)."""
    raw = ours.encode(video)
    back_calls: list[int] = []
    hook = ours.encoder.middle[1].register_forward_hook(lambda m, a, y: back_calls.append(y.shape[2]))
    # per chunk: the runs of frames that go ahead, then the frames that complete it
    chunks = (([(1, 2), (2, 3)], (3, 5)), ([(5, 7)], (7, 9)), ([(9, 10)], (10, 13)))
    try:
        ours.channels_last = layout == "channels_last"
        s = ours.new_stream_state()
        outs = [ours.stream_encode(video[:, :, :1], s)]
        for runs, (lo, hi) in chunks:
            for a, b in runs:
                ours.stream_encode_ahead(video[:, :, a:b], s)
            assert len(back_calls) == len(outs)  # nothing ran past the front yet
            outs.append(ours.stream_encode(video[:, :, lo:hi], s))
            assert s.enc_ahead == []
        assert back_calls == [1, 1, 1, 1]  # one back per chunk (frame 0's included)
    finally:
        hook.remove()
        ours.channels_last = None
    assert [o.shape[2] for o in outs] == [1, 1, 1, 1]
    assert _rel(torch.cat(outs, 2), raw) <= 1e-4


def test_encoding_ahead_checks_its_frames(ours: WanVAE, video: torch.Tensor):
    s = ours.new_stream_state()
    with pytest.raises(ValueError, match="frame 0 is encoded alone"):
        ours.stream_encode_ahead(video[:, :, :1], s)
    ours.stream_encode(video[:, :, :1], s)
    ours.stream_encode_ahead(video[:, :, 1:3], s)
    with pytest.raises(ValueError, match="at most 3 frames"):
        ours.stream_encode_ahead(video[:, :, 3:5], s)
    with pytest.raises(ValueError, match="with the 2 encoded ahead"):
        ours.stream_encode(video[:, :, 3:7], s)
    assert ours.stream_encode(video[:, :, 3:9], s).shape[2] == 2  # this chunk's last 2 frames, then a whole one
    s.reset_encode()
    assert s.enc_ahead == [] and not s.enc_split


def test_interleaved_states_are_isolated(ours: WanVAE, video: torch.Tensor, latent: torch.Tensor):
    other_video = video.flip(2).neg()
    other_latent = latent.flip(2) * 0.5
    chunks_v, chunks_z = ((0, 5), (5, 9), (9, 13)), ((0, 2), (2, 3), (3, 4))

    def alone(v: torch.Tensor, z: torch.Tensor) -> tuple[list, list]:
        s = ours.new_stream_state()
        enc = [ours.stream_encode(v[:, :, lo:hi], s) for lo, hi in chunks_v]
        dec = [ours.stream_decode(z[:, :, lo:hi], s) for lo, hi in chunks_z]
        return enc, dec

    a_enc, a_dec = alone(video, latent)
    b_enc, b_dec = alone(other_video, other_latent)
    sa, sb = ours.new_stream_state(), ours.new_stream_state()
    for i, ((vlo, vhi), (zlo, zhi)) in enumerate(zip(chunks_v, chunks_z)):
        assert torch.equal(ours.stream_encode(video[:, :, vlo:vhi], sa), a_enc[i])
        assert torch.equal(ours.stream_decode(other_latent[:, :, zlo:zhi], sb), b_dec[i])
        assert torch.equal(ours.stream_encode(other_video[:, :, vlo:vhi], sb), b_enc[i])
        assert torch.equal(ours.stream_decode(latent[:, :, zlo:zhi], sa), a_dec[i])
    # reset_* restarts a stream from scratch
    sa.reset_encode()
    sa.reset_decode()
    assert torch.equal(ours.stream_encode(video[:, :, :5], sa), a_enc[0])
    assert torch.equal(ours.stream_decode(latent[:, :, :2], sa), a_dec[0])


def test_channels_last_layout_gives_same_results(ours: WanVAE, video: torch.Tensor, latent: torch.Tensor):
    # The layout CUDA uses by default, exercised on the CPU: same numbers, contiguous outputs.
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        s = ours.new_stream_state()
        enc = torch.cat([ours.stream_encode(video[:, :, lo:hi], s) for lo, hi in ((0, 5), (5, 9))], 2)
        dec = torch.cat([ours.stream_decode(latent[:, :, lo:hi], s) for lo, hi in ((0, 2), (2, 3))], 2)
        return enc, dec

    enc, dec = run()
    try:
        ours.channels_last = True
        enc_cl, dec_cl = run()
        whole = ours.decode(latent[:, :, :3])
    finally:
        ours.channels_last = None
    assert enc_cl.is_contiguous() and dec_cl.is_contiguous()
    assert _rel(enc_cl, enc) <= 1e-5 and _rel(dec_cl, dec) <= 1e-5 and _rel(whole, dec) <= 1e-4
    # CPU convs return contiguous tensors, so feed a time-upsampler a channels-last input directly.
    up = next(m for m in ours.decoder.upsamples if isinstance(m, Upsample) and m.temporal)
    x = torch.randn(2, up.time_conv.in_channels, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert _rel(up(x_cl), up(x)) <= 1e-6
        s1, s2 = ours.new_stream_state(), ours.new_stream_state()
        for lo, hi in ((0, 1), (1, 3)):
            assert _rel(up(x_cl[:, :, lo:hi], s1.dec), up(x[:, :, lo:hi], s2.dec)) <= 1e-6


@torch.no_grad()
@pytest.mark.parametrize("chunks", [((0, 1), (1, 2), (2, 6), (6, 10)), ((0, 1), (1, 5), (5, 9), (9, 10)), ((0, 4), (4, 10)),
                                    ((0, 1), (1, 3), (3, 5), (5, 7), (7, 9), (9, 10))])
def test_streamed_input_window_equals_whole_clip(chunks):
    """The norm writing straight into a conv's input window (history frames in front, no cat) gives
    the whole clip's result, whatever the history holds when the first window is made; a chunk as long
    as the last one reuses that window, whose head holds the history."""
    g = torch.Generator().manual_seed(3)
    conv, norm = CausalConv3d(8, 6, 3, padding=1), RMSNorm(8)
    conv.slot = 0
    with torch.no_grad():
        norm.gamma.copy_(torch.rand(8, 1, 1, 1, generator=g) + 0.5)
    x = torch.randn(1, 8, 10, 6, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
    bias = torch.randn(8, generator=g)
    whole = _norm_conv(norm, conv, x, None, bias, conv_bias=True)
    cache: list = [None]
    windows = 0
    parts = []
    reused = 0
    for lo, hi in chunks:
        part = x[:, :, lo:hi]
        win = conv.window(part, list(cache))
        windows += win is not None
        reused += win is not None and cache[0] is not None and win._base is cache[0]._base
        parts.append(_norm_conv(norm, conv, part, cache, bias, conv_bias=True))
    assert windows == sum(hi - lo >= 2 for lo, hi in chunks) > 0
    same_as_last = sum(1 for (a, b), (c, d) in zip(chunks, chunks[1:]) if d - c == b - a >= 2)
    assert reused == same_as_last
    assert _rel(torch.cat(parts, 2), whole) <= 1e-6


@torch.no_grad()
def test_a_call_in_runs_convolves_each_run_in_one_buffer():
    """A conv whose call's 4 frames come in runs (the decoder's frame 0, then frames 1-3) keeps one
    window buffer: each run is written behind the history the run before left there, and only a full
    buffer moves its last frames to its head. The whole clip's result, and no new buffer after the
    stream's first chunk (frame 0 alone, then frames 1-4 as 1 + 3)."""
    g = torch.Generator().manual_seed(4)
    conv, norm = CausalConv3d(8, 6, 3, padding=1), RMSNorm(8)
    conv.slot, conv.run_frames = 0, 4
    x = torch.randn(1, 8, 14, 6, 5, generator=g).contiguous(memory_format=torch.channels_last_3d)
    whole = _norm_conv(norm, conv, x, None, None, conv_bias=True)
    cache: list = [None]
    parts, buffers = [], []
    for lo, hi in ((0, 1), (1, 2), (2, 5), (5, 6), (6, 9), (9, 10), (10, 13), (13, 14)):
        win = conv.window(x[:, :, lo:hi], list(cache))  # what _norm_conv gets (a fresh buffer: another one)
        assert win is not None and win.shape[2] == 2 + hi - lo
        parts.append(_norm_conv(norm, conv, x[:, :, lo:hi], cache, None, conv_bias=True))
        buffers.append(cache[0]._base)  # the history: a stretch of the run's buffer
    assert all(b is buffers[2] for b in buffers[2:])
    assert _rel(torch.cat(parts, 2), whole) <= 1e-6


def test_shapes_and_input_checks(ours: WanVAE):
    s = ours.new_stream_state()
    assert ours.stream_encode(torch.zeros(2, 3, 5, 16, 24), s).shape == (2, 16, 2, 2, 3)
    assert ours.stream_encode(torch.zeros(2, 3, 4, 16, 24), s).shape == (2, 16, 1, 2, 3)
    assert ours.stream_decode(torch.zeros(2, 16, 2, 2, 3), s).shape == (2, 3, 5, 16, 24)
    assert ours.stream_decode(torch.zeros(2, 16, 1, 2, 3), s).shape == (2, 3, 4, 16, 24)
    assert ours.encode(torch.zeros(1, 3, 1, 16, 24)).shape == (1, 16, 1, 2, 3)
    assert ours.decode(torch.zeros(1, 16, 3, 2, 3)).shape == (1, 3, 9, 16, 24)
    with pytest.raises(ValueError):
        ours.stream_encode(torch.zeros(1, 3, 4, 16, 24), ours.new_stream_state())  # first needs 1+4k
    with pytest.raises(ValueError):
        ours.stream_encode(torch.zeros(1, 3, 5, 16, 24), s)  # later needs 4k
    with pytest.raises(ValueError):
        ours.encode(torch.zeros(1, 3, 5, 20, 24))  # not a multiple of 8


def test_bfloat16_runs_and_keeps_float32_statistics():
    vae = WanVAE(SMALL).eval()
    _randomize(vae)
    ref_out = vae.decode(torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(4)))
    vae = vae.to(torch.bfloat16)
    assert vae.latent_mean.dtype == torch.float32 and vae.latent_std.dtype == torch.float32
    s = vae.new_stream_state()
    z = vae.stream_encode(torch.rand(1, 3, 5, 16, 16) * 2 - 1, s)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()
    out = vae.stream_decode(torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(4)), s)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 5, 16, 16)
    assert _rel(out, ref_out) < 0.05


def test_state_dict_keys_match_reference_at_real_size():
    vae_mod = _ref_module()
    real = VAEConfig()
    with torch.device("meta"):
        ours = WanVAE(real)
        ref = vae_mod.WanVAE_(**_ref_kwargs(real))
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(ref_sd) == 194
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_meta_build_then_assign_load(ours: WanVAE, latent: torch.Tensor):
    # How a loader avoids allocating twice: build on meta, then load the checkpoint with assign=True.
    with torch.device("meta"):
        vae = WanVAE(SMALL)
    vae.load_state_dict(ours.state_dict(), strict=True, assign=True)
    vae.eval()
    assert torch.equal(vae.decode(latent[:, :, :2]), ours.decode(latent[:, :, :2]))
    assert torch.equal(vae.encode(torch.zeros(1, 3, 1, 16, 16), normalize=True),
                       ours.encode(torch.zeros(1, 3, 1, 16, 16), normalize=True))


def test_rgb_input_of_a_conv_padded_with_zero_channels_is_the_same_conv():
    """On CUDA the VAE's first conv has its 3 input channels padded to PADDED_IN_CHANNELS (a faster
    cuDNN kernel); the padded conv, run here on the CPU, equals the plain one, bias or not, and tracks a
    change of the weights."""
    torch.manual_seed(0)
    conv = CausalConv3d(3, 12, 3, padding=1)
    x = torch.randn(1, 3, 4, 6, 10).contiguous(memory_format=torch.channels_last_3d)
    for bias in (True, False):
        want = torch.nn.functional.conv3d(x, conv.weight, conv.bias if bias else None, conv.stride, conv.padding)
        got = conv._conv_padded(x, bias)
        assert got.shape == want.shape and _rel(got, want) < 1e-6
    with torch.no_grad():
        conv.weight.mul_(2)
    assert _rel(conv._conv_padded(x, False), 2 * want) < 1e-6


def test_conv_biases_deferred_into_the_next_block_change_nothing(ours: WanVAE, video: torch.Tensor, latent: torch.Tensor,
                                                                monkeypatch):
    """The encoder and decoder leave the bias of a conv whose output goes straight into a ResidualBlock
    to that block (added inside its norm and residual kernels, and through its shortcut conv). In
    float64, streamed chunk by chunk (a temporal resample's first and later calls), that equals every
    block adding its own biases."""
    import copy

    vae = copy.deepcopy(ours).double().requires_grad_(False)

    def plain(coder, blocks, x, cache):
        x = coder.conv1(x, cache)
        for block in blocks:
            x = block(x, cache)
        return _norm_conv(coder.head[0], coder.head[2], x, cache, conv_bias=True)

    enc, dec = vae.encoder, vae.decoder
    # the fold happens: blocks get biases their input lacks (and only the streamed forward passes them)
    folded = []
    block_forward = ResidualBlock.forward

    def spy(self, x, cache=None, in_bias=None):
        folded.append(in_bias is not None)
        return block_forward(self, x, cache, in_bias)

    monkeypatch.setattr(ResidualBlock, "forward", spy)
    caches = [[None] * vae._enc_slots for _ in range(2)]
    x = video.double()
    for a, b in ((0, 5), (5, 9), (9, 13)):
        got = enc(x[:, :, a:b], caches[0])
        want = plain(enc, (*enc.downsamples, *enc.middle), x[:, :, a:b], caches[1])
        assert (got - want).abs().max() < 1e-10 * want.abs().max()
    assert any(folded), "no encoder block was handed a bias"
    enc(x[:, :, :5], [None] * vae._enc_slots)  # the blocks keep this call's summed biases...
    with torch.no_grad():  # ...which must follow a change of the weights
        for m in enc.modules():
            if isinstance(m, ResidualBlock):
                m.residual[6].bias.add_(0.5)
    caches = [[None] * vae._enc_slots for _ in range(2)]
    got = enc(x[:, :, :5], caches[0])
    want = plain(enc, (*enc.downsamples, *enc.middle), x[:, :, :5], caches[1])
    assert (got - want).abs().max() < 1e-10 * want.abs().max()
    folded.clear()
    caches = [[None] * vae._dec_slots for _ in range(2)]
    z = latent.double()
    for t in range(z.shape[2]):
        got = dec(z[:, :, t : t + 1], caches[0])
        want = plain(dec, (*dec.middle, *dec.upsamples), z[:, :, t : t + 1], caches[1])
        assert (got - want).abs().max() < 1e-10 * want.abs().max()
    assert any(folded), "no decoder block was handed a bias"
    assert any(m.bias is not None and m.bias.abs().max() > 0 for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
