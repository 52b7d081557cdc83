"""TAEHV: a light video encoder and decoder for Wan2.1 latents (the `taew2_1.pth` file of the TAEHV
project).

Users who choose speed over fidelity can encode the input frames and/or decode the DiT's latents with
this small 2D-conv network instead of the Wan VAE; encoder and decoder are chosen independently.

Decoder architecture (fixed by the checkpoint; module paths equal its keys, `decoder.N.…`):

    0 soft clamp 3·tanh(z/3)        1 conv 16->256, 2 ReLU        3-5 MemBlock(256)
    6 nearest x2   7 TGrow(256, 1)  8 conv 256->128 (no bias)     9-11 MemBlock(128)
    12 nearest x2  13 TGrow(128, 2) 14 conv 128->64 (no bias)     15-17 MemBlock(64)
    18 nearest x2  19 TGrow(64, 2)  20 conv 64->64 (no bias), 21 ReLU, 22 conv 64->3

All convs are 3x3 per frame (padding 1). A MemBlock sees its input frame and the previous frame's
input to the same block (zeros before the first frame): ReLU(convs(cat(x_t, x_{t-1})) + skip(x_t)).
A TGrow turns each frame into `stride` frames with a 1x1 conv to stride·C channels (group k = the k-th
output frame). Two TGrows of stride 2 give Wan's 4 pixel frames per latent; three nearest x2 give its
spatial stride 8.

Encoder architecture (`encoder.N.…`): 0 conv 3->64, 1 ReLU, then three times [TPool(64, s), conv
64->64 stride 2 (no bias), 3 MemBlock(64)] with s = 2, 2, 1, and 17 conv 64->16. A TPool turns `s`
consecutive frames into one (their channels stacked, a 1x1 conv back to 64): 4 frames per latent.

Encoder conventions, chosen so the session can swap this for `WanVAE.stream_encode`:
- input: frames [B, 3, T, H, W] in [-1, 1] (mapped to the [0, 1] the network was trained on);
- frame alignment: Wan's latent 0 is frame 0 alone and latent i frames 4i-3..4i. A stream's first
  call takes 1+4k frames and puts 3 copies of frame 0 in front of them, so that every group of 4 the
  encoder pools is a Wan group: latent 0 is [f0, f0, f0, f0] (which is also how the TAEHV project
  encodes a single image: it pads at the end with copies of the last frame), latent i is f(4i-3..4i).
  The decoder's 3 trimmed frames are the same alignment seen from its side. The engine must encode
  frame 0 on its own anyway (it arrives before frames 1-4), so a stream can't take the TAEHV project's
  other choice for videos, padding the clip's end, which groups f0..f3 and shifts every later latent
  by 3 frames;
- output: TAEHV's latent space is Wan's *normalised* one ((mu - mean) / std: the TAEHV project
  applies no latent scale or shift, it encodes what the diffusion model uses). `stream_encode`
  returns the raw mean mu = z·std + mean unless `normalize=True`, the convention of
  `WanVAE.stream_encode` (whose raw output the engine feeds the DiT, as the reference does).

Decoder conventions, chosen so the session can swap this for `WanVAE.stream_decode`:
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
Decoding a stream latent by latent (or chunk by chunk) equals decoding the whole clip at once, and
encoding it 4 frames at a time equals encoding it whole (a chunk is whole groups of 4). The
reference wrapper instead decodes each new latent together with the 3 before it and keeps the last
frames: 4x the work, and only an approximation, since the stacked memories reach back further.

Checkpoint: `taew2_1.pth` holds `decoder.*` and `encoder.*` tensors. We load the parts asked for but
check every key and shape the file has, so a wrong or truncated file is named, not half-loaded. The
reference trims the rows of a TGrow's weight when it builds a decoder with less time upscaling than the
file; we always upscale time 4x, so the file's shapes must equal ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoint import CheckpointError, check_state_dict, read_tensor_file
from engine.vae import LatentStats

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
    """`stride` consecutive frames -> 1: their channels stacked, a 1x1 conv back to C (encoder only)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N·s, C, H, W] (frames row-major, a row's frame count a multiple of s) -> [N, s·C, H, W]
        n, c, h, w = x.shape
        return self.conv(x.reshape(n // self.stride, self.stride * c, h, w))


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
    """Per-stream history: the last input frame of each MemBlock ([B, C, h, w]; None before the first
    call), of the decoder (`memory`) and of the encoder (`enc_memory`), and whether each direction's
    first call (trimmed frames, padded frame 0) is done. A session keeps one state per direction."""

    memory: list[Optional[torch.Tensor]]
    started: bool = False
    enc_memory: list[Optional[torch.Tensor]] = field(default_factory=list)
    enc_started: bool = False
    enc_ahead: list[torch.Tensor] = field(default_factory=list)  # frames of the next chunk, given ahead
    _slots: int = field(default=0, repr=False)
    _enc_slots: int = field(default=0, repr=False)

    def reset(self) -> None:
        self.memory = [None] * self._slots
        self.started = False
        self.enc_memory = [None] * self._enc_slots
        self.enc_started = False
        self.enc_ahead = []


def _mem_slots(layers: Optional[nn.Sequential]) -> int:
    return 0 if layers is None else sum(isinstance(m, MemBlock) for m in layers)


class TAEHV(LatentStats):
    """The TAEHV encoder and/or decoder for Wan2.1 latents. Stateless: the streaming history lives in a
    `TAEHVStreamState` from `new_stream_state`, one per stream and direction.

    `with_encoder` / `with_decoder` choose the parts built (a pipeline rank builds only the part it
    runs). Building both on the meta device serves to check a file's keys (see `check_taehv_state`).
    """

    def __init__(self, with_encoder: bool = False, with_decoder: bool = True) -> None:
        super().__init__()
        if not (with_encoder or with_decoder):
            raise ValueError("a TAEHV needs its encoder, its decoder or both")
        if with_encoder:
            self.encoder = _encoder_layers()
        if with_decoder:
            self.decoder = _decoder_layers()
        self._enc_slots = _mem_slots(getattr(self, "encoder", None))
        self._mem_slots = _mem_slots(getattr(self, "decoder", None))
        self.add_latent_stats()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "encoder")

    @property
    def has_decoder(self) -> bool:
        return hasattr(self, "decoder")

    def new_stream_state(self) -> TAEHVStreamState:
        return TAEHVStreamState(memory=[None] * self._mem_slots, enc_memory=[None] * self._enc_slots,
                                _slots=self._mem_slots, _enc_slots=self._enc_slots)

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != LATENT_CHANNELS or z.shape[2] < 1:
            raise ValueError(f"latent must be [B,{LATENT_CHANNELS},t>=1,h,w], got {tuple(z.shape)}")

    @staticmethod
    def _check_video(video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B,3,T,H,W], got {tuple(video.shape)}")
        if video.shape[3] % SPACE_SCALE or video.shape[4] % SPACE_SCALE:
            raise ValueError(f"H and W must be multiples of {SPACE_SCALE}, got {tuple(video.shape[3:])}")

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

    def _run(self, layers: nn.Sequential, x: torch.Tensor, rows: int, memory: list[Optional[torch.Tensor]]) -> torch.Tensor:
        """All frames of a call [rows·T, C, H, W] through `layers` as one batch: a MemBlock's `past` is
        the previous frame within the call, or the remembered one for a row's first (updated here)."""
        slot = 0
        for layer in layers:
            if isinstance(layer, MemBlock):
                past, memory[slot] = self._past(x, rows, memory[slot])
                x = layer(x, past)
                slot += 1
            else:
                x = layer(x)
        return x

    @torch.no_grad()
    def stream_encode(self, video: torch.Tensor, state: TAEHVStreamState, normalize: bool = False) -> torch.Tensor:
        """Encode the next frames [B,3,T,H,W] in [-1,1] of a stream: 1+4k frames on its first call (frame
        0 gets a latent of its own, as in Wan), then 4k; one latent [B,16,·,H/8,W/8] per 4 frames.

        Returns the raw latent mean (the engine's convention, as `WanVAE.stream_encode`) unless
        `normalize`, which gives TAEHV's own output: normalised Wan latents."""
        if not self.has_encoder:
            raise ValueError("this TAEHV was built without its encoder")
        self._check_video(video)
        if state.enc_ahead:
            video, state.enc_ahead = torch.cat([*state.enc_ahead, video], 2), []
        b, _, t, h, w = video.shape
        x = video.to(self.dtype)
        first = not state.enc_started
        if first:
            if t % TIME_SCALE != 1:
                raise ValueError(f"first stream_encode call needs 1+4k frames, got {t}")
            # frame 0's group is 4 copies of it (module docstring: Wan's frame alignment)
            x = torch.cat([x[:, :, :1].expand(-1, -1, TIME_SCALE - 1, -1, -1), x], 2)
        elif t % TIME_SCALE or t == 0:
            raise ValueError(f"stream_encode needs 4k frames after the first call, got {t}")
        n = x.shape[2]
        frames = x.transpose(1, 2).reshape(b * n, 3, h, w).mul(0.5).add_(0.5)  # TAEHV works in [0, 1]
        z = self._run(self.encoder, frames, b, state.enc_memory)
        state.enc_started = True
        z = z.view(b, n // TIME_SCALE, LATENT_CHANNELS, h // SPACE_SCALE, w // SPACE_SCALE).transpose(1, 2)
        if not normalize:
            z = (z.float() * self.latent_std.to(z.device) + self.latent_mean.to(z.device)).to(self.dtype)
        return z.contiguous()

    @torch.no_grad()
    def stream_encode_ahead(self, video: torch.Tensor, state: TAEHVStreamState) -> None:
        """Frames of the stream's next chunk before it is whole (`WanVAE.stream_encode_ahead`'s contract):
        kept until `stream_encode` brings the rest. This encoder is too small for its work to be worth
        splitting (BENCHMARKS, "Encoder and decoder work per chunk")."""
        self._check_video(video)
        if not state.enc_started:
            raise ValueError("a stream's frame 0 is encoded alone, by stream_encode")
        if sum(v.shape[2] for v in state.enc_ahead) + video.shape[2] >= TIME_SCALE:
            raise ValueError(f"at most {TIME_SCALE - 1} frames of a chunk go ahead")
        state.enc_ahead.append(video)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode a whole clip of 1+4k frames to 1+k latents (a stream of one call)."""
        return self.stream_encode(video, self.new_stream_state(), normalize)

    @torch.no_grad()
    def stream_decode(self, latent: torch.Tensor, state: TAEHVStreamState) -> torch.Tensor:
        """Decode the next normalised latents [B,16,t,h,w] of a stream to frames [B,3,T,8h,8w] in [-1,1]:
        4t - 3 frames on the stream's first call, 4t afterwards (the Wan VAE's counts).

        All t latents of a call run as one batch of frames: a MemBlock's `past` is the previous frame
        within the chunk, or the state's remembered frame for the chunk's first.
        """
        if not self.has_decoder:
            raise ValueError("this TAEHV was built without its decoder")
        self._check_latent(latent)
        b, c, t, h, w = latent.shape
        x = latent.to(self.dtype).transpose(1, 2).reshape(b * t, c, h, w)
        x = self._run(self.decoder, x, b, state.memory)
        frames = x.shape[0] // b
        video = x.view(b, frames, 3, x.shape[2], x.shape[3]).transpose(1, 2)
        if not state.started:
            video = video[:, :, FRAMES_TO_TRIM:]
            state.started = True
        return video.mul(2).sub_(1).clamp_(-1, 1).contiguous()

    def stream_decode_parts(self, latent: torch.Tensor, state: TAEHVStreamState) -> Iterator[torch.Tensor]:
        """`stream_decode`'s frames as one part (the light decoder takes a few ms for all of them)."""
        yield self.stream_decode(latent, state)

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


def _part(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def _load_parts(model: TAEHV, state: Mapping[str, torch.Tensor]) -> TAEHV:
    for name in ("encoder", "decoder"):
        if hasattr(model, name):
            getattr(model, name).load_state_dict(_part(state, name), strict=True)
    return model


def load_taehv(path: Union[str, Path], encoder: bool = False, decoder: bool = True) -> TAEHV:
    """The parts asked for from a taew2_1.pth file (CPU, float32 as stored); nothing is downloaded.
    The whole file is checked either way; the encoder needs a file that has one."""
    path = Path(path)
    state = read_tensor_file(path)
    check_taehv_state(state, str(path))
    if encoder and not any(k.startswith("encoder.") for k in state):
        raise CheckpointError(f"{path} holds the TAEHV decoder only (no encoder.* tensors): the TAEHV encoder "
                              "needs the full taew2_1.pth")
    model = _load_parts(TAEHV(with_encoder=encoder, with_decoder=decoder), state)
    log.info("TAEHV %s loaded from %s", " and ".join(p for p, on in (("encoder", encoder), ("decoder", decoder)) if on), path)
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


def random_taehv(seed: int, encoder: bool = False, decoder: bool = True) -> TAEHV:
    """The parts asked for, with the weights `write_taehv(path, seed)` would write (for random-weight
    engines: the same seed gives the same weights whichever parts a process builds)."""
    return _load_parts(TAEHV(with_encoder=encoder, with_decoder=decoder), random_taehv_state(seed, with_encoder=encoder))
