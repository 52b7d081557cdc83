"""The engine: builds or loads the models once and opens stream sessions on them.

    engine = StreamEngine.create(EngineOptions(model="tiny"))
    s = engine.open_session("a watercolor painting")
    outputs = s.push(frames_uint8_THW3, pts)   # [(frame, pts), ...]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from engine import attention
from engine.checkpoint import WeightsLayout, load_into, read_tensor_file
from engine.config import ModelConfig, StreamDefaults, load_model_config
from engine.dit import WanDiT
from engine.rope import Rope
from engine.session import StreamSession
from engine.vae import WanVAE
from interface.controls import StreamParams

log = logging.getLogger(__name__)


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "tiny"
    weights: Optional[Path] = None
    device: str = "auto"
    height: Optional[int] = Field(None, gt=0)
    width: Optional[int] = Field(None, gt=0)
    steps: Optional[int] = Field(None, ge=1, le=4)
    dtype: Optional[str] = Field(None, pattern="^(float32|bfloat16|float16)$")
    seed: int = 0


class EngineInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    height: int
    width: int
    steps: int
    random_weights: bool
    device: str
    dtype: str
    attention: str


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"bad device {spec!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {spec!r}")
    return dev


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on the device and in the dtype (a 14B model never exists in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


class StreamEngine:
    def __init__(self, cfg: ModelConfig, options: EngineOptions) -> None:
        self.cfg = cfg
        self.options = options
        self.device = resolve_device(options.device)
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype: torch.dtype = getattr(torch, options.dtype or default_dtype)
        height = options.height or cfg.stream.height
        width = options.width or cfg.stream.width
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
        self.defaults: StreamDefaults = cfg.stream.model_copy(
            update={"height": height, "width": width, "steps": options.steps or cfg.stream.steps}
        )
        torch.manual_seed(options.seed)  # random-weight init is reproducible
        self.layout = WeightsLayout(options.weights, cfg) if options.weights else None
        self.dit, self.vae = self._build_dit(), self._build_vae()
        self.text = self._build_text()
        self.rope = Rope(cfg.dit.head_dim, self.device)
        self._pinned: Optional[torch.Tensor] = None
        self.info = EngineInfo(
            model=cfg.name,
            height=height,
            width=width,
            steps=self.defaults.steps,
            random_weights=self.layout is None,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            attention=attention.log_backend(self.device),
        )
        if self.layout is None:
            log.warning(
                "model %s runs with RANDOM WEIGHTS (no --weights given): the output is not a real restyling",
                cfg.name,
            )
        log.info("engine ready: %s", self.info.model_dump())

    @classmethod
    def create(cls, options: EngineOptions) -> "StreamEngine":
        return cls(load_model_config(options.model), options)

    # -- building ------------------------------------------------------------------------------------
    def _finish(self, module: nn.Module) -> nn.Module:
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def _build_dit(self) -> WanDiT:
        if self.layout is None:
            with _building(self.device, self.dtype):
                return self._finish(WanDiT(self.cfg.dit))  # type: ignore[return-value]
        with torch.device("meta"):
            dit = WanDiT(self.cfg.dit)
        load_into(dit, self.layout.dit_state(), str(self.layout.causal), assign=True)
        return self._finish(dit)  # type: ignore[return-value]

    def _build_vae(self) -> WanVAE:
        if self.layout is None:
            with _building(self.device, self.dtype):
                return self._finish(WanVAE(self.cfg.vae))  # type: ignore[return-value]
        vae = WanVAE(self.cfg.vae)
        load_into(vae, read_tensor_file(self.layout.vae), str(self.layout.vae))
        return self._finish(vae)  # type: ignore[return-value]

    def _build_text(self):
        """The umT5 encoder with its tokenizer; None for a random-weights real-size model, whose prompts
        are then embedded by a seeded hash (a 5.7B random encoder would only cost time and memory)."""
        from engine.text_encoder import TextEncoder, UMT5Encoder
        from engine.tokenizer import ByteTokenizer, UMT5Tokenizer

        tc = self.cfg.text
        if self.layout is not None:
            enc = UMT5Encoder(tc)
            load_into(enc, read_tensor_file(self.layout.t5), str(self.layout.t5))
            return TextEncoder(self._finish(enc), UMT5Tokenizer.from_folder(self.layout.tokenizer, tc.text_len))
        if self.cfg.name != "tiny":
            log.info("random weights at real size: prompts are embedded by a seeded hash, not by umT5")
            return None
        with _building(self.device, self.dtype):
            enc = self._finish(UMT5Encoder(tc))
        return TextEncoder(enc, ByteTokenizer(tc.vocab_size, tc.text_len))

    # -- helpers used by sessions ------------------------------------------------------------------
    @torch.no_grad()
    def embed_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings [1, text_len, text_dim] for one prompt."""
        if self.text is None:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            ctx = torch.randn(1, self.cfg.dit.text_len, self.cfg.dit.text_dim, generator=g) * 0.1
            return ctx.to(self.device, self.dtype)
        return self.text.encode_prompts([prompt]).to(self.device, self.dtype)

    @torch.no_grad()
    def prompt_kv(self, prompt: str) -> list:
        return self.dit.cross_kv(self.embed_prompt(prompt))

    def to_video_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1] on the device (pinned, async copy on CUDA)."""
        src = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            if self._pinned is None or self._pinned.shape != src.shape:
                self._pinned = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
            self._pinned.copy_(src)
            src = self._pinned.to(self.device, non_blocking=True)
        video = src.permute(3, 0, 1, 2)[None].float().div_(127.5).sub_(1.0)
        return video

    @staticmethod
    def to_uint8(video: torch.Tensor) -> np.ndarray:
        """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the host."""
        v = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- sessions ------------------------------------------------------------------------------------
    @torch.no_grad()
    def open_session(self, prompt: str, params: Optional[StreamParams] = None) -> StreamSession:
        return StreamSession(self, prompt, params)

