"""The benchmark rows of the speed issue (docs/ARCHITECTURE.md §9) and the record each run of a row produces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ROWS = {
    "p1": dict(model="wan-1.3b", height=480, width=832, steps=2),
    "p2": dict(model="wan-1.3b", height=512, width=512, steps=1),
    "p3": dict(model="wan-14b", height=512, width=512, steps=1),
    "p1s1": dict(model="wan-1.3b", height=480, width=832, steps=1),
    # P1 and P3 on the first two GPUs through the pipeline-parallel engine: three forwards in the ring and
    # three chunks of the stream in flight (docs/BENCHMARKS.md, pipeline rows), a 2-step stream's later
    # step taken from the output two forwards back (engine.stream_batch) so that both ranks stay busy
    "p4": dict(model="wan-1.3b", height=480, width=832, steps=2, device="cuda*2", step_lag=2,
               parallel=dict(inflight=3, ring_capacity=3)),
    "p5": dict(model="wan-14b", height=512, width=512, steps=1, device="cuda*2",
               parallel=dict(inflight=3, ring_capacity=3)),
}
MULTI_GPU_ROWS = tuple(name for name, spec in ROWS.items() if "device" in spec)
# The paper's figures for the rows (fps: one H100, P4/P5 two; arXiv 2511.07399).
PAPER_FPS = {"p1": 17.97, "p2": 26.21, "p3": 18.71, "p1s1": 20.47, "p4": 34.67, "p5": 37.12}
INPUT_FPS = 30.0
PROMPT = "a watercolor painting of a city street"


def steady_warmup(warmup: int, model: str) -> int:
    """At least enough warm-up chunks to fill the KV window and evict from it: the steady state's
    kernels (eviction, sink refresh, the captured graph, cuDNN autotuning of the full-window shapes)
    then first run in the warm-up, not in the timed chunks."""
    from engine.config import load_model_config

    return max(warmup, load_model_config(model).stream.num_kv_cache + 2)


@dataclass
class RowResult:
    row: str
    impl: str  # "ours" or "reference"
    model: str
    size: str
    steps: int
    fps: float
    ttff_s: float
    first_chunk_ms: float
    chunk_ms: float
    peak_gib: float
    chunks: int
    vae_encode_ms: Optional[float] = None
    dit_ms: Optional[float] = None
    vae_decode_ms: Optional[float] = None
    vae_encode_tflop: float = 0.0
    dit_tflop: float = 0.0
    vae_decode_tflop: float = 0.0
    vae_encode_mfu: Optional[float] = None
    dit_mfu: Optional[float] = None
    vae_decode_mfu: Optional[float] = None
    ceiling_tflops: float = 0.0
    load_s: float = 0.0
    weights: str = "random init"
    note: str = ""
    dtype: str = ""  # the engine's dtype option ("": its default, bf16 on a GPU); fp8 rows' MFU is against the FP8 ceiling
