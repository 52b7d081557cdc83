"""The model catalogue: which models exist (YAML files under configs/models) and the few facts about
them that the server needs before the engine starts (which model to run, where its weights live, which
decoder choices are consistent). engine.config reads the same files into its full ModelConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

Decoder = Literal["wan", "taehv"]  # latents -> pixels: the Wan VAE, or the light TAEHV decoder
# KV cache and first-chunk schedule: ours, or the reference package's exactly (README "Where we differ")
KVPolicy = Literal["ours", "reference"]
KV_POLICIES: tuple[str, ...] = get_args(KVPolicy)
DECODERS: tuple[str, ...] = get_args(Decoder)


class ConfigError(ValueError):
    """A configuration file is missing or has a bad value; the message names the file and field."""


class ModelEntry(BaseModel):
    """A model file's catalogue facts; the rest of the file is the engine's (engine.config.ModelConfig)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    weights_folder: Optional[str] = None  # under --weights, when the model has published weights


def model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_model_file(name_or_path: str | Path) -> tuple[Path, dict]:
    """The YAML mapping of `tiny`, `wan-1.3b`, `wan-14b` (from configs/models) or of a YAML file path."""
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
    return path, data


def validation_problems(path: Path, exc: ValidationError) -> ConfigError:
    """One ConfigError naming the file and every bad field."""
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())
    return ConfigError(f"{path}: {problems}")


def load_model_file(name_or_path: str | Path, model: type[M]) -> M:
    """A model's file read as `model` (the catalogue's entry, or the engine's full config);
    ConfigError for an unknown model or a broken file."""
    path, data = read_model_file(name_or_path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problems(path, exc) from None


def model_entry(name_or_path: str | Path) -> ModelEntry:
    """The catalogue facts of one model."""
    return load_model_file(name_or_path, ModelEntry)


def decoder_problem(decoder: Decoder, taehv_weights: object, weights: object, cli: bool = False,
                    check_file: bool = False) -> Optional[str]:
    """Why a decoder choice is inconsistent, or None. One rule for the engine options, the render
    CLI and the server config: the light TAEHV decoder needs its file (taew2_1.pth) whenever the model
    has real weights; with random model weights a seeded random TAEHV is fine. `cli` names the flags.
    Callers validate `decoder` against Decoder first. `check_file`: a given taehv_weights must also be
    an existing file (the command lines check it up front; the engine fails on it when loading)."""
    dec, file = ("--decoder", "--taehv-weights") if cli else ("decoder", "taehv_weights")
    if taehv_weights is not None and decoder != "taehv":
        return f"{file} is only used with {dec} taehv"
    if decoder == "taehv" and taehv_weights is None and weights is not None:
        return (f"{dec} taehv with real model weights needs {file}: the taew2_1.pth file of the "
                "TAEHV project (random TAEHV weights are only used with random model weights)")
    if check_file and taehv_weights is not None and not Path(str(taehv_weights)).is_file():
        return f"{file} {taehv_weights}: no such file"
    return None
