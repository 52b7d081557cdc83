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

Decoder = Literal["wan", "taehv", "lightvae"]  # latents -> pixels: the Wan VAE, or a light one (below)
DECODERS: tuple[str, ...] = get_args(Decoder)
Encoder = Literal["wan", "taehv", "lightvae"]  # pixels -> latents, chosen independently of the decoder
ENCODERS: tuple[str, ...] = get_args(Encoder)
CODEC_NAMES: dict[str, str] = {"wan": "Wan VAE", "taehv": "light TAEHV", "lightvae": "LightVAE"}
# The light networks and the file each needs (option name, flag, what the file is).
LIGHT_FILES: dict[str, tuple[str, str, str]] = {
    "taehv": ("taehv_weights", "--taehv-weights", "the taew2_1.pth file of the TAEHV project"),
    "lightvae": ("lightvae_weights", "--lightvae-weights", "lightvaew2_1.pth, LightX2V's pruned Wan VAE"),
}
# KV cache and first-chunk schedule: ours, or the reference package's exactly (README "Where we differ")
KVPolicy = Literal["ours", "reference"]
KV_POLICIES: tuple[str, ...] = get_args(KVPolicy)
# The engine's number format; fp8: bf16 with the DiT blocks' linear layers as FP8 matmuls (README "FP8
# (Hopper/Ada)"), refused at start-up off a GPU with FP8 tensor cores. None (unset): bf16 on CUDA, else float32
DType = Literal["float32", "bfloat16", "float16", "fp8"]
DTYPES: tuple[str, ...] = get_args(DType)


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
