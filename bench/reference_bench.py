"""The reference package (StreamDiffusionV2) on one GPU, through its own entry points and loader, on a
random-weight tree our writer made (bench/reference_files.py): one row per process.

What runs is the reference's `SingleGPUInferencePipeline` (streamv2v/inference.py): its config file
merged with the row's settings by its own `merge_cli_config`, its constructor (which loads the Wan
folder: DiT through diffusers, VAE, umT5 and tokenizer), `load_model` (model.pt, strict), then
`start_stream_session` for the first chunk and `run_stream_batch` per 4-frame chunk, as its server does.
Nothing of it is changed; for the per-stage pass only, its three stage methods are wrapped with
device-synchronised timers (and, for one chunk, a FLOP counter).

    python -m bench.reference_bench --row p1 --root /dev/shm/ref --json ref_p1.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.measure import StageClock, matmul_ceiling_tflops, mfu, synthetic_video
from bench.rows import INPUT_FPS, PROMPT, ROWS, RowResult, steady_warmup
from engine.config import load_model_config

log = logging.getLogger("bench.reference")

MODEL_TYPE = {"wan-1.3b": "T2V-1.3B", "wan-14b": "T2V-14B"}


def reference_config(spec: dict) -> object:
    """The reference's own YAML config plus the row's settings, merged by its own CLI merger."""
    import streamv2v
    from streamv2v.inference_common import merge_cli_config

    stream = load_model_config(spec["model"]).stream
    path = Path(streamv2v.__file__).parent / "configs" / "wan_causal_dmd_v2v.yaml"
    args = dict(
        model_type=MODEL_TYPE[spec["model"]], height=spec["height"], width=spec["width"], step=spec["steps"],
        t2v=False, profile=False, seed=0, noise_scale=0.8, target_fps=None, use_taehv=False, use_tensorrt=False,
        fast=False, num_kv_cache=stream.num_kv_cache, num_sink_tokens=stream.num_sink,
        # our null (no adaptive sink refresh) is the reference's -1
        adapt_sink_threshold=-1 if stream.sink_refresh_threshold is None else stream.sink_refresh_threshold,
    )
    return merge_cli_config(str(path), args)


def run(row: str, root: Path, chunks: int, warmup: int, profile_chunks: int) -> RowResult:
    spec = ROWS[row]
    # the reference resolves its weights root when its modules are imported
    os.environ["STREAMDIFFUSIONV2_ROOT"] = str(root)
    from streamv2v.inference import SingleGPUInferencePipeline

    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    ceiling = matmul_ceiling_tflops(device)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    config = reference_config(spec)
    mgr = SingleGPUInferencePipeline(config, device)
    mgr.load_model(str(root / "wan_models" / Path(load_model_config(spec["model"]).causal_checkpoint).parent))
    load_s = time.perf_counter() - t0
    log.info("%s: reference loaded in %.0f s (steps %s)", row, load_s, list(config.denoising_step_list))

    h, w = spec["height"], spec["width"]
    warmup = steady_warmup(warmup, spec["model"])
    frames = 5 + 4 * (warmup + chunks + profile_chunks + 1)
    video = synthetic_video(frames, h, w)

    def tensor(a: int, b: int) -> torch.Tensor:
        # host uint8 frames -> [1, 3, T, H, W] bf16 in [-1, 1], the input its inference entry point takes
        v = torch.from_numpy(video[a:b]).to(device, non_blocking=True).permute(3, 0, 1, 2)[None]
        return v.to(torch.bfloat16) / 127.5 - 1.0

    def chunk(session, i: int) -> list:
        a = 5 + 4 * i
        return mgr.run_stream_batch(session, tensor(a, a + 4))

    # warm-up stream (kernels, allocator, cudnn autotuning)
    s, _ = mgr.start_stream_session(PROMPT, tensor(0, 5), 0.8)
    for i in range(warmup):
        chunk(s, i)
    torch.cuda.synchronize()

    # prompt encoding alone (its first chunk includes it; ours encodes the prompt when the session opens)
    t0 = time.perf_counter()
    mgr.pipeline.text_encoder(text_prompts=[PROMPT])
    torch.cuda.synchronize()
    text_ms = 1000 * (time.perf_counter() - t0)

    # a fresh stream: TTFF, then the steady state
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    s, first = mgr.start_stream_session(PROMPT, tensor(0, 5), 0.8)
    torch.cuda.synchronize()
    first_ms = 1000 * (time.perf_counter() - t0) - text_ms
    out = 0
    t0 = time.perf_counter()
    for i in range(chunks):
        out += sum(len(o) for o in chunk(s, i))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    log.info("%s: reference %.2f fps (%d frames out)", row, 4 * chunks / elapsed, out)

    # per-stage pass: its three stage methods timed with a device sync around each; one chunk counted
    clock = StageClock(device)
    clock.wrap(mgr.pipeline.vae, "stream_encode", "vae_encode")
    clock.wrap(mgr.pipeline, "inference_stream", "dit")
    clock.wrap(mgr.pipeline.vae, "stream_decode_to_pixel", "vae_decode")
    clock.enabled = True
    for i in range(chunks, chunks + profile_chunks):
        chunk(s, i)
    clock.count = True
    chunk(s, chunks + profile_chunks)
    peak = torch.cuda.max_memory_allocated() / 2**30

    res = RowResult(
        row=row, impl="reference", model=spec["model"], size=f"{h}x{w}", steps=spec["steps"],
        fps=4 * chunks / elapsed, ttff_s=4 / INPUT_FPS + first_ms / 1000, first_chunk_ms=first_ms,
        chunk_ms=1000 * elapsed / chunks, peak_gib=peak, chunks=chunks, load_s=load_s,
        ceiling_tflops=ceiling, note=f"prompt encoding ({text_ms:.0f} ms) taken out of its first chunk",
    )
    for st in ("vae_encode", "dit", "vae_decode"):
        setattr(res, f"{st}_ms", clock.median_ms(st))
        setattr(res, f"{st}_tflop", clock.flops.get(st, 0.0) / 1e12)
        setattr(res, f"{st}_mfu", mfu(clock.flops.get(st), clock.median_ms(st), ceiling))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", required=True, choices=sorted(ROWS))
    ap.add_argument("--root", required=True, type=Path, help="the tree bench.reference_files wrote")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--profile-chunks", type=int, default=8)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(args.row, args.root, args.chunks, args.warmup, args.profile_chunks)
    Path(args.json).write_text(json.dumps(asdict(res), indent=1))
    log.info("%s", asdict(res))


if __name__ == "__main__":
    main()
