"""Server configuration: an optional YAML/JSON file, overridden by command-line flags."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from interface.catalogue import (DECODERS, DTYPES, ENCODERS, KV_POLICIES, ConfigError, Decoder, DType, Encoder,
                                  KVPolicy, decoder_problem, model_entry)
from interface.controls import MAX_PROMPT_CHARS
from interface.devices import DeviceSpec
from interface.messages import WorkerOptions
from server.media.ice import IceServer, check_turn_credentials, servers_for_peer

log = logging.getLogger(__name__)

TINY = "tiny"
TOKEN_ENV = "STREAM_TOKEN"
TURN_SECRET_ENV = "STREAM_TURN_SECRET"


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    model: Optional[str] = Field(None, description="None: `real_model` when its weights exist, else tiny")
    real_model: str = Field("wan-1.3b", description="the model used by default when --weights has it")
    weights: Optional[Path] = None
    devices: DeviceSpec = "auto"
    height: Optional[int] = Field(None, gt=0, multiple_of=16)
    width: Optional[int] = Field(None, gt=0, multiple_of=16)
    seed: int = Field(0, ge=0)
    decoder: Decoder = Field(
        "wan", description="latents -> pixels: the Wan VAE, or a light one (taehv, lightvae: far less compute, lower fidelity)"
    )
    encoder: Encoder = Field(
        "wan", description="pixels -> latents: the Wan VAE, or a light one (taehv, lightvae: far less compute, lower fidelity)"
    )
    taehv_weights: Optional[Path] = Field(None, description="taew2_1.pth from the TAEHV project, for decoder or encoder taehv")
    lightvae_weights: Optional[Path] = Field(
        None, description="lightvaew2_1.pth (LightX2V's pruned Wan VAE), for decoder or encoder lightvae")
    step_lag: Optional[int] = Field(
        None, ge=1, le=8,
        description="forwards between a chunk's denoising steps; default: the number of ranks for a multi-step model"
                    " on several ranks (one stream keeps every rank busy), else 1",
    )
    kv_policy: Optional[KVPolicy] = Field(
        None, description="ours, or reference: the reference package's KV cache and first-chunk timestep exactly "
                          "(README 'Where we differ'); default: the model config's (ours)",
    )
    dtype: Optional[DType] = Field(
        None, description="the engine's number format; default: bfloat16 on a GPU, float32 on CPU; fp8: bf16 with the "
                          "DiT blocks' linear layers as FP8 matmuls (needs FP8 tensor cores: Ada/Hopper; README 'FP8')",
    )
    deadline_s: float = Field(1.0, gt=0.0, description="per-frame latency budget (miss rate)")
    max_sessions: int = Field(4, ge=1, le=64)
    output_size: Literal["camera", "crop", "model"] = Field(
        "camera",
        description="camera: the input's size; crop: the camera region the model saw; model: as generated",
    )
    pacing_percentile: float = Field(
        100.0, ge=50.0, le=100.0,
        description="share (percentile) of recent output bursts the playout delay lets come in time; below 100 the "
                    "rest are shown late as they come, for less delay (server/media/pacing.py)")
    pacing_window_s: float = Field(
        2.0, ge=0.25, le=30.0,
        description="seconds of recent output bursts the playout delay is sized from: a stall raises the delay at "
                    "once and is forgotten this long after (server/media/pacing.py)")
    encode_ahead: bool = Field(
        False,
        description="push each camera frame to the engine as it comes, so that its encode starts before its chunk is "
                    "whole (docs/ARCHITECTURE.md §8); off: a chunk's frames go together. Not timed on a GPU yet "
                    "(docs/BENCHMARKS.md)")
    stats_interval_s: float = Field(1.0, gt=0.0)
    default_prompt: str = "a watercolor painting, soft colors"
    engine_start_timeout_s: float = Field(900.0, gt=0.0)
    engine_max_restarts: int = Field(
        5, ge=0, le=100,
        description="engine restarts after crashes in a row (each within 2 minutes of its start); one more crash"
                    " and the server exits 1 for its supervisor to restart it",
    )
    ice_servers: list[IceServer] = Field(
        default_factory=list, description="STUN/TURN servers for every peer (server, page, WHIP/WHEP clients)"
    )
    turn_secret: Optional[SecretStr] = Field(
        None, description="TURN REST shared secret (coturn use-auth-secret): each peer gets its own time-limited "
                          "credentials for TURN servers given without them"
    )
    turn_ttl_s: int = Field(86400, ge=60, le=7 * 86400, description="how long minted TURN credentials stay valid")
    token: Optional[SecretStr] = Field(
        None, description="Bearer token; with token_scope all (the default) the API, WHIP, WHEP and /metrics need it, "
                          "with publish only WHIP and outputs; None: WHIP and outputs are open to loopback clients only"
    )
    max_viewers: int = Field(16, ge=1, le=256, description="WHEP viewers per session (each costs one encoder)")
    max_pending_viewers: int = Field(
        4, ge=1, le=256,
        description="WHEP viewers per session answered but not connected yet (a newer one replaces the oldest)",
    )
    viewer_connect_timeout_s: float = Field(
        15.0, gt=0.0, le=300.0, description="a WHEP viewer not connected (ICE + DTLS) within this is dropped"
    )
    max_outputs: int = Field(4, ge=1, le=16, description="recordings and restreams per session")
    recordings_dir: Path = Field(Path("recordings"), description="where `record` outputs write (relative paths only)")
    output_bitrate_kbps: int = Field(4000, ge=100, le=100_000, description="H.264 bitrate of restreams and recordings")
    virtual_camera: bool = Field(False, description="send the newest session's output to a virtual webcam")
    virtual_camera_device: Optional[str] = Field(None, description="e.g. /dev/video10; None: the first one found")
    virtual_camera_fps: int = Field(30, ge=1, le=120)
    log_level: str = "INFO"
    # -- access (docs/RELIABILITY.md) --
    token_scope: Literal["all", "publish"] = Field(
        "all",
        description="with a token, all: the API, WHIP and WHEP need it; publish: only WHIP and outputs (trusted networks)",
    )
    allow_anonymous: bool = Field(False, description="listen on a non-loopback address without a token")
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call the API/WHIP/WHEP from pages ('*': any); none: same origin only"
    )
    public_hosts: list[str] = Field(
        default_factory=list,
        description="host names the server answers to besides loopback names and its own addresses, e.g. the name "
                    "of a reverse proxy ('*': any, which gives up the DNS-rebinding check)",
    )
    # -- admission and limits --
    target_fps: float = Field(12.0, gt=0.0, le=120.0, description="frame rate each session must keep (its chunk budget)")
    admission: Literal["measured", "off"] = Field(
        "measured", description="measured: refuse a session that the running sessions' measured engine time "
        "leaves no room for; off: admit up to max_sessions whatever the load (capacity benchmarks)")
    capacity_headroom: float = Field(
        0.9, gt=0.0, le=1.0, description="share of the chunk budget that running sessions' engine time may fill"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="JSON request bodies")
    max_sdp_bytes: int = Field(100_000, ge=1024, le=1_000_000, description="SDP offers (WHIP/WHEP and /api/offer)")
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS)
    control_rate: float = Field(20.0, gt=0.0, description="control messages per second per session (data channel + PATCH)")
    control_burst: int = Field(40, ge=1, description="control messages a session may send at once")
    idle_timeout_s: float = Field(20.0, gt=0.0, description="a session without input frames for this long is closed")
    max_session_s: Optional[float] = Field(None, gt=0.0, description="longest session; None: unlimited")
    drain_timeout_s: float = Field(10.0, gt=0.0, description="on SIGTERM, time to close the sessions and stop the engine")

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, token: Optional[SecretStr]) -> Optional[SecretStr]:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("the token is empty")
        return token

    @model_validator(mode="after")
    def _check_decoder(self) -> "ServerConfig":
        problem = decoder_problem(self.decoder, self.taehv_weights, self.weights, encoder=self.encoder,
                                  lightvae_weights=self.lightvae_weights)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_turn(self) -> "ServerConfig":
        check_turn_credentials(self.ice_servers, self.turn_secret is not None)
        return self

    def ice_for_peer(self, tag: Optional[str] = None) -> list[IceServer]:
        """The STUN/TURN servers one peer connection uses, TURN credentials minted where needed."""
        return servers_for_peer(self.ice_servers, self.turn_secret, self.turn_ttl_s, tag)


def resolve_model(config: ServerConfig) -> tuple[str, Optional[Path]]:
    """Which model the engine runs and with which weights root.

    An explicit `model` is taken as is (a real model without weights runs with random weights).
    Otherwise the configured real model runs when its weights folder exists under `weights`,
    else `tiny` (random weights).
    """
    if config.model:
        if config.weights is not None and model_entry(config.model).weights_folder is None:
            log.warning("model %s has no published weights: ignoring --weights %s", config.model, config.weights)
            return config.model, None
        return config.model, config.weights
    real = model_entry(config.real_model)
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
        decoder=config.decoder,
        encoder=config.encoder,
        lightvae_weights=str(config.lightvae_weights) if config.lightvae_weights else None,
        taehv_weights=str(config.taehv_weights) if config.taehv_weights else None,
        step_lag=config.step_lag,
        kv_policy=config.kv_policy,
        dtype=config.dtype,
        target_fps=config.target_fps,
        deadline_ms=1000.0 * config.deadline_s,
        max_batch=config.max_sessions,
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
    parser.add_argument("--devices", help="auto, cpu, cuda, cuda:N, or several for a pipeline-parallel engine: cuda:0,1, cuda*N, cpu:N (default auto)")
    parser.add_argument("--decoder", choices=DECODERS,
                        help="wan (default): the Wan VAE decoder; taehv or lightvae: a light decoder, far less compute, "
                             "lower fidelity (README: Light encoders and decoders)")
    parser.add_argument("--encoder", choices=ENCODERS,
                        help="wan (default): the Wan VAE encoder; taehv or lightvae: a light encoder, far less compute, "
                             "lower fidelity")
    parser.add_argument("--taehv-weights", dest="taehv_weights", type=Path,
                        help="taew2_1.pth from the TAEHV project (needed for --decoder/--encoder taehv with --weights)")
    parser.add_argument("--lightvae-weights", dest="lightvae_weights", type=Path,
                        help="lightvaew2_1.pth, LightX2V's pruned Wan VAE (needed for --decoder/--encoder lightvae with "
                             "--weights)")
    parser.add_argument("--step-lag", dest="step_lag", type=int,
                        help="forwards between a chunk's denoising steps (default: the number of ranks for a multi-step "
                             "model on several ranks, else 1; 1 is the reference's schedule)")
    parser.add_argument("--kv-policy", dest="kv_policy", choices=KV_POLICIES,
                        help="ours (the model config's default) or reference: the reference package's KV cache "
                             "eviction, sink checks, first-chunk timestep and RoPE wrap, exactly (README 'Where we differ')")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="number format (default: bfloat16 on a GPU, float32 on CPU); fp8: the DiT blocks' linear "
                             "layers as FP8 matmuls, on GPUs with FP8 tensor cores (Ada/Hopper) only (README 'FP8')")
    parser.add_argument("--config", type=Path, help="YAML or JSON file with ServerConfig fields")
    parser.add_argument("--engine-max-restarts", dest="engine_max_restarts", type=int,
                        help="engine crashes in a row the server restarts it after; one more and it exits 1 (default 5)")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING")
    parser.add_argument(
        "--token",
        help=f"Bearer token (default: ${TOKEN_ENV}). With --token-scope all (the default) it guards the API, WHIP, "
             "WHEP and /metrics; with publish, WHIP ingest and outputs only. None: WHIP and outputs are for loopback "
             "clients only",
    )
    parser.add_argument(
        "--ice-server", dest="ice_servers", action="append", metavar="URL",
        help="STUN/TURN server, repeatable: stun:host:port or turn:USER:PASSWORD@host:port?transport=udp",
    )
    parser.add_argument(
        "--turn-secret", dest="turn_secret", metavar="SECRET",
        help=f"TURN REST shared secret (coturn use-auth-secret; default: ${TURN_SECRET_ENV}): TURN servers given "
             "without credentials get time-limited ones per peer",
    )
    parser.add_argument("--public-host", dest="public_hosts", action="append", metavar="NAME",
                        help="a host name clients reach the server by (a reverse proxy's, a LAN name), repeatable; "
                             "requests for other names are refused (DNS rebinding); '*': any")
    parser.add_argument("--token-scope", dest="token_scope", choices=("all", "publish"),
                        help="all (default): the token guards the API, WHIP, WHEP and /metrics; publish: only WHIP and outputs")
    parser.add_argument("--allow-anonymous", dest="allow_anonymous", action="store_true", default=None,
                        help="allow listening on a non-loopback address without a token")
    parser.add_argument("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
                        help="origin allowed to call the API/WHIP/WHEP from its pages, repeatable ('*': any)")
    parser.add_argument("--max-sessions", dest="max_sessions", type=int, help="sessions at once (default 4)")
    parser.add_argument("--target-fps", dest="target_fps", type=float, help="frame rate a session must keep (default 12)")
    parser.add_argument("--pacing-percentile", dest="pacing_percentile", type=float,
                        help="share of recent output bursts the playout delay waits for (50-100, default 100: all)")
    parser.add_argument("--pacing-window", dest="pacing_window_s", type=float,
                        help="seconds of recent output bursts the playout delay is sized from (default 2)")
    parser.add_argument("--encode-ahead", dest="encode_ahead", action="store_true", default=None,
                        help="push each camera frame as it comes: its encode starts before its chunk is whole")
    parser.add_argument("--idle-timeout", dest="idle_timeout_s", type=float, help="seconds without input before a session closes "
                             f"(default {ServerConfig.model_fields['idle_timeout_s'].default:g})")
    parser.add_argument("--max-session-seconds", dest="max_session_s", type=float, help="longest session (default unlimited)")
    parser.add_argument("--max-viewers", dest="max_viewers", type=int, help="WHEP viewers per session (default 16)")
    parser.add_argument("--max-pending-viewers", dest="max_pending_viewers", type=int,
                        help="WHEP viewers per session still connecting (default 4; a newer one replaces the oldest)")
    parser.add_argument("--viewer-connect-timeout", dest="viewer_connect_timeout_s", type=float,
                        help="seconds a WHEP viewer may take to connect before it is dropped (default 15)")
    parser.add_argument("--recordings-dir", dest="recordings_dir", type=Path, help="folder for recordings (default ./recordings)")
    parser.add_argument(
        "--virtual-camera", dest="virtual_camera", action="store_true", default=None,
        help="send the newest session's output to a virtual webcam (pip install 'streamgen[virtualcam]')",
    )
    parser.add_argument("--virtual-camera-device", dest="virtual_camera_device", help="e.g. /dev/video10")
    args = parser.parse_args(argv)
    data = _read_file(args.config) if args.config else {}
    if os.environ.get(TOKEN_ENV):  # the environment beats the file, the command line beats both
        data["token"] = os.environ[TOKEN_ENV]
    if os.environ.get(TURN_SECRET_ENV):
        data["turn_secret"] = os.environ[TURN_SECRET_ENV]
    overrides = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    data.update(overrides)
    try:
        config = ServerConfig.model_validate(data)
        if config.model:
            model_entry(config.model)  # fail now on an unknown model or file, not in the engine
        problem = decoder_problem(config.decoder, config.taehv_weights, config.weights, cli=True, check_file=True,
                                  encoder=config.encoder, lightvae_weights=config.lightvae_weights)
        if problem:  # the validator checked the rest: only a missing file is left
            parser.error(problem)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(f"bad configuration: {problems}")
    except ConfigError as exc:
        parser.error(str(exc))
    return config
