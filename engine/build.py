"""Building an engine's parts: the options an engine starts from, the DiT (whole, or only a rank's blocks),
the VAE, the decoder, the text encoder, and prompt embeddings. The in-process engine (engine.runtime) and
every pipeline rank (engine.parallel.rank) build with these functions.

Random weights are drawn per part (trunk, each block, VAE, text encoder) from seeds derived from
`seed`, so that a rank building only its blocks gets exactly the weights one process would.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.checkpoint import WeightsLayout, check_state_dict, load_into, read_tensor_file
from engine.config import ModelConfig, StreamDefaults, lightvae_config
from engine.dit import Block, WanDiT
from engine.noise import mix_seed
from engine.taehv import LATENT_CHANNELS, TAEHV, load_taehv, random_taehv
from engine.vae import WanVAE
from engine.fp8 import check_fp8_device, convert_blocks
from interface.catalogue import Decoder, DType, Encoder, KVPolicy, decoder_problem
from interface.devices import one_device

log = logging.getLogger(__name__)

# The DiT's parts besides its blocks (module names = state-dict prefixes).
TRUNK_PARTS = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head")
# Sub-seeds of the random-weight init, one per part (DiT blocks add their index).
_SEED_TRUNK, _SEED_BLOCK, _SEED_VAE, _SEED_TEXT, _SEED_TAEHV, _SEED_LIGHTVAE = 1, 2, 3, 4, 5, 6


class ParallelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Blocks per rank at start, e.g. [16, 14]; None: an even split (rank 0 and the last rank, which
    # also run the VAE, get the smaller shares when it does not divide evenly).
    split: Optional[list[int]] = None
    # Chunks of one session that push() may leave in flight before it waits for outputs. 1: push
    # returns the outputs of its own chunks; 2 or more lets the device (or the ranks) work on the next
    # chunk while the host hands over the last one (outputs then come back from later calls). None: 2 for
    # one CUDA device, 1 otherwise.
    inflight: Optional[int] = Field(None, ge=1, le=64)
    # Forwards in the ring at once; None: the number of ranks (each rank busy with one), two for a ring of
    # one (a forward's frames go back while the next is queued).
    ring_capacity: Optional[int] = Field(None, ge=1, le=64)

    # Block scheduler (engine.parallel.balance).
    rebalance: bool = True
    rebalance_every: int = Field(8, ge=1, description="forwards between two decisions")
    rebalance_gain: float = Field(0.04, ge=0.0, description="least relative gain of the slowest stage")
    rebalance_min_ms: float = Field(0.5, ge=0.0, description="least absolute gain in ms")
    min_blocks: int = Field(1, ge=0, description="blocks a rank keeps at least")
    rebalance_settle: int = Field(4, ge=0, description="forwards not measured after a move (old split, graph capture)")
    rebalance_ban_windows: int = Field(16, ge=0, description="windows a rolled-back direction is not tried again")

    # SLO-aware batch scheduler (engine.parallel.slo).
    max_batch: int = Field(4, ge=1, le=64, description="sessions in one forward at most")
    target_fps: float = Field(16.0, gt=0.0, description="output frames per second each session needs")
    deadline_ms: float = Field(1000.0, gt=0.0, description="input-to-output latency budget of a frame")
    batch_wait_ms: Optional[float] = Field(
        None, ge=0.0, description="longest a forward waits for other sessions' chunks due soon (None: what the "
        "deadline leaves, engine.parallel.slo; 0: never waits)")

    # Start-up and failure detection.
    start_timeout_s: float = Field(600.0, gt=0.0)
    stall_timeout_s: float = Field(300.0, gt=0.0, description="a call waiting longer than this fails the engine")
    # Test hook: extra ms per owned block per forward on each rank (emulates a slower device).
    slow_block_ms: Optional[list[float]] = None


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "tiny"
    weights: Optional[Path] = None
    device: str = "auto"
    height: Optional[int] = Field(None, gt=0)
    width: Optional[int] = Field(None, gt=0)
    steps: Optional[int] = Field(None, ge=1, le=4)
    # None: bf16 on CUDA, float32 elsewhere; fp8: bf16 with FP8 block linears (engine.fp8, resolve_dtype)
    dtype: Optional[DType] = None
    seed: int = 0
    # Latents -> pixels: the Wan VAE decoder, or a light one, far less compute for lower fidelity: TAEHV
    # (taew2_1.pth from the TAEHV project) or LightVAE (lightvaew2_1.pth, the Wan VAE with 75 % of its
    # channels pruned); pixels -> latents likewise, chosen independently.
    decoder: Decoder = "wan"
    encoder: Encoder = "wan"
    taehv_weights: Optional[Path] = None
    lightvae_weights: Optional[Path] = None
    # Forwards between a chunk's consecutive denoising steps (engine.schedule). 1, the reference's
    # schedule, has the lowest latency; with several steps and several ranks, the number of ranks lets
    # one stream keep every rank busy. Frames equal those of any engine with the same value.
    step_lag: int = Field(1, ge=1, le=8)
    # KV cache and first-chunk schedule (engine/kv_policy.py); None: the model config's (ours by default)
    kv_policy: Optional[KVPolicy] = None
    # Only for several ranks (pipeline-parallel engine): schedulers, start-up and test hooks.
    parallel: ParallelOptions = Field(default_factory=ParallelOptions)

    @model_validator(mode="after")
    def _check_decoder(self) -> "EngineOptions":
        problem = decoder_problem(self.decoder, self.taehv_weights, self.weights, encoder=self.encoder,
                                  lightvae_weights=self.lightvae_weights)
        if problem:
            raise ValueError(problem)
        return self


class StreamEncoder(Protocol):
    """What a session needs from an encoder (WanVAE, LightVAE and TAEHV all are one): frames [B,3,T,H,W] in
    [-1,1] -> raw (not normalised) latents [B,16,t,H/8,W/8]; 1+4k frames on a stream's first call
    (k+1 latents), 4k later (k latents), less the frames given ahead: `stream_encode_ahead` takes up to 3
    frames of the next chunk before it is whole (after the stream's frame 0)."""

    def new_stream_state(self) -> Any: ...

    def stream_encode(self, video: torch.Tensor, state: Any) -> torch.Tensor: ...

    def stream_encode_ahead(self, video: torch.Tensor, state: Any) -> None: ...


def stream_defaults(cfg: ModelConfig, options: EngineOptions) -> StreamDefaults:
    """The model's stream defaults with the engine options' overrides (size, steps, KV policy); the
    in-process engine and every rank take theirs from here."""
    height = options.height or cfg.stream.height
    width = options.width or cfg.stream.width
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    return cfg.stream.model_copy(update={
        "height": height, "width": width, "steps": options.steps or cfg.stream.steps,
        "kv_policy": options.kv_policy or cfg.stream.kv_policy,
    })


class StreamDecoder(Protocol):
    """What a session needs from a decoder (WanVAE, LightVAE and TAEHV all are one): normalised latents
    [B,16,t,h,w] -> frames [B,3,T,8h,8w] in [-1,1]; 1+4(t-1) frames on a stream's first call, 4t later."""

    def new_stream_state(self) -> Any: ...

    def stream_decode(self, latent: torch.Tensor, state: Any) -> torch.Tensor: ...

    def stream_decode_parts(self, latent: torch.Tensor, state: Any) -> Iterator[torch.Tensor]:
        """The same frames in parts along time, each decoded when the caller asks for it."""
        ...


def tune_backends(device: torch.device) -> None:
    """Process-wide backend settings for an engine process on `device`. A stream's shapes never change,
    so cuDNN may time its convolution algorithms once per shape and keep the fastest (the VAE is most
    of a chunk's convolutions). The benchmarks set this too: without it here, the server and every
    pipeline rank (their own processes) ran on cuDNN's heuristic choices instead."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_device(spec: str) -> torch.device:
    """One device of the `--devices` grammar (interface.devices) on this host."""
    one = one_device(spec)
    if one is None:
        raise ValueError(f"device {spec!r} names several ranks: StreamEngine.create starts them")
    if one == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(one)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """The dtype the engine's modules and activations use on `device` for the option `name`. fp8 computes
    in bf16 (its FP8 linears are swapped in by build_dit) and is refused here, at start-up, on a device
    without FP8 tensor cores."""
    if name == "fp8":
        check_fp8_device(device)
        return torch.bfloat16
    return getattr(torch, name or ("bfloat16" if device.type == "cuda" else "float32"))


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


def _finish(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_dit(
    cfg: ModelConfig,
    layout: Optional[WeightsLayout],
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    blocks: Optional[Iterable[int]] = None,
    trunk: Sequence[str] = TRUNK_PARTS,
    fp8: bool = False,
) -> WanDiT:
    """The DiT with only `blocks` (None: all) and the `trunk` parts materialised; the rest stays on the
    meta device (a pipeline rank holds only what it runs). Checkpoints are checked whole (strict: every
    key and shape), then only the wanted tensors are read (the state dict is memory-mapped). With `fp8`
    the blocks' linear layers are then converted to FP8 from the loaded weights (engine.fp8)."""
    blocks = range(cfg.dit.num_layers) if blocks is None else list(blocks)
    with torch.device("meta"):
        dit = WanDiT(cfg.dit)
    wanted = [*trunk, *(f"blocks.{i}" for i in blocks)]
    if layout is None:
        if trunk:
            # the trunk is small: build it whole from its own seed, keep the wanted parts
            torch.manual_seed(mix_seed(seed, _SEED_TRUNK))
            with _building(device, dtype):
                whole = WanDiT(cfg.dit.model_copy(update={"num_layers": 0}))
            for name in trunk:
                setattr(dit, name, getattr(whole, name))
        for i in blocks:
            torch.manual_seed(mix_seed(seed, _SEED_BLOCK, i))
            with _building(device, dtype):
                dit.blocks[i] = Block(cfg.dit)
    else:
        state = layout.dit_state()
        if set(trunk) == set(TRUNK_PARTS) and len(blocks) == cfg.dit.num_layers:
            load_into(dit, state, str(layout.causal), assign=True)
        else:
            check_state_dict(dit, state, str(layout.causal))  # the whole file matches the architecture
            for name in wanted:  # then each owned part loads strictly from its own keys
                part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
                dit.get_submodule(name).load_state_dict(part, strict=True, assign=True)
    for name in wanted:
        module = dit.get_submodule(name)
        _finish(module, device, dtype)
    if fp8:  # after _finish: Module.to(dtype) would cast the e4m3 weights back
        convert_blocks(dit, blocks)
    return dit.eval().requires_grad_(False)  # type: ignore[return-value]


def build_vae(cfg: ModelConfig, layout: Optional[WeightsLayout], device: torch.device, dtype: torch.dtype, seed: int) -> WanVAE:
    if layout is None:
        torch.manual_seed(mix_seed(seed, _SEED_VAE))
        with _building(device, dtype):
            return _finish(WanVAE(cfg.vae), device, dtype)  # type: ignore[return-value]
    vae = WanVAE(cfg.vae)
    load_into(vae, read_tensor_file(layout.vae), str(layout.vae))
    return _finish(vae, device, dtype)  # type: ignore[return-value]


def needs_wan_vae(options: "EngineOptions", encodes: bool = True, decodes: bool = True) -> bool:
    """Whether a process that encodes and/or decodes needs the Wan VAE for it."""
    return (encodes and options.encoder == "wan") or (decodes and options.decoder == "wan")


def build_taehv(cfg: ModelConfig, path: Optional[Path], device: torch.device, dtype: torch.dtype, seed: int,
                encoder: bool = False, decoder: bool = True) -> TAEHV:
    """The light encoder and/or decoder from its file, or seeded random weights (allowed with random model
    weights only: see EngineOptions)."""
    if cfg.vae.z_dim != LATENT_CHANNELS:
        raise ValueError(f"TAEHV takes {LATENT_CHANNELS} latent channels; model {cfg.name} has {cfg.vae.z_dim}")
    parts = " and ".join(p for p, on in (("encoder", encoder), ("decoder", decoder)) if on)
    if path is None:
        log.warning("TAEHV %s with RANDOM WEIGHTS (no taehv_weights file given)", parts)
        model = random_taehv(mix_seed(seed, _SEED_TAEHV), encoder=encoder, decoder=decoder)
    else:
        model = load_taehv(path, encoder=encoder, decoder=decoder)
    return _finish(model, device, dtype)  # type: ignore[return-value]


def build_lightvae(cfg: ModelConfig, path: Optional[Path], device: torch.device, dtype: torch.dtype, seed: int) -> WanVAE:
    """LightVAE: the Wan VAE at a quarter of its widths (engine.config.lightvae_config), from
    lightvaew2_1.pth (the Wan VAE's keys, checked strictly), or seeded random weights (allowed with random
    model weights only: see EngineOptions). Its latents are the Wan VAE's, with the same statistics."""
    light = lightvae_config(cfg.vae)
    if path is None:
        log.warning("LightVAE with RANDOM WEIGHTS (no lightvae_weights file given)")
        torch.manual_seed(mix_seed(seed, _SEED_LIGHTVAE))
        with _building(device, dtype):
            return _finish(WanVAE(light), device, dtype)  # type: ignore[return-value]
    vae = WanVAE(light)
    load_into(vae, read_tensor_file(path), f"{path} (LightVAE, base width {light.dim})")
    log.info("LightVAE loaded from %s", path)
    return _finish(vae, device, dtype)  # type: ignore[return-value]


def build_codecs(cfg: ModelConfig, options: "EngineOptions", vae: Optional[WanVAE], device: torch.device,
                 dtype: torch.dtype, encodes: bool = True, decodes: bool = True
                 ) -> tuple[Optional[StreamEncoder], Optional[StreamDecoder]]:
    """The encoder `options.encoder` and the decoder `options.decoder` name, for a process that encodes
    and/or decodes (None for a side it does not run); `vae` is its Wan VAE (needed where "wan" is
    chosen). One light module serves both sides when both choose it."""
    chosen = [kind for kind, on in ((options.encoder, encodes), (options.decoder, decodes)) if on]
    if vae is None and "wan" in chosen:
        raise ValueError("the Wan encoder/decoder needs the Wan VAE")
    modules: dict[str, Any] = {"wan": vae}
    if "taehv" in chosen:
        modules["taehv"] = build_taehv(cfg, options.taehv_weights, device, dtype, options.seed,
                                       encoder=encodes and options.encoder == "taehv",
                                       decoder=decodes and options.decoder == "taehv")
    if "lightvae" in chosen:
        modules["lightvae"] = build_lightvae(cfg, options.lightvae_weights, device, dtype, options.seed)
    return (modules[options.encoder] if encodes else None), (modules[options.decoder] if decodes else None)


def build_text(cfg: ModelConfig, layout: Optional[WeightsLayout], device: torch.device, dtype: torch.dtype, seed: int):
    """The umT5 encoder with its tokenizer; None for a random-weights real-size model, whose prompts
    are then embedded by a seeded hash (a 5.7B random encoder would only cost time and memory)."""
    from engine.text_encoder import TextEncoder, UMT5Encoder
    from engine.tokenizer import ByteTokenizer, UMT5Tokenizer

    tc = cfg.text
    if layout is not None:
        with torch.device("meta"):  # no 5.7B random init only to be overwritten
            enc = UMT5Encoder(tc)
        load_into(enc, read_tensor_file(layout.t5), str(layout.t5), assign=True)
        return TextEncoder(_finish(enc, device, dtype), UMT5Tokenizer.from_folder(layout.tokenizer, tc.text_len))
    if cfg.name != "tiny":
        log.info("random weights at real size: prompts are embedded by a seeded hash, not by umT5")
        return None
    torch.manual_seed(mix_seed(seed, _SEED_TEXT))
    with _building(device, dtype):
        enc = _finish(UMT5Encoder(tc), device, dtype)
    return TextEncoder(enc, ByteTokenizer(tc.vocab_size, tc.text_len))


@torch.no_grad()
def embed_prompt(text, cfg: ModelConfig, prompt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Text embeddings [1, text_len, text_dim] for one prompt (`text` from build_text)."""
    if text is None:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        ctx = torch.randn(1, cfg.dit.text_len, cfg.dit.text_dim, generator=g) * 0.1
        return ctx.to(device, dtype)
    return text.encode_prompts([prompt]).to(device, dtype)
