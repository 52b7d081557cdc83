"""A pipeline rank's blocks (engine.parallel.stage.Stage) at real shapes, in one process:

1. exactness: the same forwards (one session; two sessions batched, alone and in turn; a prompt blend;
   a fresh stream batch; first chunks prepared ahead, as when a stream's frame 0 arrives) through a
   stage replaying CUDA graphs and one running eagerly: the blocks' outputs must be equal, and on a GPU
   graphs must have been captured and replayed (the first chunk's too);
2. a block move's cost: two stages holding the halves of the blocks (as ranks 0 and 1 do) are timed
   per forward, then `--move` blocks go from the second to the first through the wire's packing (as an
   upstream move does) and both are timed again; a stage built with those blocks from the start is
   timed alongside. On 2×H200 a 1.3B 2-step move made both stages far slower than their block counts
   say (docs/BENCHMARKS.md); this separates the stage itself (moved tensors, graph re-capture) from
   what happens between ranks.

    python -m bench.check_stage_graphs [--model wan-1.3b --height 480 --width 832 --steps 2]
    python -m bench.check_stage_graphs --model tiny --height 64 --width 64 --device cpu   # a dry run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import pickle
import time
from typing import Callable, Sequence

import torch

from engine.config import load_model_config
from engine.parallel.stage import Group, Stage
from engine.ring_messages import Blocks
from engine.parallel.wire import decode, encode
from engine.rope import Rope
from engine.build import build_dit, embed_prompt, tune_backends

log = logging.getLogger("check")

TRUNK = ["text_embedding", "patch_embedding", "time_embedding", "time_projection"]


class Feed:
    """One session's forwards as the rank sees them: a first forward of one row that expands to
    `steps` rows, then one new latent frame per row and forward (random latents, fixed seed)."""

    def __init__(self, sid: int, steps: int, latent: tuple[int, int, int], device: torch.device, seed: int) -> None:
        self.sid, self.steps, self.latent, self.device = sid, steps, latent, device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.pos = 0
        self.new_batch = True

    def next(self) -> tuple[Group, torch.Tensor]:
        first = self.new_batch
        rows = 1 if first else self.steps
        ts = [999, 750, 500, 250][: self.steps]
        g = Group(sid=self.sid, rows=rows, frames=1, positions=[self.pos] * rows, t=ts[:rows],
                  new_batch=first, expand=self.steps if first and self.steps > 1 else 0)
        self.new_batch = False
        self.pos += 1
        x = torch.randn(rows, 16, 1, *self.latent[1:], generator=self.gen)
        return g, x.to(self.device)

    def restart(self) -> None:
        self.new_batch, self.pos = True, 0

    def prime(self) -> list[tuple[Group, torch.Tensor]]:
        """A fresh stream batch's priming forwards: the first chunk's 2 latents in one row at position 0,
        once per step (the last expands the cache to a row per step)."""
        ts = [999, 750, 500, 250][: self.steps]
        out = []
        for i, t in enumerate(ts):
            g = Group(sid=self.sid, rows=1, frames=2, positions=[0], t=[t], new_batch=i == 0,
                      expand=self.steps if i + 1 == self.steps else 0)
            out.append((g, torch.randn(1, 16, 2, *self.latent[1:], generator=self.gen).to(self.device)))
        self.new_batch, self.pos = False, 2
        return out


def make_stage(cfg, defaults, layers: Sequence[int], device: torch.device, dtype: torch.dtype, graphs: bool,
               seed: int = 0) -> Stage:
    dit = build_dit(cfg, None, device, dtype, seed, blocks=layers, trunk=TRUNK)
    stage = Stage(dit, Rope(cfg.dit.head_dim, device), defaults, device, dtype, layers)
    stage.use_graphs = graphs and device.type == "cuda"
    return stage


def run(stage: Stage, batch: list[tuple[Group, torch.Tensor]]) -> torch.Tensor:
    groups, xs = [g for g, _ in batch], [x for _, x in batch]
    return stage.run(groups, stage.embed(groups, xs))


def exactness(args, cfg, defaults, device, dtype) -> None:
    layers = list(range(cfg.dit.num_layers))
    eager = make_stage(cfg, defaults, layers, device, dtype, graphs=False)
    graphed = Stage(eager.dit, eager.rope, defaults, device, dtype, layers)  # the same weights
    graphed.use_graphs = device.type == "cuda"
    latent = (1, defaults.height // 8, defaults.width // 8)
    prompts = {p: embed_prompt(None, cfg, p, device, dtype) for p in ("a watercolor painting", "a charcoal sketch", "neon")}
    for st in (eager, graphed):
        st.open(1, prompts["a watercolor painting"])
        st.open(2, prompts["a charcoal sketch"])
    # each stage gets its own feeds with the same seeds: the same inputs in the same order
    feeds = {st: {1: Feed(1, args.steps, latent, device, 11), 2: Feed(2, args.steps, latent, device, 22)}
             for st in (eager, graphed)}
    # a pattern that batches, runs alone, and alternates: every graph key the rank meets
    pattern = ([(1,)] * 3 + [(1, 2)] * 12 + [(1,), (2,), (1, 2)] * 6
               + [(1, 2)] * 4 + ["blend"] + [(1, 2)] * 8 + ["reset2"] + [(1, 2)] * 14 + [(1,)] * 6)
    worst, compared = 0.0, 0
    for step in pattern:
        if step == "blend":
            for st in (eager, graphed):
                st.set_prompt(1, prompts["neon"], chunks=3)
            continue
        if step == "reset2":
            for st in (eager, graphed):
                feeds[st][2].restart()
                st.drop_graphs(2)
            continue
        outs = []
        for st in (eager, graphed):
            batch = [feeds[st][sid].next() for sid in sorted(step)]
            outs.append(run(st, batch).float())
        worst = max(worst, (outs[0] - outs[1]).abs().max().item())
        compared += 1
    # fresh streams whose first chunk was prepared when their frame 0 arrived (rank message "prep"):
    # session 2's priming runs eagerly (the shape's first run on this stage), session 1's is then
    # captured ahead and replayed, each priming followed by steady forwards
    replays_before = graphed.replays
    for sid in (2, 1):
        for st in (eager, graphed):
            feeds[st][sid].restart()
            st.drop_graphs(sid)
            st.prepare_prime(sid, 2)
        primes = {st: feeds[st][sid].prime() for st in (eager, graphed)}
        for k in range(len(primes[eager])):
            outs = [run(st, [primes[st][k]]).float() for st in (eager, graphed)]
            worst = max(worst, (outs[0] - outs[1]).abs().max().item())
            compared += 1
        for _ in range(12):
            outs = [run(st, [feeds[st][sid].next()]).float() for st in (eager, graphed)]
            worst = max(worst, (outs[0] - outs[1]).abs().max().item())
            compared += 1
    primed = graphed.prime_replays == args.steps  # session 1's priming forwards (session 2's ran eagerly)
    ok = worst == 0.0
    if device.type == "cuda":
        ok = ok and graphed.captures > 0 and graphed.replays > replays_before + args.steps and primed
    print(f"stage CUDA graphs vs eager ({args.model}, {defaults.height}x{defaults.width}, {args.steps} step(s), "
          f"{compared} forwards incl. two sessions batched, a prompt blend, fresh batches, first chunks prepared "
          f"ahead): max |diff| {worst:g}; first chunk from a graph: {primed}; "
          f"captures {graphed.captures}, replays {graphed.replays}, batch graphs kept {len(graphed.batch_graphs)}"
          f" -> {'OK' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(1)


def timed(device: torch.device) -> Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, float]]:
    def go(fn):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            return out, a.elapsed_time(b)
        t0 = time.perf_counter()
        out = fn()
        return out, 1000.0 * (time.perf_counter() - t0)
    return go


def stage_ms(stages: Sequence[Stage], feed: Feed, forwards: int, warm: int, device: torch.device) -> list[float]:
    """Median ms per forward of each stage (the first `warm` forwards not counted), chained as ranks:
    the first stage's tokens go into the second."""
    clock = timed(device)
    times: list[list[float]] = [[] for _ in stages]
    for i in range(warm + forwards):
        g, x = feed.next()
        emb = stages[0].embed([g], [x])
        for j, st in enumerate(stages):
            tokens, ms = clock(lambda: st.run([g], emb))
            emb = type(emb)(tokens, emb.e, emb.e6, emb.grid)
            if i >= warm:
                times[j].append(ms)
    return [statistics.median(t) for t in times]


def move_cost(args, cfg, defaults, device, dtype) -> None:
    n = cfg.dit.num_layers
    half = n // 2
    k = max(1, min(args.move, n - half - 1))
    latent = (1, defaults.height // 8, defaults.width // 8)
    ctx = embed_prompt(None, cfg, "a watercolor painting", device, dtype)
    window = defaults.num_kv_cache
    for graphs in ((True, False) if device.type == "cuda" else (False,)):
        a = make_stage(cfg, defaults, range(0, half), device, dtype, graphs)
        b = make_stage(cfg, defaults, range(half, n), device, dtype, graphs)
        for st in (a, b):
            st.open(1, ctx)
        feed = Feed(1, args.steps, latent, device, 5)
        warm = window + 4  # the cache fills, then a warm-up forward and a capture
        before = stage_ms([a, b], feed, args.forwards, warm, device)
        moved = list(range(half, half + k))
        raw, entries, buf = encode(Blocks(moved, b.export_layers(moved)), device)
        got = decode(pickle.loads(raw)[0], entries, buf)
        assert isinstance(got, Blocks)
        a.import_layers(got.layers, got.tensors)
        after = stage_ms([a, b], feed, args.forwards, 4, device)
        del a, b, buf
        native = make_stage(cfg, defaults, range(0, half + k), device, dtype, graphs)
        native.open(1, ctx)
        feed = Feed(1, args.steps, latent, device, 5)
        native_ms = stage_ms([native], feed, args.forwards, warm, device)[0]
        del native
        if device.type == "cuda":
            torch.cuda.empty_cache()
        per_a, per_b = before[0] / half, before[1] / (n - half)
        print(f"block move {k} upstream ({'graphs' if graphs else 'eager'}): stage A {half} -> {half + k} blocks "
              f"{before[0]:.2f} -> {after[0]:.2f} ms (by its per-block cost {before[0] + k * per_a:.2f}; built with "
              f"{half + k} blocks: {native_ms:.2f}), stage B {n - half} -> {n - half - k} blocks {before[1]:.2f} -> "
              f"{after[1]:.2f} ms (by its per-block cost {before[1] - k * per_b:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan-1.3b")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--move", type=int, default=3, help="blocks moved upstream in the timing")
    ap.add_argument("--forwards", type=int, default=20, help="timed forwards per measurement")
    ap.add_argument("--skip-move", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    tune_backends(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_model_config(args.model)
    defaults = cfg.stream.model_copy(update=dict(height=args.height, width=args.width, steps=args.steps))
    with torch.no_grad():
        exactness(args, cfg, defaults, device, dtype)
        if not args.skip_move:
            move_cost(args, cfg, defaults, device, dtype)


if __name__ == "__main__":
    main()
