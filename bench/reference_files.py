"""Write a random-weight model tree in the real file layouts (docs/ARCHITECTURE.md §4), at real size, for benchmarks
that load through a real loader — ours and the reference package's:

    <root>/wan_models/Wan2.1-T2V-1.3B/           config.json, diffusion_pytorch_model.safetensors,
                                                  Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
                                                  google/umt5-xxl/ (a stand-in tokenizer)
    <root>/wan_models/wan_causal_dmd_v2v/model.pt the causal DiT under `generator`, keys `model.`-prefixed

`<root>` is what the reference reads as STREAMDIFFUSIONV2_ROOT; `<root>/wan_models` is our `--weights`.
The weights come from our own seeded builders on the GPU (fast), are written in the files' own dtypes
(VAE float32, umT5 bf16; the DiT in bf16, where the published files are float32, to halve the 14B's
56 GB), and a tree already written is reused. Files that are the same for every model (umT5, VAE,
tokenizer) are written once and hard-linked.

    python -m bench.reference_files --root /dev/shm/ref --models wan-1.3b,wan-14b
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from engine.checkpoint import T5_FILE, VAE_FILE, write_causal_dit, write_tokenizer_folder, write_wan_folder
from engine.config import ModelConfig, load_model_config
from engine.build import _building, build_dit, build_vae
from engine.text_encoder import UMT5Encoder

log = logging.getLogger("bench.files")

DONE = ".complete"


def _cpu(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.detach().to("cpu", dtype) for k, v in state.items()}


def _shared_file(shared: Path, name: str, make) -> Path:
    """One copy of a model-independent file under `shared`, built on first use."""
    path = shared / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(make(), tmp)
        tmp.rename(path)
    return path


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: a symlink reads the same
        dst.symlink_to(src)


@torch.no_grad()
def write_tree(root: Path, model: str, seed: int = 0, device: str = "cuda", shared: Optional[Path] = None) -> Path:
    """Writes (or reuses) the tree of `model`; returns <root>/wan_models. `shared` (default <root>/shared)
    holds the model-independent files, linked into each tree."""
    shared = shared or root / "shared"
    cfg: ModelConfig = load_model_config(model)
    weights = root / "wan_models"
    folder = weights / cfg.weights_folder  # type: ignore[operator]
    if (folder / DONE).is_file():
        log.info("%s: reusing %s", model, folder)
        return weights
    t0 = time.perf_counter()
    dev = torch.device(device)
    dtype = torch.bfloat16

    def vae_state() -> dict:
        return _cpu(build_vae(cfg, None, dev, dtype, seed).state_dict(), torch.float32)

    def t5_state() -> dict:
        torch.manual_seed(seed)
        with _building(dev, dtype):
            enc = UMT5Encoder(cfg.text)
        state = _cpu(enc.state_dict(), torch.bfloat16)
        del enc
        return state

    vae_file = _shared_file(shared, f"vae-{cfg.vae.dim}.pth", vae_state)
    t5_file = _shared_file(shared, f"umt5-{cfg.text.dim}x{cfg.text.num_layers}.pth", t5_state)
    gc.collect()
    torch.cuda.empty_cache()

    dit = _cpu(build_dit(cfg, None, dev, dtype, seed).state_dict(), torch.bfloat16)
    torch.cuda.empty_cache()
    write_wan_folder(folder, cfg, dit, None, None)  # config.json + safetensors; the shared files linked below
    _link(vae_file, folder / VAE_FILE)
    _link(t5_file, folder / T5_FILE)
    write_tokenizer_folder(folder)
    write_causal_dit(weights / cfg.causal_checkpoint, dit, wrapper="generator", prefix=True)  # type: ignore[operator]
    del dit
    gc.collect()
    (folder / DONE).write_text("")
    log.info("%s: wrote %s in %.0f s", model, folder, time.perf_counter() - t0)
    return weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--models", default="wan-1.3b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shared", type=Path, default=None, help="where the model-independent files go")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for m in args.models.split(","):
        write_tree(args.root, m, args.seed, args.device, args.shared)


if __name__ == "__main__":
    main()
