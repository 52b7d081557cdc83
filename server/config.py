"""Server configuration: an optional YAML/JSON file, overridden by command-line flags."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import ConfigError, load_model_config  # torch-free by contract
from interface.messages import WorkerOptions

log = logging.getLogger(__name__)

TINY = "tiny"


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    model: Optional[str] = Field(None, description="None: `real_model` when its weights exist, else tiny")
    real_model: str = Field("wan-1.3b", description="the model used by default when --weights has it")
    weights: Optional[Path] = None
    devices: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    height: Optional[int] = Field(None, gt=0, multiple_of=16)
    width: Optional[int] = Field(None, gt=0, multiple_of=16)
    seed: int = Field(0, ge=0)
    deadline_s: float = Field(1.0, gt=0.0, description="per-frame latency budget (miss rate)")
    max_sessions: int = Field(4, ge=1, le=64)
    output_size: Literal["camera", "crop", "model"] = Field(
        "camera",
        description="camera: the input's size; crop: the camera region the model saw; model: as generated",
    )
    stats_interval_s: float = Field(1.0, gt=0.0)
    default_prompt: str = "a watercolor painting, soft colors"
    engine_start_timeout_s: float = Field(900.0, gt=0.0)
    ice_servers: list[str] = Field(default_factory=list, description="STUN/TURN URLs for the server peer")
    log_level: str = "INFO"


def resolve_model(config: ServerConfig) -> tuple[str, Optional[Path]]:
    """Which model the engine runs and with which weights root.

    An explicit `model` is taken as is (a real model without weights runs with random weights).
    Otherwise the configured real model runs when its weights folder exists under `weights`,
    else `tiny` (random weights).
    """
    if config.model:
        if config.weights is not None and load_model_config(config.model).weights_folder is None:
            log.warning("model %s has no published weights: ignoring --weights %s", config.model, config.weights)
            return config.model, None
        return config.model, config.weights
    real = load_model_config(config.real_model)
    if config.weights is not None and real.weights_folder:
        folder = config.weights / real.weights_folder
        if folder.is_dir():
            return real.name, config.weights
        log.warning("weights folder %s not found: falling back to model %s", folder, TINY)
    return TINY, None


def worker_options(config: ServerConfig) -> WorkerOptions:
    model, weights = resolve_model(config)
    return WorkerOptions(
        model=model,
        weights=str(weights) if weights else None,
        device=config.devices,
        height=config.height,
        width=config.width,
        seed=config.seed,
        log_level=config.log_level,
    )


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data.get("server", data)  # a shared file may keep the server's part under `server:`


def parse_args(argv: Optional[list[str]] = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="python -m server", description="Real-time generative video server")
    parser.add_argument("--model", help="tiny, wan-1.3b, wan-14b or a model YAML (default: see --weights)")
    parser.add_argument("--weights", type=Path, help="folder holding Wan2.1-T2V-*/ and wan_causal_dmd_v2v*/")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8080)")
    parser.add_argument("--devices", help="auto, cpu, cuda or cuda:N (default auto: the engine decides)")
    parser.add_argument("--config", type=Path, help="YAML or JSON file with ServerConfig fields")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING")
    args = parser.parse_args(argv)
    data = _read_file(args.config) if args.config else {}
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    data.update(overrides)
    try:
        config = ServerConfig.model_validate(data)
        if config.model:
            load_model_config(config.model)  # fail now on an unknown model, not in the engine
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(f"bad configuration: {problems}")
    except ConfigError as exc:
        parser.error(str(exc))
    return config
