"""Drive the reference package's own streaming DiT code (CausalStreamInferencePipeline.prepare /
inference_stream over CausalWanModel) at a small size, for parity tests.

Its pipeline constructor loads files from fixed paths, so the object is assembled by hand around the
reference's own methods; only the text encoder is replaced by fixed embeddings.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

causal_model = __import__("models.wan.causal_model", fromlist=["CausalWanModel"])
from models.wan.causal_stream_inference import CausalStreamInferencePipeline  # noqa: E402
from models.wan.flow_match import FlowMatchScheduler  # noqa: E402
from models.wan.wan_wrapper import CausalWanDiffusionWrapper  # noqa: E402

from engine.config import DiTConfig  # noqa: E402


def build_reference_model(cfg: DiTConfig, seed: int = 0) -> torch.nn.Module:
    """A reference CausalWanModel of cfg's size with every parameter random (its head is zero-initialised)."""
    torch.manual_seed(seed)
    m = causal_model.CausalWanModel(
        model_type="t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, text_len=cfg.text_len, eps=cfg.eps,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


class ReferenceStream:
    """The reference's stream: prepare() for the first chunk, inference_stream() after."""

    def __init__(self, model: torch.nn.Module, context: torch.Tensor, steps: list[int], frame_tokens: int,
                 num_kv_cache: int, num_sink: int, sink_threshold: Optional[float], rope_reset: int = 50) -> None:
        wrapper = CausalWanDiffusionWrapper.__new__(CausalWanDiffusionWrapper)
        torch.nn.Module.__init__(wrapper)
        wrapper.model = model
        wrapper.uniform_timestep = False
        wrapper.scheduler = FlowMatchScheduler(shift=8.0, sigma_min=0.0, extra_one_step=True)
        wrapper.scheduler.set_timesteps(1000, training=True)
        wrapper.seq_len = 32760
        p = CausalStreamInferencePipeline.__new__(CausalStreamInferencePipeline)
        torch.nn.Module.__init__(p)
        p.generator = wrapper
        p.text_encoder = lambda text_prompts: {"prompt_embeds": context.clone()}
        p.device = "cpu"
        p.denoising_step_list = torch.tensor(steps, dtype=torch.long)
        p.scheduler = wrapper.get_scheduler()
        p.num_transformer_blocks = model.num_layers
        p.num_heads = model.num_heads
        p.frame_seq_length = frame_tokens
        p.num_kv_cache = num_kv_cache
        p.kv_cache_length = frame_tokens * num_kv_cache
        p.num_sink_tokens = num_sink
        p.adapt_sink_threshold = -1 if sink_threshold is None else sink_threshold
        p.conditional_dict = p.kv_cache1 = p.hidden_states = p.block_x = None
        p.num_frame_per_block = 1
        for b in model.blocks:  # the reference keeps its eviction queue on the module
            b.self_attn.evict_idx = None
        self.p, self.frame_tokens, self.rope_reset = p, frame_tokens, rope_reset
        self.current_start = self.current_end = 0

    def prepare(self, noisy: torch.Tensor) -> torch.Tensor:
        """noisy [1, C, F, H, W] (our layout) -> x0 in our layout."""
        frames = noisy.shape[2]
        self.current_end = frames * self.frame_tokens
        out = self.p.prepare(text_prompts=["x"], device="cpu", dtype=noisy.dtype, noise=noisy.permute(0, 2, 1, 3, 4),
                             current_start=0, current_end=self.current_end)
        self.current_start = self.current_end
        return out.permute(0, 2, 1, 3, 4)

    def restart(self) -> None:
        """A new stream on the same pipeline, as streamv2v's SingleGPUInferencePipeline.reset_stream_state
        leaves the DiT side (its VAE flags aside): the caches go; the eviction queues on the attention
        modules and the step list, whose first entry the last stream chunk overwrote, stay."""
        p = self.p
        p.kv_cache1 = p.crossattn_cache = p.block_x = p.hidden_states = None
        self.current_start = self.current_end = 0

    def push(self, noisy: torch.Tensor, t0: int) -> torch.Tensor:
        """One stream forward, with the RoPE refresh rule of the reference's stream loop."""
        f = self.frame_tokens
        if self.current_start // f >= self.rope_reset:
            self.current_start = self.p.kv_cache_length - f
        self.current_end = self.current_start + f
        out = self.p.inference_stream(noise=noisy.permute(0, 2, 1, 3, 4), current_start=self.current_start,
                                      current_end=self.current_end, current_step=t0)
        self.current_start = self.current_end
        return out.permute(0, 2, 1, 3, 4).clone()


def patched_randn_like(draws: list[torch.Tensor]) -> Callable:
    """A torch.randn_like that returns recorded noise (our layout converted to the reference's)."""
    def fake(t: torch.Tensor, *a, **k) -> torch.Tensor:
        n = draws.pop(0)
        return n.permute(0, 2, 1, 3, 4).reshape(t.shape).to(t.dtype)
    return fake
