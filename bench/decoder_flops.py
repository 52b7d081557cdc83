"""Work per streamed 4-frame chunk of each encoder and decoder (Wan VAE, TAEHV, LightVAE) at a real size, counted
with torch's FlopCounterMode on the meta device: no weights, no data, no GPU, seconds on any machine.
A FLOP count is not a speed: time them on the target card before quoting speed-ups.

    python -m bench.decoder_flops [--height 480 --width 832]

It also splits a Wan VAE (and LightVAE) encode of a chunk whose first three frames went ahead
(docs/ARCHITECTURE.md §8): the work done ahead and the work left after the chunk's last frame.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import VAEConfig, lightvae_config
from engine.taehv import TAEHV
from engine.vae import WanVAE

log = logging.getLogger("bench.decoder_flops")


def _steady_flops(first: Callable[[], object], step: Callable[[], object]) -> int:
    """FLOPs of `step` after `first` (a stream's first call, whose frame counts differ) has run."""
    first()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def decode_flops(model: torch.nn.Module, h: int, w: int) -> int:
    """FLOPs of one steady-state stream_decode call (1 latent -> 4 frames), after a first call."""
    state = model.new_stream_state()  # type: ignore[operator]
    z = torch.empty(1, 16, 1, h // 8, w // 8, device="meta")
    return _steady_flops(lambda: model.stream_decode(z, state), lambda: model.stream_decode(z, state))  # type: ignore[operator]


def encode_flops(model: torch.nn.Module, h: int, w: int) -> int:
    """FLOPs of one steady-state stream_encode call (4 frames -> 1 latent), after frame 0's call."""
    state = model.new_stream_state()  # type: ignore[operator]
    frame0 = torch.empty(1, 3, 1, h, w, device="meta")
    chunk = torch.empty(1, 3, 4, h, w, device="meta")
    return _steady_flops(lambda: model.stream_encode(frame0, state), lambda: model.stream_encode(chunk, state))  # type: ignore[operator]


def encode_ahead_flops(model: WanVAE, h: int, w: int) -> tuple[int, int]:
    """A steady chunk's encode with its first three frames given ahead (`stream_encode_ahead`): the FLOPs
    done ahead, and those left for the call with its last frame."""
    state = model.new_stream_state()
    frame = torch.empty(1, 3, 1, h, w, device="meta")
    model.stream_encode(frame, state)
    with FlopCounterMode(display=False) as counter:
        for _ in range(3):
            model.stream_encode_ahead(frame, state)
    ahead = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model.stream_encode(frame, state)
    return ahead, counter.get_total_flops()


def _params(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    h, w = args.height, args.width
    with torch.device("meta"):
        models = {"wan": WanVAE(VAEConfig()).eval(), "taehv": TAEHV(with_encoder=True).eval(),
                  "lightvae": WanVAE(lightvae_config(VAEConfig())).eval()}
    # a Wan VAE's (and LightVAE's) encoder side includes conv1 (-> mu), its decoder side conv2 (the
    # latent's 1x1 conv); TAEHV's parts are `encoder.` and `decoder.`
    sides = {"encoder": (("encoder.", "conv1."), encode_flops), "decoder": (("decoder.", "conv2."), decode_flops)}
    for side, (prefixes, count) in sides.items():
        flops = {k: count(m, h, w) for k, m in models.items()}
        for k, m in models.items():
            log.info("%-8s %s: %6.1f M params, %7.2f TFLOP per 4-frame chunk at %dx%d (wan/%s: %.1fx)", k, side,
                     _params(m, prefixes) / 1e6, flops[k] / 1e12, h, w, k, flops["wan"] / flops[k])
    for k in ("wan", "lightvae"):
        ahead, left = encode_ahead_flops(models[k], h, w)  # type: ignore[arg-type]
        log.info("%-8s encoder, 3 frames ahead: %.2f TFLOP ahead, %.2f TFLOP after the last frame (%.1f%%)",
                 k, ahead / 1e12, left / 1e12, 100.0 * left / (ahead + left))


if __name__ == "__main__":
    main()
