"""The in-process engine: builds or loads the models once (engine.build) and opens stream sessions on them.

    engine = StreamEngine.create(EngineOptions(model="tiny"))
    s = engine.open_session("a watercolor painting")
    outputs = s.push(frames_uint8_THW3, pts)   # [(frame, pts), ...]

`device` names one device (`cpu`, `cuda`, `cuda:N`, `auto`) for this in-process engine, or several ranks
(`cpu:N`, `cuda:0,1`, `cuda*N`, `torchrun`) for the pipeline-parallel engine of engine.parallel, which
`create` returns instead; it has the same session API (docs/PARALLEL.md).
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch

from engine import attention
from engine.build import (EngineOptions, StreamDecoder, StreamEncoder, build_codecs, build_dit, build_text, build_vae,
                          embed_prompt, needs_wan_vae, resolve_device, resolve_dtype, stream_defaults, tune_backends)
from engine.checkpoint import WeightsLayout
from engine.config import ModelConfig, StreamDefaults, load_model_config
from engine.parallel.devices import parse_devices
from engine.parallel.engine import ParallelEngine
from engine.rope import Rope
from engine.vae import WanVAE
from engine.session import StreamSession, engine_info
from engine.transfer import FrameIO, PendingFrames
from interface.controls import StreamParams

log = logging.getLogger(__name__)


class StreamEngine:
    def __init__(self, cfg: ModelConfig, options: EngineOptions) -> None:
        self.cfg = cfg
        self.options = options
        self.device = resolve_device(options.device)
        tune_backends(self.device)
        self.dtype: torch.dtype = resolve_dtype(options.dtype, self.device)  # refuses fp8 where it cannot run
        self.defaults: StreamDefaults = stream_defaults(cfg, options)
        height, width = self.defaults.height, self.defaults.width
        self.layout = WeightsLayout(options.weights, cfg) if options.weights else None
        self.dit = build_dit(cfg, self.layout, self.device, self.dtype, options.seed, fp8=options.dtype == "fp8")
        # the Wan VAE only where it encodes or decodes (None when both sides are light)
        self.vae: Optional[WanVAE] = (build_vae(cfg, self.layout, self.device, self.dtype, options.seed)
                                      if needs_wan_vae(options) else None)
        encoder, decoder = build_codecs(cfg, options, self.vae, self.device, self.dtype)
        assert encoder is not None and decoder is not None
        self.encoder: StreamEncoder = encoder
        self.decoder: StreamDecoder = decoder
        self.text = build_text(cfg, self.layout, self.device, self.dtype, options.seed)
        self.rope = Rope(cfg.dit.head_dim, self.device)
        self._io = FrameIO(self.device)
        # first-chunk DiT input shapes whose kernels ran once in this process (see DiTRunner.prepare_prime)
        self.warm_shapes: set = set()
        self.info = engine_info(
            model=cfg.name,
            height=height,
            width=width,
            steps=self.defaults.steps,
            random_weights=self.layout is None,
            device=str(self.device),
            dtype="fp8" if options.dtype == "fp8" else str(self.dtype).replace("torch.", ""),
            attention=attention.log_backend(self.device),
            decoder=options.decoder,
            encoder=options.encoder,
        )
        if self.layout is None:
            log.warning(
                "model %s runs with RANDOM WEIGHTS (no --weights given): the output is not a real restyling",
                cfg.name,
            )
        log.info("engine ready: %s", self.info.model_dump())

    @classmethod
    def create(cls, options: EngineOptions) -> Union["StreamEngine", ParallelEngine]:
        """The in-process engine for one device; the pipeline-parallel engine for several ranks."""
        cfg = load_model_config(options.model)
        ranks = parse_devices(options.device)
        if ranks is not None:
            if options.dtype == "fp8" and ranks.kind == "cpu":  # before spawning ranks (CUDA ranks check their own GPU)
                resolve_dtype(options.dtype, torch.device("cpu"))
            return ParallelEngine(cfg, options, ranks)
        return cls(cfg, options)

    # -- helpers used by sessions ------------------------------------------------------------------
    def embed_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings [1, text_len, text_dim] for one prompt."""
        return embed_prompt(self.text, self.cfg, prompt, self.device, self.dtype)

    @torch.no_grad()
    def prompt_kv(self, prompt: str) -> list:
        return self.dit.cross_kv(self.embed_prompt(prompt))

    def to_video_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1] on the device (pinned, async copy on CUDA)."""
        return self._io.to_video_tensor(frames)

    def to_uint8(self, video: torch.Tensor) -> np.ndarray:
        """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the host."""
        return self._io.to_uint8(video)

    def to_uint8_later(self, video: torch.Tensor) -> PendingFrames:
        """As to_uint8, queued: result() waits for the copy and gives the frames."""
        return self._io.to_uint8_later(video)

    @property
    def finishes_in_background(self) -> bool:
        """On CUDA a session's push returns once its chunk is queued; the frames follow through later
        pushes and take_finished() (the engine process polls it between requests)."""
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- sessions ------------------------------------------------------------------------------------
    @torch.no_grad()
    def open_session(self, prompt: str, params: Optional[StreamParams] = None) -> StreamSession:
        return StreamSession(self, prompt, params)

    # -- the parts of the engine API that matter for several ranks ------------------------------------
    def stats(self) -> dict:
        """Scheduler state for /metrics; one process has no pipeline to report."""
        return {"world": 1, "device": str(self.device)}

    def close(self) -> None:
        """Nothing to shut down in-process (the parallel engine stops its ranks here)."""

    def __enter__(self) -> "StreamEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

