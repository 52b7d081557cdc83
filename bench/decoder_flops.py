"""Work per streamed 4-frame chunk of the two decoders (Wan VAE, TAEHV) at a real size, counted with
torch's FlopCounterMode on the meta device: no weights, no data, no GPU, seconds on any machine.
A FLOP count is not a speed: time the decoders on the target card before quoting speed-ups.

    python -m bench.decoder_flops [--height 480 --width 832]
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import VAEConfig
from engine.taehv import TAEHV
from engine.vae import WanVAE

log = logging.getLogger("bench.decoder_flops")


def chunk_flops(model: torch.nn.Module, h: int, w: int) -> int:
    """FLOPs of one steady-state stream_decode call (1 latent -> 4 frames), after a first call."""
    state = model.new_stream_state()  # type: ignore[operator]
    z = torch.empty(1, 16, 1, h // 8, w // 8, device="meta")
    model.stream_decode(z, state)  # type: ignore[operator]  # the stream's first latent (-> 1 frame)
    with FlopCounterMode(display=False) as counter:
        model.stream_decode(z, state)  # type: ignore[operator]
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with torch.device("meta"):
        models = {"wan": WanVAE(VAEConfig()).eval(), "taehv": TAEHV().eval()}
    params = {k: sum(p.numel() for n, p in m.named_parameters() if k == "taehv" or n.startswith(("decoder.", "conv2.")))
              for k, m in models.items()}
    flops = {k: chunk_flops(m, args.height, args.width) for k, m in models.items()}
    for k in models:
        log.info("%-5s decoder: %6.1f M params, %7.2f TFLOP per 4-frame chunk at %dx%d", k, params[k] / 1e6,
                 flops[k] / 1e12, args.height, args.width)
    log.info("ratio wan/taehv: %.1fx the work", flops["wan"] / flops["taehv"])


if __name__ == "__main__":
    main()
