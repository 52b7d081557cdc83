"""Model and stream configuration: the catalogue's YAML files (interface.catalogue) validated whole.

This module imports no torch so that tools and tests can validate configs cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from interface.catalogue import ConfigError, KVPolicy, load_model_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiTConfig(_Strict):
    """Causal Wan DiT (docs/ARCHITECTURE.md §4). head_dim = dim / num_heads."""

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
    """umT5 encoder (docs/ARCHITECTURE.md §4)."""

    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_buckets: int = 32
    text_len: int = 512


class StreamDefaults(_Strict):
    """Per-model defaults of the streaming algorithm (docs/ARCHITECTURE.md §3)."""

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
    # ours, or the reference package's KV cache and first-chunk timestep exactly (engine/kv_policy.py)
    kv_policy: KVPolicy = "ours"

    @model_validator(mode="after")
    def _check(self) -> "StreamDefaults":
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        if self.num_sink >= self.num_kv_cache - 1:
            raise ValueError("num_sink must leave at least two rolling frames in num_kv_cache")
        return self


class HubRepos(_Strict):
    """Where a model's published files live on the Hugging Face Hub (read by `python -m engine fetch`)."""

    wan: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")  # the Wan2.1 repository, fetched into <weights>/<weights_folder>/
    causal: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")  # the repository holding <weights>/<causal_checkpoint>


class ModelConfig(_Strict):
    name: str
    weights_folder: Optional[str] = None
    causal_checkpoint: Optional[str] = None
    hub: Optional[HubRepos] = None
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


# LightVAE is the Wan VAE with 75 % of every layer's channels pruned (its publishers' code builds the Wan
# VAE with each width scaled by 1 - 0.75 and loads lightvaew2_1.pth into it with the Wan VAE's keys).
LIGHTVAE_KEPT = 4  # 1 / (1 - 0.75): a LightVAE's widths are the Wan VAE's divided by this


def lightvae_config(vae: VAEConfig) -> VAEConfig:
    """The LightVAE of a model's Wan VAE: every width a quarter (base dim 96 -> 24)."""
    if vae.dim % LIGHTVAE_KEPT:
        raise ConfigError(f"LightVAE keeps a quarter of the VAE's channels: dim {vae.dim} is not a multiple of 4")
    return vae.model_copy(update={"dim": vae.dim // LIGHTVAE_KEPT})


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Load `tiny`, `wan-1.3b`, `wan-14b` (from configs/models) or a YAML file path (the catalogue's files)."""
    return load_model_file(name_or_path, ModelConfig)
