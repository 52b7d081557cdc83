"""Write a complete weights directory in the real layouts (docs/ARCHITECTURE.md §4) at a small size, plus a model
config that points at it, so the real loading path can be tested without the real files."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from engine.checkpoint import write_causal_dit, write_wan_folder
from engine.config import load_model_config
from engine.dit import WanDiT
from engine.text_encoder import UMT5Encoder
from engine.vae import WanVAE
from tests.test_text_encoder import _write_tiny_umt5_folder

SMALL = {
    "name": "small-real",
    "weights_folder": "Wan2.1-T2V-small",
    "causal_checkpoint": "wan_causal_dmd_v2v/model.pt",
    "dit": {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2},
    "vae": {"dim": 4},
    "text": {"vocab_size": 64, "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "num_buckets": 32},
    "stream": {"height": 64, "width": 64, "steps": 2, "num_kv_cache": 6, "num_sink": 3, "sink_refresh_threshold": 0.2},
}


def write_small_weights(root: Path, seed: int = 0) -> tuple[Path, dict]:
    """Returns (config yaml path, the state dicts written) ."""
    cfg_path = root / "small-real.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    cfg = load_model_config(cfg_path)
    torch.manual_seed(seed)
    dit, vae, t5 = WanDiT(cfg.dit), WanVAE(cfg.vae), UMT5Encoder(cfg.text)
    states = {"dit": dit.state_dict(), "vae": vae.state_dict(), "t5": t5.state_dict()}
    folder = root / cfg.weights_folder
    write_wan_folder(folder, cfg, states["dit"], states["vae"], states["t5"])
    _write_tiny_umt5_folder(folder)
    write_causal_dit(root / cfg.causal_checkpoint, states["dit"], wrapper="generator", prefix=True)
    return cfg_path, states
