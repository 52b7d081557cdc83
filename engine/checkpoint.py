"""Read (and, for tests and benchmarks, write) exactly the files users download (docs/ARCHITECTURE.md §4):

    <weights>/Wan2.1-T2V-1.3B/            config.json, diffusion_pytorch_model*.safetensors,
                                           models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth,
                                           google/umt5-xxl/ (tokenizer)
    <weights>/wan_causal_dmd_v2v/model.pt  StreamDiffusionV2 causal DiT: weights under the first of
                                           generator / generator_ema / state_dict, or at top level,
                                           keys possibly prefixed `model.`

Loading is strict: a missing file, or missing / unexpected / mis-shaped keys, is a CheckpointError that
names them. Pickles are read with weights_only=True (and mmap). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig

log = logging.getLogger(__name__)

DIT_PREFIXES = ("generator", "generator_ema", "state_dict")
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"


class CheckpointError(ValueError):
    """A weights file is missing or does not match the architecture."""


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(
        f"{k} {list(state[k].shape)} != {list(want[k].shape)}"
        for k in set(want) & set(state)
        if tuple(state[k].shape) != tuple(want[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the {type(module).__name__} architecture: " + "; ".join(problems))


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Strict load; `assign` adopts the (mmap'd) tensors instead of copying into existing ones."""
    check_state_dict(module, state, source)
    module.load_state_dict(state, strict=True, assign=assign)


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # mmap needs the zip format; legacy pickles load without it (still weights_only)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None


def read_causal_dit(path: Path) -> dict[str, torch.Tensor]:
    """The DiT state dict from a StreamDiffusionV2 model.pt, with any `model.` prefix removed."""
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for key in DIT_PREFIXES:
        if key in obj:
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no tensor dict under {', '.join(DIT_PREFIXES)} or at top level")
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in obj.items()}


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise CheckpointError(f"missing diffusion_pytorch_model*.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
    return state


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj  # type: ignore[return-value]


def check_wan_config(folder: Path, cfg: ModelConfig) -> None:
    """The folder's config.json must describe the same DiT as our model config."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    data = json.loads(path.read_text())
    d = cfg.dit
    expect = {"dim": d.dim, "ffn_dim": d.ffn_dim, "num_heads": d.num_heads, "num_layers": d.num_layers}
    wrong = [f"{k}={data.get(k)} (model {cfg.name} has {v})" for k, v in expect.items() if data.get(k) != v]
    if wrong:
        raise CheckpointError(f"{path} does not describe {cfg.name}: " + ", ".join(wrong))


class WeightsLayout:
    """Where each file of a model lives under a user's weights directory."""

    def __init__(self, root: Path, cfg: ModelConfig) -> None:
        if cfg.weights_folder is None:
            raise CheckpointError(f"model {cfg.name} has no published weights; it runs with random weights only")
        self.root = Path(root)
        self.folder = self.root / cfg.weights_folder
        self.causal = self.root / cfg.causal_checkpoint if cfg.causal_checkpoint else None
        self.cfg = cfg
        if not self.folder.is_dir():
            raise CheckpointError(f"missing weights folder {self.folder}")

    @property
    def t5(self) -> Path:
        return self.folder / T5_FILE

    @property
    def vae(self) -> Path:
        return self.folder / VAE_FILE

    @property
    def tokenizer(self) -> Path:
        return self.folder / TOKENIZER_DIR

    def dit_state(self) -> dict[str, torch.Tensor]:
        check_wan_config(self.folder, self.cfg)
        if self.causal is not None and self.causal.is_file():
            return read_causal_dit(self.causal)
        raise CheckpointError(
            f"missing the StreamDiffusionV2 causal checkpoint {self.causal}; the base Wan2.1 DiT in "
            f"{self.folder} is not distilled for few-step streaming"
        )


# -- writers: real layouts, for tests and benchmarks --------------------------------------------------

def write_causal_dit(path: Path, state: Mapping[str, torch.Tensor], wrapper: Optional[str] = "generator", prefix: bool = True) -> None:
    sd = {(f"model.{k}" if prefix else k): v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrapper: sd} if wrapper else sd, path)


def write_wan_folder(folder: Path, cfg: ModelConfig, dit_state: Mapping[str, torch.Tensor],
                     vae_state: Optional[Mapping[str, torch.Tensor]], t5_state: Optional[Mapping[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.dit
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": d.dim, "ffn_dim": d.ffn_dim,
        "num_heads": d.num_heads, "num_layers": d.num_layers, "in_dim": d.in_dim, "out_dim": d.out_dim,
        "text_len": d.text_len, "text_dim": d.text_dim, "freq_dim": d.freq_dim, "eps": d.eps, "patch_size": list(d.patch_size),
        "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
    }))
    save_file({k: v.contiguous() for k, v in dit_state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    if vae_state is not None:
        torch.save(dict(vae_state), folder / VAE_FILE)
    if t5_state is not None:
        torch.save(dict(t5_state), folder / T5_FILE)


STAND_IN_WORDS = ("hello", "world", "a", "cat", "on", "the", "moon", "red", "fox", "jumps")


def write_tokenizer_folder(wan_folder: Path) -> Path:
    """A small stand-in for `google/umt5-xxl/` in the same file layout (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json) and the T5 special ids (<pad>=0, </s>=1, <unk>=2):
    a Unigram model over a few words and the letters. For random-weight trees only; users bring the
    real folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in STAND_IN_WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    folder = Path(wan_folder) / TOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 512}))
    return folder
