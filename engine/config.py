"""Model and stream configuration: YAML files under configs/models, validated with pydantic.

This module imports no torch so that tools and tests can validate configs cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ConfigError(ValueError):
    """A configuration file is missing or has a bad value; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiTConfig(_Strict):
    """Causal Wan DiT (DESIGN §2). head_dim = dim / num_heads."""

    dim: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6

    @model_validator(mode="after")
    def _check_heads(self) -> "DiTConfig":
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class VAEConfig(_Strict):
    """Wan VAE: causal 3D conv encoder/decoder; 4 pixel frames <-> 1 latent frame, stride 8."""

    dim: int = Field(96, gt=0)
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)


class TextConfig(_Strict):
    """umT5 encoder (DESIGN §2)."""

    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_buckets: int = 32
    text_len: int = 512


class StreamDefaults(_Strict):
    """Per-model defaults of the streaming algorithm (DESIGN §3)."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    steps: int = Field(ge=1, le=4)
    num_kv_cache: int = Field(ge=2)
    num_sink: int = Field(ge=0)
    sink_refresh_threshold: Optional[float] = None
    rope_reset_frames: int = Field(50, ge=2)
    noise_strength: float = Field(0.8, ge=0.0, le=1.0)
    noise_strength_min: float = Field(0.7, ge=0.0, le=1.0)
    motion_sigma: float = Field(0.2, gt=0.0)
    motion_smoothing: float = Field(0.9, ge=0.0, le=1.0)
    transition_chunks: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "StreamDefaults":
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        if self.num_sink >= self.num_kv_cache - 1:
            raise ValueError("num_sink must leave at least two rolling frames in num_kv_cache")
        return self


class ModelConfig(_Strict):
    name: str
    weights_folder: Optional[str] = None
    causal_checkpoint: Optional[str] = None
    dit: DiTConfig
    vae: VAEConfig = VAEConfig()
    text: TextConfig
    stream: StreamDefaults

    @model_validator(mode="before")
    @classmethod
    def _text_dim_follows_encoder(cls, data: dict) -> dict:
        # The DiT's text_embedding input width is the encoder's width unless stated.
        if isinstance(data, dict) and isinstance(data.get("dit"), dict) and isinstance(data.get("text"), dict):
            data["dit"].setdefault("text_dim", data["text"].get("dim", 4096))
        return data


Decoder = Literal["wan", "taehv", "lightvae"]  # latents -> pixels: the Wan VAE, or a light one (below)
DECODERS: tuple[str, ...] = get_args(Decoder)
Encoder = Literal["wan", "taehv", "lightvae"]  # pixels -> latents, chosen independently of the decoder
ENCODERS: tuple[str, ...] = get_args(Encoder)
# The light networks and the file each needs (option name, flag, what the file is).
LIGHT_FILES: dict[str, tuple[str, str, str]] = {
    "taehv": ("taehv_weights", "--taehv-weights", "the taew2_1.pth file of the TAEHV project"),
    "lightvae": ("lightvae_weights", "--lightvae-weights", "lightvaew2_1.pth, LightX2V's pruned Wan VAE"),
}
# LightVAE is the Wan VAE with 75 % of every layer's channels pruned (its publishers' code builds the Wan
# VAE with each width scaled by 1 - 0.75 and loads lightvaew2_1.pth into it with the Wan VAE's keys).
LIGHTVAE_KEPT = 4  # 1 / (1 - 0.75): a LightVAE's widths are the Wan VAE's divided by this


def lightvae_config(vae: VAEConfig) -> VAEConfig:
    """The LightVAE of a model's Wan VAE: every width a quarter (base dim 96 -> 24)."""
    if vae.dim % LIGHTVAE_KEPT:
        raise ConfigError(f"LightVAE keeps a quarter of the VAE's channels: dim {vae.dim} is not a multiple of 4")
    return vae.model_copy(update={"dim": vae.dim // LIGHTVAE_KEPT})


def decoder_problem(decoder: Decoder, taehv_weights: object, weights: object, cli: bool = False,
                    check_file: bool = False, encoder: Encoder = "wan", lightvae_weights: object = None) -> Optional[str]:
    """Why an encoder/decoder choice is inconsistent, or None. One rule for the engine options, the
    render CLI and the server config: a light encoder or decoder (TAEHV, LightVAE) needs its file
    whenever the model has real weights; with random model weights seeded random weights are fine, and
    a file is only given for a network in use. `cli` names the flags. Callers validate
    `decoder`/`encoder` against Decoder/Encoder first. `check_file`: a given file must also exist (the
    command lines check it up front; the engine fails on it when loading)."""
    dec, enc = ("--decoder", "--encoder") if cli else ("decoder", "encoder")
    files = {"taehv": taehv_weights, "lightvae": lightvae_weights}
    for kind, (option, flag, what) in LIGHT_FILES.items():
        file, given = (flag if cli else option), files[kind]
        users = [f"{name} {kind}" for name, choice in ((dec, decoder), (enc, encoder)) if choice == kind]
        if given is not None and not users:
            return f"{file} is only used with {dec} {kind} or {enc} {kind}"
        if users and given is None and weights is not None:
            return (f"{' and '.join(users)} with real model weights needs {file}: {what} (random {kind} "
                    "weights are only used with random model weights)")
        if check_file and given is not None and not Path(str(given)).is_file():
            return f"{file} {given}: no such file"
    return None


def model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Load `tiny`, `wan-1.3b`, `wan-14b` (from configs/models) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown model {str(name_or_path)!r}; choose one of {', '.join(model_names())}")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
