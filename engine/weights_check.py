"""Open every file the engine reads from a weights directory with the strict loaders, without building
the model: the modules are made on the meta device, so only keys and shapes are compared and the
(memory-mapped) tensors are never copied. `python -m engine fetch` ends with this, so that a broken or
wrong download is reported when it is fetched rather than when the server starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, WeightsLayout, check_state_dict, read_tensor_file
from engine.config import ModelConfig, VAEConfig, lightvae_config


def check_model_weights(root: Path, cfg: ModelConfig) -> list[Path]:
    """The files of model `cfg` under `root` (the `--weights` directory), each checked as the engine
    loads it. Returns the files checked; raises CheckpointError naming the first bad one."""
    from engine.dit import WanDiT
    from engine.text_encoder import TextEncoder, UMT5Encoder
    from engine.tokenizer import UMT5Tokenizer
    from engine.vae import WanVAE

    layout = WeightsLayout(root, cfg)
    with torch.device("meta"):
        dit, vae, t5 = WanDiT(cfg.dit), WanVAE(cfg.vae), UMT5Encoder(cfg.text)
    check_state_dict(dit, layout.dit_state(), str(layout.causal))  # also checks config.json
    check_state_dict(vae, read_tensor_file(layout.vae), str(layout.vae))
    check_state_dict(t5, read_tensor_file(layout.t5), str(layout.t5))
    try:
        TextEncoder(t5, UMT5Tokenizer.from_folder(layout.tokenizer, cfg.text.text_len))  # vocabulary fits
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"tokenizer {layout.tokenizer}: {exc}") from None
    assert layout.causal is not None  # dit_state() has read it
    return [layout.folder / "config.json", layout.causal, layout.vae, layout.t5, layout.tokenizer]


def check_taehv_file(path: Path) -> list[Path]:
    """A taew2_1.pth file, checked as `load_taehv` reads it."""
    from engine.taehv import check_taehv_state

    check_taehv_state(read_tensor_file(path), str(path))
    return [path]


def check_lightvae_file(path: Path, vae: VAEConfig = VAEConfig()) -> list[Path]:
    """A lightvaew2_1.pth file, checked as `engine.build.build_lightvae` loads it (the Wan VAE's keys at
    a quarter of the widths of `vae`, the Wan2.1 VAE by default)."""
    from engine.vae import WanVAE

    with torch.device("meta"):
        light = WanVAE(lightvae_config(vae))
    check_state_dict(light, read_tensor_file(path), f"{path} (LightVAE)")
    return [path]
