"""Wan2.1 video VAE with streaming ("Stream-VAE") encode/decode (docs/ARCHITECTURE.md §3, §4).

Architecture: causal 3D convolutions; 4 pixel frames <-> 1 latent frame, spatial stride 8. Frame 0
is special: it is encoded/decoded on its own, so a clip of 1+4k frames maps to 1+k latents.

Module paths equal the checkpoint's state-dict keys (`encoder.downsamples.3.residual.2.weight`), so
`Wan2.1_VAE.pth` loads with load_state_dict(strict=True). That is why some nn.Sequential containers
hold parameter-free placeholders: they keep the checkpoint's indices.

Streaming: every causal conv needs the last 2 frames of its input history; the downsampling time
conv needs the last frame. Those tensors live in a `VAEStreamState` owned by the caller, never on
the module, so one module serves many sessions concurrently. Processing a clip in chunks with a
state gives the same result as processing it whole (`encode`/`decode`).

Normalisation convention (mirrors the reference, see `stream_encode`): encode returns the raw
posterior mean unless `normalize=True`; decode always expects normalised latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import VAEConfig
from engine.kernels import bias_residual_, rms_norm_channels, upsample2x_nearest
from engine.stream_graph import StepGraph

# Per-channel statistics of the Wan2.1 latent space: normalised z = (mu - mean) / std.
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

CACHE_T = 2  # frames of input history a kernel-3 causal conv needs

# One cache slot per stateful conv; None = this conv has seen no frame yet.
Cache = list[Optional[torch.Tensor]]


@dataclass
class VAEStreamState:
    """Per-session streaming state: the conv caches of the encoder and of the decoder.

    Encode and decode are independent streams; reset one with `reset_encode`/`reset_decode`.
    """

    enc: Cache
    dec: Cache
    enc_started: bool = False
    dec_started: bool = False
    _enc_slots: int = field(default=0, repr=False)
    _dec_slots: int = field(default=0, repr=False)
    # the steady-state calls of this stream as CUDA graphs (WanVAE.use_graphs); a decode's are two parts:
    # its first frame, then the other three
    enc_graph: Optional[StepGraph] = field(default=None, repr=False)
    dec_graph: Optional[StepGraph] = field(default=None, repr=False)
    # frames of the next chunk encoded ahead (WanVAE.stream_encode_ahead): their feature frames, and
    # whether this stream ever did so (its chunks then all go front, then back)
    enc_ahead: list[torch.Tensor] = field(default_factory=list, repr=False)
    enc_split: bool = False

    @property
    def ahead_frames(self) -> int:
        return sum(f.shape[2] for f in self.enc_ahead)

    def reset_encode(self) -> None:
        self.enc = [None] * self._enc_slots
        self.enc_started = False
        self.enc_graph = None
        self.enc_ahead = []
        self.enc_split = False

    def reset_decode(self) -> None:
        self.dec = [None] * self._dec_slots
        self.dec_started = False
        self.dec_graph = None


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.stride(1) == 1


def _zeros_like_layout(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero frames shaped like x's, in x's memory layout (so torch.cat keeps that layout)."""
    b, c, _, h, w = x.shape
    fmt = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
    return torch.empty((b, c, frames, h, w), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()


def _history_tail(prev: Optional[torch.Tensor], x: torch.Tensor, n: int = CACHE_T) -> torch.Tensor:
    """Last `n` frames of cat(prev, x) along time, copying only those frames."""
    t = x.shape[2]
    if t >= n or prev is None:
        # clone: a view would keep the whole chunk's storage alive until the next call
        return x[:, :, -n:].clone()
    return torch.cat([prev[:, :, prev.shape[2] - (n - t):], x], 2)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B,C,T,H,W] -> [B*T,C,H,W]. For a channels-last 3D tensor this is a view that is channels-last
    2D, so per-frame 2D ops run on cuDNN's / ATen's NHWC kernels without a layout conversion."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _unframes(y: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = y.shape
    return y.reshape(b, bt // b, c, h, w).transpose(1, 2)


def _conv2d_per_frame(conv: nn.Conv2d, x: torch.Tensor, pad_right_bottom: bool = False,
                      upsample: bool = False, bias: bool = True) -> torch.Tensor:
    """A 2D conv on every frame of [B,C,T,H,W], optionally after zero-padding right/bottom by one or
    after a nearest 2x spatial upsample (nearest and nearest-exact agree for a factor of 2);
    `bias=False` leaves the conv's bias to the caller."""
    y = _frames(x)
    if pad_right_bottom:
        y = F.pad(y, (0, 1, 0, 1))
    if upsample:
        y = upsample2x_nearest(y)
    y = F.conv2d(y, conv.weight, conv.bias if bias else None, conv.stride, conv.padding)
    return _unframes(y, x.shape[0])


def _add_channel_bias(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x if bias is None else x + bias.view(1, -1, 1, 1, 1).to(x.dtype)


# A conv's bias is a pass of its own over the output on cuDNN. Where a conv's output goes straight into
# a ResidualBlock, the block adds the bias inside its first norm kernel and its residual kernel instead
# (`in_bias`); `forward_deferred` returns a block's output without its last conv's bias and that bias
# (None when it was added). Deferring stops at anything with zero padding in between (a conv of
# x + b is not conv(x) + const at the borders) and at frame 0 of a temporal resample (never biased).
Deferred = tuple[torch.Tensor, Optional[torch.Tensor]]


def _run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, cache: Optional[Cache],
                pending: Optional[torch.Tensor]) -> torch.Tensor:
    for block in blocks:
        if isinstance(block, ResidualBlock):
            x, pending = block(x, cache, in_bias=pending), None
            continue
        x = _add_channel_bias(x, pending)
        if isinstance(block, (Downsample, Upsample)):
            x, pending = block.forward_deferred(x, cache)
        else:
            x, pending = block(x, cache), None
    return _add_channel_bias(x, pending)


PADDED_IN_CHANNELS = 16  # RGB inputs of a conv are zero-padded to this on CUDA (see CausalConv3d._conv_padded)


def _frame_offset(view: torch.Tensor, base: torch.Tensor) -> Optional[int]:
    """Where along time a stretch of `base`'s frames starts (None if `view` is not such a stretch)."""
    if view.stride() != base.stride():
        return None
    offset, frame = view.data_ptr() - base.data_ptr(), base.stride(2) * base.element_size()
    return offset // frame if offset >= 0 and offset % frame == 0 else None


class CausalConv3d(nn.Conv3d):
    """3D conv that pads time on the past side only, with the past taken from a cache when streaming.

    Spatial padding is the conv's own (symmetric zeros); the temporal padding of 2*p frames goes
    entirely in front. In streaming mode the front frames are the cached tail of the input history
    (zeros where the history is shorter), so chunked processing equals whole-clip processing.
    """

    slot: int = -1  # index into the stream cache, assigned by WanVAE
    # The frames a stream's call brings through this conv when they may come in several runs (the
    # decoder's per-frame blocks: a chunk's frame 0, then frames 1-3): its window buffer holds them all.
    run_frames: int = 0

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(cin, cout, kernel, padding=(0, ph, pw))
        self.t_pad = 2 * pt

    def _conv(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        kt = self.kernel_size[0]
        bias_t = self.bias if bias else None
        if x.is_cuda and self.in_channels < 8:
            return self._conv_padded(x, bias)
        if x.is_cuda or kt == 1:
            # cuDNN convs get their bias added by torch in a pass of its own over the output; callers
            # that can fuse it into the next kernel pass bias=False
            return F.conv3d(x, self.weight, bias_t, self.stride, self.padding)
        # CPU: ATen's conv3d here is a slow reference loop; the same sum as one 2D conv over the
        # kt time-shifted frames stacked on channels runs on oneDNN (about 2x faster for `tiny`).
        b, c, t, h, w = x.shape
        frames = x.unfold(2, kt, 1).permute(0, 2, 5, 1, 3, 4).reshape(b * (t - kt + 1), kt * c, h, w)
        weight = self.weight.permute(0, 2, 1, 3, 4).reshape(self.out_channels, kt * c, *self.kernel_size[1:])
        y = F.conv2d(frames, weight, bias_t, padding=self.padding[1:])
        return y.view(b, t - kt + 1, *y.shape[1:]).transpose(1, 2)

    def _conv_padded(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """The conv with its 3 input channels (the encoder's RGB input) zero-padded to PADDED_IN_CHANNELS:
        cuDNN took 1.39 ms for the 480x832 chunk's first conv as it is and 1.04 ms padded to 16 on an
        H200 (8 channels: 1.55 ms; the decoder's 3-channel output gained nothing from padding). The
        zero channels add nothing to the sums."""
        ci, cip = self.in_channels, PADDED_IN_CHANNELS
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_padded_key", None) != key:
            w = self.weight.new_zeros((self.out_channels, cip, *self.kernel_size))
            w[:, :ci] = self.weight
            self._padded_weight, self._padded_key = w.contiguous(memory_format=torch.channels_last_3d), key
        fmt = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
        xp = x.new_zeros((x.shape[0], cip, *x.shape[2:])).contiguous(memory_format=fmt)
        xp[:, :ci] = x
        return F.conv3d(xp, self._padded_weight, self.bias if bias else None, self.stride, self.padding)

    def window(self, like: torch.Tensor, cache: Optional[Cache]) -> Optional[torch.Tensor]:
        """Streaming, channels-last (CUDA): a window [1, C, t_pad+T, H, W] for an input shaped like `like`,
        its first t_pad frames already holding this conv's history. The caller writes the T new frames
        into window[:, :, t_pad:] (the norm before this conv does, directly), then calls
        forward(None, cache, window=window): the chunk is never copied by a torch.cat. The window is a
        stretch of a buffer with room for the history and `run_frames` (or T) frames: a call whose frames
        come in several runs convolves each run where the one before left the history. None where this
        does not apply (not streaming, not channels-last, batch > 1, runs shorter than the history)."""
        b, c, t, h, w = like.shape
        room = max(t, self.run_frames)
        if cache is None or self.t_pad != CACHE_T or b != 1 or room < CACHE_T or not _is_channels_last(like):
            return None
        prev = cache[self.slot]
        base = None if prev is None else prev._base
        if (base is not None and base.shape == (1, c, CACHE_T + room, h, w) and base.dtype == like.dtype
                and prev.shape[2] == CACHE_T):
            start = _frame_offset(prev, base)
            if start is not None and start + CACHE_T + t <= base.shape[2]:
                return base[:, :, start : start + CACHE_T + t]  # the last run's buffer: the history is in place
        buf = torch.empty((1, c, CACHE_T + room, h, w), dtype=like.dtype, device=like.device,
                          memory_format=torch.channels_last_3d)
        have = 0 if prev is None else min(prev.shape[2], CACHE_T)
        if have < CACHE_T:
            buf[:, :, : CACHE_T - have].zero_()
        if have:
            buf[:, :, CACHE_T - have : CACHE_T].copy_(prev[:, :, prev.shape[2] - have :])
        return buf[:, :, : CACHE_T + t]

    def forward(self, x: Optional[torch.Tensor], cache: Optional[Cache] = None, bias: bool = True,
                window: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`bias=False` leaves the bias out: the caller adds it (fused into its next kernel). `window`:
        an input window from `window()`, filled by the caller (x is then unused)."""
        if window is not None:
            assert cache is not None
            y = self._conv(window, bias)
            base = window if window._base is None else window._base
            start = _frame_offset(window, base)
            assert start is not None, "a window is a stretch of its buffer's frames (window())"
            end = start + window.shape[2]
            if end == base.shape[2]:
                # The buffer is full: its last frames move to its head as the next call's history (one
                # copy; the regions do not overlap). The buffer is kept, so no call allocates a window or
                # copies the history into one, and under a CUDA graph the history stays the same memory.
                base[:, :, :CACHE_T].copy_(base[:, :, end - CACHE_T : end])
                head = 0
            else:  # more runs of this call follow: the history stays where it is, behind them
                head = end - CACHE_T
            prev = cache[self.slot]
            same = prev is not None and prev._base is base and _frame_offset(prev, base) == head
            cache[self.slot] = prev if same else base[:, :, head : head + CACHE_T]
            return y
        assert x is not None
        if cache is None:
            if self.t_pad:
                x = F.pad(x, (0, 0, 0, 0, self.t_pad, 0))
            return self._conv(x, bias)
        prev = cache[self.slot]
        cache[self.slot] = _history_tail(prev, x)
        parts = [x] if prev is None else [prev, x]
        missing = self.t_pad - (0 if prev is None else prev.shape[2])
        if missing > 0:
            parts.insert(0, _zeros_like_layout(x, missing))
        return self._conv(torch.cat(parts, 2) if len(parts) > 1 else x, bias)


class RMSNorm(nn.Module):
    """Channel RMS norm: x / ||x||_channels * sqrt(C) * gamma (no eps beyond F.normalize's 1e-12).

    `images` only selects the stored gamma shape of the checkpoint ((C,1,1) vs (C,1,1,1)).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor, silu: bool = False, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Norm of x + bias (a [C] bias the conv before left out)."""
        return rms_norm_channels(x, self.gamma, self.scale, silu, bias)


def _norm_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: Optional[Cache],
               bias: Optional[torch.Tensor] = None, conv_bias: bool = False) -> torch.Tensor:
    """conv(SiLU(norm(x + bias))), by default without the conv's own bias (the caller adds it later).
    Streaming on CUDA, the norm writes straight into the conv's input window behind the history."""
    win = conv.window(x, cache)
    if win is None:
        return conv(norm(x, silu=True, bias=bias), cache, bias=conv_bias)
    rms_norm_channels(x, norm.gamma, norm.scale, True, bias, out=win[:, :, CACHE_T:])
    return conv(None, cache, bias=conv_bias, window=win)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv plus a (1x1x1 conv when widths differ) shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Checkpoint layout: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None, in_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`in_bias`: a [C] bias that x still lacks (the conv before left it out)."""
        r = self.residual
        # both convs run without their bias: the first's goes into the next norm, the second's into
        # the residual add (two passes over the activations fewer per block); so does the shortcut
        # conv's, and so does in_bias (through the shortcut conv: W(x + b) = Wx + Wb)
        h = _norm_conv(r[0], r[2], x, cache, in_bias)
        h = _norm_conv(r[3], r[6], h, cache, r[2].bias)
        s = F.conv3d(x, self.shortcut.weight) if isinstance(self.shortcut, nn.Conv3d) else x
        return bias_residual_(h, self._residual_bias(in_bias, x), s)

    def _residual_bias(self, in_bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The residual kernel's bias: the second conv's, the shortcut conv's and in_bias (through the
        shortcut conv), summed in float32 at least. A function of the weights alone, so it is computed
        once and kept until a weight changes, not per call (nor per replay of a captured chunk)."""
        conv = isinstance(self.shortcut, nn.Conv3d)
        params = [self.residual[6].bias, *([self.shortcut.weight, self.shortcut.bias] if conv else []),
                  *([] if in_bias is None else [in_bias])]
        key = (x.dtype, conv, in_bias is None, tuple((p.data_ptr(), p._version) for p in params))
        if getattr(self, "_bias_key", None) == key:
            return self._bias
        acc = torch.promote_types(x.dtype, torch.float32)
        bias = self.residual[6].bias.detach().to(acc)
        if conv:
            bias = bias + self.shortcut.bias.to(acc)
        if in_bias is not None:
            b = in_bias.to(acc)
            bias = bias + (self.shortcut.weight.flatten(1).to(acc) @ b if conv else b)
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):  # a capture computes nothing yet
            self._bias_key, self._bias = key, bias
        return bias


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 4, 1)  # [b,t,h,w,c]: 1x1 convs become linears
        qkv = F.linear(y, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.view(b * t, 1, h * w, 3 * c).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        o = F.linear(o.reshape(b, t, h, w, c), self.proj.weight.view(c, c), self.proj.bias)
        return x + o.permute(0, 4, 1, 2, 3)


class Downsample(nn.Module):
    """Spatial /2 (pad right/bottom, stride-2 conv); optionally time /2 with a stride-2 time conv.

    Time: frame 0 passes through alone; later frames pair up as windows [f(2i), f(2i+1), f(2i+2)]
    of the whole history, so a stream must keep the last input frame.
    """

    slot: int = -1

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # index 0 held ZeroPad2d in the checkpoint's layout; the conv's key is resample.1.*
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
        self.temporal = temporal
        if temporal:
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return _add_channel_bias(*self.forward_deferred(x, cache))

    def forward_deferred(self, x: torch.Tensor, cache: Optional[Cache] = None) -> Deferred:
        """The output without its last conv's bias, and that bias (None: added)."""
        conv = self.resample[1]
        if not self.temporal:
            return _conv2d_per_frame(conv, x, pad_right_bottom=True, bias=False), conv.bias
        x = _conv2d_per_frame(conv, x, pad_right_bottom=True)
        if cache is None:
            prev, first = None, True
        else:
            prev = cache[self.slot]
            first = prev is None
            cache[self.slot] = x[:, :, -1:].clone()
        if first:
            # frame 0 is kept as is; the rest starts windowing at frame 0
            rest = self.time_conv(x) if x.shape[2] > 1 else None
            return (x[:, :, :1] if rest is None else torch.cat([x[:, :, :1], rest], 2)), None
        tc = self.time_conv
        return F.conv3d(torch.cat([prev, x], 2), tc.weight, None, tc.stride, tc.padding), tc.bias


class Upsample(nn.Module):
    """Optionally time x2 (causal time conv to 2C channels, interleaved), then spatial x2 + conv to C/2.

    Time: the first frame ever is not doubled, and the time conv's history starts after it (the
    reference zero-pads there instead of looking at frame 0).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # index 0 held the nearest-exact Upsample in the checkpoint's layout
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.temporal = temporal
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def _double_time(self, x: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # channel halves are the two output frames of each input frame: t0a t0b t1a t1b ...
        y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
        if _is_channels_last(x):
            return y.permute(0, 3, 1, 4, 5, 2).reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)
        return y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return _add_channel_bias(*self.forward_deferred(x, cache))

    def forward_deferred(self, x: torch.Tensor, cache: Optional[Cache] = None) -> Deferred:
        """The output without the spatial conv's bias, and that bias."""
        if self.temporal:
            first = cache is None or cache[self.time_conv.slot] is None
            if first:
                if cache is not None:
                    # empty history: the next frame's time conv sees zeros, not frame 0
                    b, c, _, h, w = x.shape
                    cache[self.time_conv.slot] = x.new_empty(b, c, 0, h, w)
                if x.shape[2] > 1:
                    x = torch.cat([x[:, :, :1], self._double_time(x[:, :, 1:], cache)], 2)
            else:
                x = self._double_time(x, cache)
        conv = self.resample[1]
        return _conv2d_per_frame(conv, x, upsample=True, bias=False), conv.bias


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_out: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_downsample: tuple[bool, ...]) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(dim_mult) - 1:
                blocks.append(Downsample(cout, temporal_downsample[i]))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, z_out, 3, padding=1))
        # Before the first temporal downsample every block is causal in time and one frame wide in its
        # output, so a chunk's frames can go through them one at a time, as they arrive (`front`); the
        # rest (`back`) needs the whole chunk. The front's convs keep room for a chunk's frames.
        temporal = [i for i, b in enumerate(blocks) if isinstance(b, Downsample) and b.temporal]
        self.front_until = temporal[0] if temporal else len(blocks)
        for m in (self.conv1, *self.downsamples[: self.front_until]):
            for conv in m.modules():
                if isinstance(conv, CausalConv3d):
                    conv.run_frames = 2 ** len(temporal)  # a later latent's frames

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.back(self.front(x, cache), cache)

    def front(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """conv1 and the blocks before the first temporal downsample: one feature frame per input frame;
        streaming, any run of frames in order (one at a time gives what all at once does)."""
        blocks = self.downsamples[: self.front_until]
        return _run_blocks(blocks, self.conv1(x, cache, bias=False), cache, self.conv1.bias)

    def back(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """The rest, over a whole chunk's (or a stream's frame 0's) feature frames."""
        x = _run_blocks((*self.downsamples[self.front_until :], *self.middle), x, cache, None)
        return _norm_conv(self.head[0], self.head[2], x, cache, conv_bias=True)

    def back_modules(self) -> tuple[nn.Module, ...]:
        return (*self.downsamples[self.front_until :], *self.middle, *self.head)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_upsample: tuple[bool, ...]) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous Upsample's conv halves the width
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(dim_mult) - 1:
                blocks.append(Upsample(cout, temporal_upsample[i]))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))
        # Past the last temporal upsample every block is causal in time and one frame wide in its
        # output, so each output frame can be finished on its own, in order (the history the frames
        # before it left is all it reads): `features` runs the blocks up to there, `frames` the rest.
        temporal = [i for i, b in enumerate(blocks) if isinstance(b, Upsample) and b.temporal]
        self.frames_from = temporal[-1] + 1 if temporal else 0
        for m in (*self.upsamples[self.frames_from :], self.head):
            for conv in m.modules():
                if isinstance(conv, CausalConv3d):
                    conv.run_frames = 2 ** len(temporal)  # a later latent's frames

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.frames(self.features(x, cache), cache)

    def features(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """conv1, the middle and the upsamples that multiply frames: one feature frame per output frame."""
        blocks = (*self.middle, *self.upsamples[: self.frames_from])
        return _run_blocks(blocks, self.conv1(x, cache, bias=False), cache, self.conv1.bias)

    def frames(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """Output frames from their feature frames; streaming, any run of them in order (one at a time
        gives what all at once does)."""
        x = _run_blocks(self.upsamples[self.frames_from :], x, cache, None)
        return _norm_conv(self.head[0], self.head[2], x, cache, conv_bias=True)


def _assign_slots(root: nn.Module) -> int:
    """Number the modules that keep streaming history; returns how many there are."""
    n = 0
    for m in root.modules():
        if isinstance(m, CausalConv3d) or (isinstance(m, Downsample) and m.temporal):
            m.slot = n
            n += 1
    return n


class LatentStats(nn.Module):
    """The Wan2.1 latent space's per-channel mean and std as float32 buffers, outside the state dict,
    kept float32 when the module is cast (.to(bf16) would round them; the map is done in float32)."""

    def add_latent_stats(self) -> None:
        self.register_buffer("latent_mean", torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1), persistent=False)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        super()._apply(fn, *args, **kwargs)
        self.latent_mean = self.latent_mean.float()
        self.latent_std = self.latent_std.float()
        return self


class WanVAE(LatentStats):
    """Wan2.1 VAE. Stateless: streaming history lives in a `VAEStreamState` from `new_stream_state`.

    Inputs are cast to the module's dtype (bf16 on GPU, float32 on CPU); outputs are in that dtype.
    Spatial sizes must be multiples of 8. Videos are [B,3,T,H,W] in [-1,1], latents [B,16,t,H/8,W/8].

    `channels_last` (None = on CUDA only) runs the activations in channels_last_3d layout: cuDNN's
    bf16 kernels are NDHWC, so this saves layout conversions around every conv (about 14% on
    encode, 4% on decode at 480x832 on an H100). Results are returned contiguous either way.
    """

    channels_last: Optional[bool] = None
    # Streamed 4-frame encodes and 1-latent decodes replay from a per-stream CUDA graph on CUDA
    # (engine.stream_graph); False keeps them eager (for comparisons).
    use_graphs: bool = True

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.z_dim = cfg.z_dim
        self.encoder = Encoder3d(cfg.dim, cfg.z_dim * 2, cfg.dim_mult, cfg.num_res_blocks,
                                 cfg.temporal_downsample)
        self.conv1 = nn.Conv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg.dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks,
                                 tuple(reversed(cfg.temporal_downsample)))
        self._enc_slots = _assign_slots(self.encoder)
        self._dec_slots = _assign_slots(self.decoder)
        # the encoder's back keeps its history in the last slots (modules are numbered in order)
        back = [m.slot for b in self.encoder.back_modules() for m in b.modules() if getattr(m, "slot", -1) >= 0]
        self._enc_back = slice(min(back), self._enc_slots)
        self.add_latent_stats()

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def new_stream_state(self) -> VAEStreamState:
        return VAEStreamState(enc=[None] * self._enc_slots, dec=[None] * self._dec_slots,
                              _enc_slots=self._enc_slots, _dec_slots=self._dec_slots)

    def _step_graph(self, name: str, history: slice = slice(None)) -> StepGraph:
        return StepGraph(f"the VAE {name}", history)

    def _graphs_for(self, x: torch.Tensor) -> bool:
        return self.use_graphs and x.is_cuda

    # -- latent (de)normalisation and heads -------------------------------------------------

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent_mean.device != device:
            # built on the meta device and loaded with assign=True: the buffers never got values
            self.latent_mean = torch.tensor(LATENT_MEAN, device=device).view(1, -1, 1, 1, 1)
            self.latent_std = torch.tensor(LATENT_STD, device=device).view(1, -1, 1, 1, 1)
        return self.latent_mean, self.latent_std

    def _mu(self, h: torch.Tensor, normalize: bool) -> torch.Tensor:
        # only the mu half of conv1's output is ever used
        w, b = self.conv1.weight[: self.z_dim], self.conv1.bias[: self.z_dim]
        mu = F.conv3d(h, w, b)
        if normalize:
            mean, std = self._stats(mu.device)
            mu = ((mu.float() - mean) / std).to(mu.dtype)
        return mu

    def _unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z.device)
        z = (z.float() * std + mean).to(self.dtype)
        return self.conv2(z)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Cast to the module dtype and the chosen memory layout in one copy."""
        cl = x.is_cuda if self.channels_last is None else self.channels_last
        if cl:
            self._weights_channels_last()
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=fmt)

    def _weights_channels_last(self) -> None:
        """Conv weights in NDHWC / NHWC too. With contiguous weights cuDNN returns some convs' outputs
        contiguous, and from there the layout falls back to NCDHW along the chain (conversions before
        every later conv, and norms that cannot use the fused kernel), as a layout trace showed."""
        if getattr(self, "_cl_weights", False):
            return
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                    fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                    m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        self._cl_weights = True

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B,3,T,H,W], got {tuple(video.shape)}")
        if video.shape[3] % 8 or video.shape[4] % 8:
            raise ValueError(f"H and W must be multiples of 8, got {tuple(video.shape[3:])}")

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.z_dim or z.shape[2] < 1:
            raise ValueError(f"latent must be [B,{self.z_dim},t>=1,h,w], got {tuple(z.shape)}")

    # -- whole clip (offline reference path) ------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode a whole clip of 1+4k frames to 1+k latents in one pass (no chunking).

        Same convention as `stream_encode`: raw mu unless `normalize`. Memory grows with T; use
        the streaming path for long clips.
        """
        self._check_video(video)
        if video.shape[2] % 4 != 1:
            raise ValueError(f"encode needs 1+4k frames, got {video.shape[2]}")
        return self._mu(self.encoder(self._prepare(video)), normalize).contiguous()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents [B,16,t,h,w] to 1+4(t-1) frames in [-1,1], in one pass."""
        self._check_latent(latent)
        return self.decoder(self._prepare(self._unnormalize(latent))).clamp_(-1, 1).contiguous()

    # -- streaming --------------------------------------------------------------------------

    @torch.no_grad()
    def stream_encode(self, video: torch.Tensor, state: VAEStreamState,
                      normalize: bool = False) -> torch.Tensor:
        """Encode the next chunk of a stream: 1+4k frames on the first call, then 4k (less the frames
        given to `stream_encode_ahead` since the last call); k latents per 4 frames (plus 1 for frame 0).

        Quirk kept for parity with the reference (StreamDiffusionV2 calls its stream encode with
        scale=None): the result is the raw posterior mean mu, NOT (mu - mean) / std, although
        `stream_decode` de-normalises its input. Pass `normalize=True` for the standard convention.
        Frame 0 is encoded alone, later frames in groups of 4, as the reference does.
        """
        self._check_video(video)
        t = video.shape[2]
        x = self._prepare(video)
        outs = []
        if not state.enc_started:
            if t % 4 != 1:
                raise ValueError(f"first stream_encode call needs 1+4k frames, got {t}")
            outs.append(self.encoder(x[:, :, :1], state.enc))
            state.enc_started = True
            x = x[:, :, 1:]
        elif t == 0 or (state.ahead_frames + t) % 4:
            raise ValueError(f"stream_encode needs 4k frames after the first call (with the {state.ahead_frames} "
                             f"encoded ahead), got {t}")
        while x.shape[2]:
            take = 4 - state.ahead_frames
            outs.append(self._encode_chunk(x[:, :, :take], state))
            x = x[:, :, take:]
        h = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        return self._mu(h, normalize).contiguous()

    @torch.no_grad()
    def stream_encode_ahead(self, video: torch.Tensor, state: VAEStreamState) -> None:
        """Frames of a stream's next chunk, before the chunk is whole: they go through the encoder's
        per-frame blocks now (`Encoder3d.front`, most of its work), and the `stream_encode` call that
        brings the chunk's last frames finishes it. Only after the stream's frame 0, and fewer than 4."""
        self._check_video(video)
        if not state.enc_started:
            raise ValueError("a stream's frame 0 is encoded alone, by stream_encode")
        if state.ahead_frames + video.shape[2] >= 4:
            raise ValueError(f"at most 3 frames of a chunk go ahead, got {video.shape[2]} after {state.ahead_frames}")
        if not state.enc_split:  # this stream's chunks go front, then back, from now on
            state.enc_split, state.enc_graph = True, None
        state.enc_ahead.append(self.encoder.front(self._prepare(video), state.enc))

    def _encode_chunk(self, x: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """A later chunk's features from its last frames `x` (all 4 unless some went ahead): the whole
        encoder as one CUDA graph; or, in a stream that encodes ahead, the front for these frames (eager:
        they come at any count) and the back over the chunk's features as one CUDA graph."""
        graphs = self._graphs_for(x)
        if not state.enc_split:
            if graphs:
                state.enc_graph = state.enc_graph or self._step_graph("encode")
                return state.enc_graph(self.encoder, x, state.enc)
            return self.encoder(x, state.enc)
        feats = [*state.enc_ahead, self.encoder.front(x, state.enc)]
        state.enc_ahead = []
        h = feats[0] if len(feats) == 1 else torch.cat(feats, 2)
        if graphs:
            state.enc_graph = state.enc_graph or self._step_graph("encode's back", self._enc_back)
            return state.enc_graph(self.encoder.back, h, state.enc)
        return self.encoder.back(h, state.enc)

    @torch.no_grad()
    def stream_decode(self, latent: torch.Tensor, state: VAEStreamState) -> torch.Tensor:
        """Decode the next normalised latents of a stream to frames in [-1,1].

        The first call gives 1+4(t-1) frames for t latents (the first latent yields one frame),
        later calls 4t. Latents are decoded one at a time, as the reference does.
        """
        parts = list(self.stream_decode_parts(latent, state))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    @torch.no_grad()
    def stream_decode_parts(self, latent: torch.Tensor, state: VAEStreamState) -> Iterator[torch.Tensor]:
        """`stream_decode`'s frames in parts, each decoded only when the caller asks for it: a later call's
        single latent gives its first frame alone, then the other three, so that the caller can queue the
        first frame's copy to the host ahead of the others' decode. Take every part: the stream's history
        is whole only after the last."""
        self._check_latent(latent)
        if state.dec_started and latent.shape[2] == 1:
            if self._graphs_for(latent):
                state.dec_graph = state.dec_graph or self._step_graph("decode")
                yield from state.dec_graph.parts(self._decode_parts, latent, state.dec, count=2)  # type: ignore[misc]
            else:
                yield from self._decode_parts(latent, state.dec)
            return
        x = self._prepare(self._unnormalize(latent))
        outs = [self.decoder(x[:, :, i:i + 1], state.dec) for i in range(x.shape[2])]
        state.dec_started = True
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        yield out.clamp_(-1, 1).contiguous()

    def _decode_parts(self, latent: torch.Tensor, cache: Cache) -> Iterator[torch.Tensor]:
        """A later latent's frame 0, then its frames 1-3 (graph-captured, a graph per part)."""
        x = self.decoder.features(self._prepare(self._unnormalize(latent)), cache)
        yield self.decoder.frames(x[:, :, :1], cache).clamp_(-1, 1).contiguous()
        yield self.decoder.frames(x[:, :, 1:], cache).clamp_(-1, 1).contiguous()
