"""TAEHV: a light video decoder for Wan2.1 latents (the `taew2_1.pth` file of the TAEHV project).

Users who choose speed over fidelity can decode the DiT's latents with this small 2D-conv network
instead of the Wan VAE decoder. The Wan VAE encoder stays the input path: only the decoder runs here.

Architecture (fixed by the checkpoint; module paths equal its keys, `decoder.N.…`):

    0 soft clamp 3·tanh(z/3)        1 conv 16->256, 2 ReLU        3-5 MemBlock(256)
    6 nearest x2   7 TGrow(256, 1)  8 conv 256->128 (no bias)     9-11 MemBlock(128)
    12 nearest x2  13 TGrow(128, 2) 14 conv 128->64 (no bias)     15-17 MemBlock(64)
    18 nearest x2  19 TGrow(64, 2)  20 conv 64->64 (no bias), 21 ReLU, 22 conv 64->3

All convs are 3x3 per frame (padding 1). A MemBlock sees its input frame and the previous frame's
input to the same block (zeros before the first frame): ReLU(convs(cat(x_t, x_{t-1})) + skip(x_t)).
A TGrow turns each frame into `stride` frames with a 1x1 conv to stride·C channels (group k = the k-th
output frame). Two TGrows of stride 2 give Wan's 4 pixel frames per latent; three nearest x2 give its
spatial stride 8.

Conventions, chosen so the session can swap this for `WanVAE.stream_decode`:
- input: normalised Wan latents [B, 16, t, h, w] (the same tensors the Wan decoder takes; TAEHV was
  trained on them as is, without de-normalisation);
- output: [B, 3, T, 8h, 8w] in [-1, 1], contiguous, in the module's dtype. The network itself
  produces values that are meant to lie in [0, 1]; we map y -> 2y - 1 and clamp, which equals the
  TAEHV project's clamp to [0, 1] followed by that map;
- frame count: t latents give 4t frames, but the first 3 frames of a stream are dropped (the TAEHV
  project's `frames_to_trim`), so a stream's first call gives 4t - 3 frames (1 for 1 latent, 5 for
  the 2 latents of a first 5-frame chunk) and later calls 4t: the Wan VAE's counts.

Streaming: every MemBlock needs the last frame of its input history; those tensors live in a
`TAEHVStreamState` owned by the session (never on the module), so one module serves many sessions.
Decoding a stream latent by latent (or chunk by chunk) equals decoding the whole clip at once. The
reference wrapper instead decodes each new latent together with the 3 before it and keeps the last
frames: 4x the work, and only an approximation, since the stacked memories reach back further.

Checkpoint: `taew2_1.pth` holds `decoder.*` and `encoder.*` tensors. We keep only the decoder but
check the encoder's keys and shapes too when they are present, so a wrong or truncated file is named,
not half-loaded. The reference trims the rows of a TGrow's weight when it builds a decoder with less
time upscaling than the file; we always upscale time 4x, so the file's shapes must equal ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import CheckpointError, check_state_dict, read_tensor_file

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # Wan2.1's z_dim; taew2_2 (Wan2.2, 48 channels) is a different file and is not supported
DECODER_WIDTHS = (256, 128, 64, 64)
ENCODER_WIDTH = 64
TIME_SCALE = 4  # pixel frames per latent frame
SPACE_SCALE = 8
FRAMES_TO_TRIM = TIME_SCALE - 1  # the first latent decodes to 4 frames; Wan gives 1


def _conv3x3(cin: int, cout: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """3·tanh(x/3): keeps latents far outside the training range from blowing up the decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over (this frame, previous frame's input to this block)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Checkpoint layout: conv.0, conv.2, conv.4 (ReLUs in between); skip only when widths differ.
        self.conv = nn.Sequential(
            _conv3x3(2 * cin, cout), nn.ReLU(), _conv3x3(cout, cout), nn.ReLU(), _conv3x3(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)).add_(self.skip(x)))


class TGrow(nn.Module):
    """Each frame -> `stride` frames: a 1x1 conv to stride·C channels, channel group k = frame k."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, s·C, H, W] -> [N·s, C, H, W] keeps frame order: frame n's outputs are rows n·s .. n·s+s-1
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TPool(nn.Module):
    """`stride` frames -> 1 (encoder only; kept so the file's encoder keys can be checked)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)


def _decoder_layers() -> nn.Sequential:
    a, b, c, d = DECODER_WIDTHS
    return nn.Sequential(
        SoftClamp(), _conv3x3(LATENT_CHANNELS, a), nn.ReLU(),
        MemBlock(a, a), MemBlock(a, a), MemBlock(a, a),
        nn.Upsample(scale_factor=2), TGrow(a, 1), _conv3x3(a, b, bias=False),
        MemBlock(b, b), MemBlock(b, b), MemBlock(b, b),
        nn.Upsample(scale_factor=2), TGrow(b, 2), _conv3x3(b, c, bias=False),
        MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
        nn.Upsample(scale_factor=2), TGrow(c, 2), _conv3x3(c, d, bias=False), nn.ReLU(),
        _conv3x3(d, 3),
    )


def _encoder_layers() -> nn.Sequential:
    w = ENCODER_WIDTH
    layers: list[nn.Module] = [_conv3x3(3, w), nn.ReLU()]
    for stride in (2, 2, 1):
        layers += [TPool(w, stride), _conv3x3(w, w, bias=False, stride=2), MemBlock(w, w), MemBlock(w, w), MemBlock(w, w)]
    return nn.Sequential(*layers, _conv3x3(w, LATENT_CHANNELS))


@dataclass
class TAEHVStreamState:
    """Per-stream decoder history: the last input frame of each MemBlock ([B, C, h, w]; None before
    the first call), and whether the stream's first frames were trimmed already."""

    memory: list[Optional[torch.Tensor]]
    started: bool = False
    _slots: int = field(default=0, repr=False)

    def reset(self) -> None:
        self.memory = [None] * self._slots
        self.started = False


class TAEHV(nn.Module):
    """The TAEHV decoder for Wan2.1 latents. Stateless: the streaming history lives in a
    `TAEHVStreamState` from `new_stream_state`, one per stream.

    `with_encoder` builds the encoder's layers too; they have no forward here and serve only to check
    a file's `encoder.*` keys (build it on the meta device for that: see `load_taehv`).
    """

    def __init__(self, with_encoder: bool = False) -> None:
        super().__init__()
        if with_encoder:
            self.encoder = _encoder_layers()
        self.decoder = _decoder_layers()
        self._mem_slots = sum(isinstance(m, MemBlock) for m in self.decoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    def new_stream_state(self) -> TAEHVStreamState:
        return TAEHVStreamState(memory=[None] * self._mem_slots, _slots=self._mem_slots)

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != LATENT_CHANNELS or z.shape[2] < 1:
            raise ValueError(f"latent must be [B,{LATENT_CHANNELS},t>=1,h,w], got {tuple(z.shape)}")

    @staticmethod
    def _past(x: torch.Tensor, rows: int, prev: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """For frames x [B·T, C, H, W] (row-major: B then T), each frame's previous frame (the stream's
        remembered one, or zeros, before the first), and the last frame of each row to remember."""
        bt, c, h, w = x.shape
        frames = x.view(rows, bt // rows, c, h, w)
        if prev is None:
            prev = x.new_zeros(rows, c, h, w)
        elif prev.shape != (rows, c, h, w):
            raise ValueError(f"stream state holds frames {tuple(prev.shape)}, this chunk has {(rows, c, h, w)}: "
                             "a stream keeps its batch and size")
        past = torch.cat([prev[:, None], frames[:, :-1]], 1).view(bt, c, h, w)
        # clone: a view would keep the whole chunk's activations alive until the next call
        return past, frames[:, -1].clone()

    @torch.no_grad()
    def stream_decode(self, latent: torch.Tensor, state: TAEHVStreamState) -> torch.Tensor:
        """Decode the next normalised latents [B,16,t,h,w] of a stream to frames [B,3,T,8h,8w] in [-1,1]:
        4t - 3 frames on the stream's first call, 4t afterwards (the Wan VAE's counts).

        All t latents of a call run as one batch of frames: a MemBlock's `past` is the previous frame
        within the chunk, or the state's remembered frame for the chunk's first.
        """
        self._check_latent(latent)
        b, c, t, h, w = latent.shape
        x = latent.to(self.dtype).transpose(1, 2).reshape(b * t, c, h, w)
        slot = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                past, state.memory[slot] = self._past(x, b, state.memory[slot])
                x = layer(x, past)
                slot += 1
            else:
                x = layer(x)
        frames = x.shape[0] // b
        video = x.view(b, frames, 3, x.shape[2], x.shape[3]).transpose(1, 2)
        if not state.started:
            video = video[:, :, FRAMES_TO_TRIM:]
            state.started = True
        return video.mul(2).sub_(1).clamp_(-1, 1).contiguous()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip of t latents to 1 + 4(t-1) frames (a stream of one call)."""
        return self.stream_decode(latent, self.new_stream_state())


# -- files --------------------------------------------------------------------------------------------

def check_taehv_state(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict check of a taew2_1.pth-style state dict: every decoder key with its shape, and the
    encoder's too if the file has any encoder key. Raises CheckpointError naming the problems."""
    with_encoder = any(k.startswith("encoder.") for k in state)
    with torch.device("meta"):
        expected = TAEHV(with_encoder=with_encoder)
    check_state_dict(expected, state, source)


def load_taehv(path: Union[str, Path]) -> TAEHV:
    """The decoder from a taew2_1.pth file (CPU, float32 as stored); nothing is downloaded."""
    path = Path(path)
    state = read_tensor_file(path)
    check_taehv_state(state, str(path))
    model = TAEHV()
    decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    model.decoder.load_state_dict(decoder, strict=True)
    log.info("TAEHV decoder loaded from %s", path)
    return model


def random_taehv_state(seed: int, with_encoder: bool = True) -> dict[str, torch.Tensor]:
    """A state dict in the taew2_1.pth format with seeded random weights.

    PyTorch's default conv init shrinks activations layer after layer, so that after ~25 layers the
    output would be nearly constant and a parity test would compare almost nothing. Normal weights
    of std 1/sqrt(fan_in), with the MemBlocks' last conv halved so the residual sums do not grow,
    keep activations at a std of 0.2-0.6 through the whole decoder (measured); the head is set so the
    output spreads over [0, 1] (the range the network is trained for) with a few values clamped.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = TAEHV(with_encoder=with_encoder)
    shapes = model.state_dict()
    # decoder first, so the decoder's weights do not depend on whether the encoder is written
    names = sorted(shapes, key=lambda k: not k.startswith("decoder."))
    state: dict[str, torch.Tensor] = {}
    for name in names:
        p = shapes[name]
        if name.endswith("bias"):
            t = torch.randn(p.shape, generator=g) * 0.05
        else:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5
            if name.endswith("conv.4.weight"):
                t *= 0.5
        state[name] = t
    state[f"decoder.{len(model.decoder) - 1}.bias"] += 0.5  # the head: centre the output in [0, 1]
    return state


def write_taehv(path: Union[str, Path], seed: int = 0, with_encoder: bool = True) -> dict[str, torch.Tensor]:
    """Write a random-weight file in the taew2_1.pth format (for tests and benchmarks); returns its state."""
    path = Path(path)
    state = random_taehv_state(seed, with_encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def random_taehv(seed: int) -> TAEHV:
    """A decoder with the weights `write_taehv(path, seed)` would write (for random-weight engines)."""
    model = TAEHV()
    state = random_taehv_state(seed, with_encoder=False)
    model.decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items()}, strict=True)
    return model

