"""One rank of the pipeline: a process (or, under torchrun, rank 0's thread) that builds what it owns
and serves the ring.

Stage roles: rank 0 runs VAE encode, patch/time embedding and the first blocks; middle ranks blocks;
the last rank the last blocks, the head, the flow step (x0, re-noising) and VAE decode. Only the parts
a rank runs are materialised (the DiT is built on the meta device, then its own blocks and trunk parts;
the text encoder on rank 0; the Wan VAE on rank 0 when it is the encoder and on the last rank when it
is the decoder; a light encoder (TAEHV, LightVAE), when chosen, on rank 0 and a light decoder on the last
rank).

The ring: every message goes rank 0 -> 1 -> ... -> last -> rank 0, and each rank handles messages in
arrival order, so session state changes (open, prompt, reset, close, block moves) reach each rank at the
same point of the sequence of forwards. A forward's tokens travel in one packed payload per hop; the
last rank sends the re-noised rows back to rank 0 as soon as they exist ("ret"), then decodes and sends
frames, completions and its timings ("out"). Control messages come back to rank 0 as acknowledgements.

Block moves (balance.Move across boundary b|b+1): the giver exports the blocks' weights and every
session's KV cache and cross-attention K/V for them; downstream moves ride the ring link before the
"reb" message, so the taker installs them exactly between the forwards before and after; upstream
moves use a back link the taker waits on before it runs anything after "reb". No forward is dropped or
sees a half-moved layer.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from engine import attention, flow
from engine.checkpoint import WeightsLayout
from engine.config import ModelConfig, load_model_config
from engine.dit import Embedded
from engine.parallel import protocol as P
from engine.parallel.balance import BlockScheduler, Move, apply_move, even_split, moved_layers, ranges
from engine.parallel.driver import AwaitRows, DriverSession, Emit, Failure, NeedCommand, Submit
from engine.parallel.options import ParallelOptions
from engine.parallel.profiling import RankProfiler
from engine.parallel.slo import BatchScheduler
from engine.parallel.stage import Group, Stage
from engine.timing import ForwardTimes, StageClock
from engine.parallel.wire import DistLink, Link, LoopbackLink, Message
from engine.rope import Rope
from engine.build import (EngineOptions, build_codecs, build_dit, build_text, build_vae, embed_prompt, needs_wan_vae,
                          stream_defaults, tune_backends)
from engine.session import DECODE_MS, engine_info, first_latent_apart
from engine.stream_batch import KeyedNoise
from engine.transfer import FrameIO, PendingFrames
from interface.devices import RankDevices
from interface.messages import EngineInfo

log = logging.getLogger("engine.parallel.rank")

PG_TIMEOUT = datetime.timedelta(days=7)  # ranks idle between sessions; failures are detected elsewhere


@dataclass
class RankSpec:
    """Everything a rank needs to start (picklable: it crosses the spawn)."""

    rank: int
    world: int
    devices: RankDevices
    options: dict  # engine.build.EngineOptions.model_dump()
    init_method: str  # file:// store for spawned ranks, env:// under torchrun
    split: list[int] = field(default_factory=list)


class RankBase:
    """What every rank does: build its parts, apply ring messages in order, run its stage."""

    def __init__(self, spec: RankSpec, events: Any) -> None:
        self.spec, self.events = spec, events
        self.rank, self.world = spec.rank, spec.world
        self.first, self.last = self.rank == 0, self.rank == self.world - 1
        self.opts = EngineOptions.model_validate(spec.options)
        self.popts: ParallelOptions = self.opts.parallel
        self.cfg: ModelConfig = load_model_config(self.opts.model)
        self.device = self._device()
        tune_backends(self.device)
        default_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype: torch.dtype = getattr(torch, self.opts.dtype or default_dtype)
        self.defaults = stream_defaults(self.cfg, self.opts)
        self.split = list(spec.split)
        self._init_groups()

        layout = WeightsLayout(self.opts.weights, self.cfg) if self.opts.weights else None
        trunk = ["text_embedding"]
        if self.first:
            trunk += ["patch_embedding", "time_embedding", "time_projection"]
        if self.last:
            trunk += ["head"]
        layers = list(ranges(self.split)[self.rank])
        t0 = time.perf_counter()
        dit = build_dit(self.cfg, layout, self.device, self.dtype, self.opts.seed, blocks=layers, trunk=trunk)
        need_vae = needs_wan_vae(self.opts, encodes=self.first, decodes=self.last)
        self.vae = build_vae(self.cfg, layout, self.device, self.dtype, self.opts.seed) if need_vae else None
        # rank 0 encodes, the last rank decodes (a ring of one does both)
        self.encoder, self.decoder = build_codecs(self.cfg, self.opts, self.vae, self.device, self.dtype,
                                                  encodes=self.first, decodes=self.last)
        self.text = build_text(self.cfg, layout, self.device, self.dtype, self.opts.seed) if self.first else None
        self.io = FrameIO(self.device)
        self.rope = Rope(self.cfg.dit.head_dim, self.device)
        self.stage = Stage(dit, self.rope, self.defaults, self.device, self.dtype, layers)
        self.clock = StageClock(self.device)
        self.profiler = RankProfiler(self.rank, self.device)
        self.renoise_source = KeyedNoise(0, 0, self.device, self.dtype)  # re-seeded per group (last rank)
        self.layout = layout
        parts = [", VAE" if self.vae is not None else "", ", text encoder" if self.first else "",
                 f", {self.opts.encoder} encoder" if self.first and self.opts.encoder != "wan" else "",
                 f", {self.opts.decoder} decoder" if self.last and self.opts.decoder != "wan" else ""]
        log.info("rank %d/%d on %s: blocks %s, trunk %s%s (%.1f s)", self.rank, self.world, self.device,
                 _span(layers), trunk, "".join(parts), time.perf_counter() - t0)
        self.stopped = False
        # The last rank sends a forward's frames once the next forward's work is queued (or the ring is
        # idle): waiting for their copy to the host right after the decode left its GPU idle while the
        # host pickled and sent them (about 5 ms a forward on 2×H200).
        self.deferred: Optional[_Outputs] = None
        slow = self.popts.slow_block_ms or []
        self.slow_ms = float(slow[self.rank]) if self.rank < len(slow) else 0.0
        if self.world > 1:
            dist.barrier(group=self.ctrl)  # every rank built before rank 0 reports ready

    def _device(self) -> torch.device:
        if self.spec.devices.external:
            if self.spec.devices.kind == "cuda":
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cpu")
        return torch.device(self.spec.devices.devices[self.rank])

    def _init_groups(self) -> None:
        """The process group, then two groups per directed link of the ring and of the back links
        (see wire.DistLink for why each direction has its own). Every rank creates every group, in
        the same order (group creation is collective)."""
        self.links: dict[tuple[int, int], Link] = {}
        if self.world == 1:
            loop = LoopbackLink()
            self.in_link = self.out_link = loop
            return
        backend = self.spec.devices.backend
        kw: dict[str, Any] = {}
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            kw = dict(device_id=self.device)
        dist.init_process_group(backend, init_method=self.spec.init_method, rank=self.rank,
                                world_size=self.world, timeout=PG_TIMEOUT, **kw)
        pairs = [(r, (r + 1) % self.world) for r in range(self.world)]  # the ring
        pairs += [(r + 1, r) for r in range(self.world - 1) if (r + 1, r) not in pairs]  # back links (moves)
        self._groups: dict[tuple[int, int], tuple[Any, Any]] = {}
        for src, dst in pairs:
            members = sorted({src, dst})
            ctrl = dist.new_group(members, backend="gloo", timeout=PG_TIMEOUT)
            data = dist.new_group(members, backend=backend, timeout=PG_TIMEOUT)
            self._groups[(src, dst)] = (ctrl, data)
        self.ctrl = dist.new_group(backend="gloo", timeout=PG_TIMEOUT)  # start-up barrier
        for src, dst in pairs:
            if self.rank in (src, dst):
                ctrl, data = self._groups[(src, dst)]
                self.links[(src, dst)] = DistLink(self.rank, src, dst, ctrl, data, self.device)
        prev, nxt = (self.rank - 1) % self.world, (self.rank + 1) % self.world
        self.in_link = self.links[(prev, self.rank)]
        self.out_link = self.links[(self.rank, nxt)]

    def link(self, src: int, dst: int) -> Link:
        if self.world == 1:
            return self.in_link
        return self.links[(src, dst)]

    # -- messages every rank handles ---------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Apply a message arriving from the previous rank (or made by rank 0) and pass it on."""
        kind, h = msg.kind, msg.header
        if kind != "fwd":
            self.flush_outputs()  # outputs go back before anything that follows them in the ring
        log.debug("message %s %s", kind, {k: v for k, v in h.items() if k in ("sid", "fid", "done")})
        if kind == "fwd":
            self.on_forward(msg)
            return
        if kind == "open":
            self.stage.open(h["sid"], msg.tensors["ctx"])
        elif kind == "ctl":
            s = self.stage.sessions[h["sid"]]
            if h.get("reset"):
                s.prompt.reset_blend()
                s.cache = s.decode_state = None
                self.stage.drop_graphs(h["sid"])  # and the first chunk prepared for the old stream
            if h.get("prompt"):
                self.stage.set_prompt(h["sid"], msg.tensors["ctx"], h["chunks"])
        elif kind == "prep":  # a fresh stream's frame 0 is in: its first chunk follows
            self.stage.prepare_prime(h["sid"], h["frames"])
        elif kind == "close":
            self.stage.close(h["sid"])
        elif kind == "prof":
            self.profiler.arm(h["dir"], h["from"], h["count"])
        elif kind == "reb":
            self.on_rebalance(msg)
            return
        elif kind == "blocks":
            self.stage.import_layers(h["layers"], msg.tensors)
            return
        elif kind == "stop" and not self.first:  # rank 0 stops when it comes back around
            self.stopped = True
        # note / ping / stop / open / ctl / close: pass on (the last rank's "next" is rank 0: an ack);
        # the tensors a control message carried are not needed downstream of the last rank
        self.out_link.send(msg if not self.last else Message(kind, h, msg.tensors if kind == "ping" else {}))

    def run_stage(self, groups: list[Group], emb: Embedded, times: ForwardTimes) -> torch.Tensor:
        lap = self.clock.lap()
        tokens = self.stage.run(groups, emb)
        times.graphed = self.stage.last_graphed
        if self.slow_ms:  # test hook: a slower device
            extra = self.slow_ms * len(self.stage.layers)
            time.sleep(extra / 1000.0)
            if self.device.type == "cuda":
                lap.add(extra)
        times.dit.append(lap.stop())
        return tokens

    def on_forward(self, msg: Message) -> None:
        h, t = msg.header, msg.tensors
        self.profiler.forward(h["fid"])
        groups: list[Group] = h["groups"]
        emb = Embedded(t["tokens"], t["e"], t["e6"], tuple(h["grid"]))  # type: ignore[arg-type]
        times = ForwardTimes(h["fid"])
        tokens = self.run_stage(groups, emb, times)
        if not self.last:
            self.clock.add(times)
            h["times"] = h.get("times", []) + [(self.rank, *r) for r in self.clock.harvest()]
            self.out_link.send(Message("fwd", h, {"tokens": tokens, "e": t["e"], "e6": t["e6"], "x": t["x"]}))
            return
        self.finish_forward(h, groups, Embedded(tokens, t["e"], t["e6"], emb.grid), t["x"], times)

    def finish_forward(self, h: dict, groups: list[Group], emb: Embedded, x: torch.Tensor, times: ForwardTimes) -> None:
        """Last rank: head, flow step, rows back to rank 0 at once, then VAE decode and frames."""
        lap = self.clock.lap()
        x0 = self.stage.finish(groups, emb, emb.tokens, x)
        back, start = {}, 0
        for g in groups:
            xg = x0[start : start + g.rows]
            noise = self.renoise_source
            noise.seed, noise.epoch = g.seed, g.epoch
            for row, t_next, key in g.renoise:
                xg[row : row + 1] = flow.renoise(xg[row : row + 1], noise.draw(xg[row : row + 1].shape, *key), t_next)
            if g.renoise:
                back[f"s{g.sid}"] = xg[: len(g.renoise)]
            start += g.rows
        if back:
            self.out_link.send(Message("ret", {"fid": h["fid"]}, back))
        times.other.append(lap.stop())
        lap = self.clock.lap()
        frames, start = [], 0
        for g in groups:
            s = self.stage.sessions[g.sid]
            if g.new_vae:
                s.decode_state = self.decoder.new_stream_state()  # type: ignore[union-attr]
            if g.decode is not None:
                latents = first_latent_apart(x0[start + g.rows - 1 : start + g.rows])
                pts = [g.decode[:1], g.decode[1:]] if len(latents) > 1 else [g.decode]
                # every decode is queued before any wait
                parts = [(g, self.io.to_uint8_later(self.decoder.stream_decode(z, s.decode_state)), p)  # type: ignore[union-attr]
                         for z, p in zip(latents, pts)]
                if len(parts) > 1 and g.decode[0] is not None:
                    # a fresh stream's first chunk: frame 0 leaves now, while the GPU decodes the rest
                    self.send_early(g, parts.pop(0)[1])
                frames += parts
            start += g.rows
        decode = lap.stop()
        times.other.append(decode)
        self.clock.add(times)
        out = _Outputs(h["fid"], groups, frames, decode, h.get("times", []))
        previous, self.deferred = self.deferred, None
        if previous is not None:
            self.send_outputs(previous)  # its frames were copied before this forward's work began
        # Also in a ring of one: sending at once waited for this decode, and the GPU then idled while the
        # host sent the frames and queued the next chunk (39 against 46.6 fps in process on one H200).
        self.deferred = out

    def send_outputs(self, out: "_Outputs") -> None:
        """The forward's frames to rank 0 (waits for their device-to-host copy), with its completions and
        the stage times measured so far."""
        outputs = []
        for g, pending, pts in out.frames:
            keep = [(f, p) for f, p in zip(pending.result(), pts) if p is not None]
            stats = {**g.stats, DECODE_MS: out.decode.wait().ms() or 0.0}
            outputs.append((g.sid, [f for f, _ in keep], [p for _, p in keep], stats))
        records = out.times + [(self.rank, *r) for r in self.clock.harvest()]
        done = [(g.sid, g.done) for g in out.groups if g.done is not None]
        self.out_link.send(Message("out", {"fid": out.fid, "outputs": outputs, "done": done, "times": records}))

    def send_early(self, g: Group, frame0: PendingFrames) -> None:
        """A fresh stream's frame 0 to rank 0 ahead of the rest of its chunk (waits for that frame's copy
        alone). Frames of earlier forwards go first, so that no stream's frames change order."""
        self.flush_outputs()
        self.out_link.send(Message("early", {"outputs": [(g.sid, [frame0.result()[0]], [g.decode[0]], dict(g.stats))]}))

    def flush_outputs(self) -> None:
        if self.deferred is not None:
            out, self.deferred = self.deferred, None
            self.send_outputs(out)

    # -- block moves ---------------------------------------------------------------------------------
    def on_rebalance(self, msg: Message) -> None:
        h = msg.header
        move = Move(*h["move"])
        layers = h["layers"]
        me = self.rank
        if me == move.giver and move.taker == me + 1:
            self.link(me, move.taker).send(Message("blocks", {"layers": layers}, self.stage.export_layers(layers)))
        if not self.first:  # rank 0 made it; everyone else passes it on (the last rank: back to rank 0)
            self.out_link.send(Message("reb", h))
        if me == move.giver and move.taker == me - 1:
            self.link(me, move.taker).send(Message("blocks", {"layers": layers}, self.stage.export_layers(layers)))
        if me == move.taker and move.giver == me + 1 and not self.first:
            got = self.link(move.giver, me).recv()
            assert got.kind == "blocks", got.kind
            self.stage.import_layers(got.header["layers"], got.tensors)
        self.split = list(h["split"])

    # -- the loop of ranks 1..N-1 ----------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stopped:
            if self.deferred is not None and not self.in_link.ready():
                self.flush_outputs()  # nothing to start first: send the last forward's frames now
            self.handle(self.in_link.recv())
        self.flush_outputs()

    def close(self) -> None:
        """After "stop" went around: every message was delivered, so a peer that already closed its
        end may make waiting on an old send fail; that is not an error any more."""
        for link in self.links.values():
            if isinstance(link, DistLink) and link.src == self.rank:
                try:
                    link.flush()
                except Exception as exc:
                    log.debug("flushing link %d->%d at shutdown: %s", link.src, link.dst, exc)
        if self.world > 1 and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:
                log.debug("destroying the process group: %s", exc)


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "none"


@dataclass
class _Outputs:
    """A forward's decoded frames on their way to the host, and what goes back to rank 0 with them."""

    fid: int
    groups: list[Group]
    frames: list[tuple[Group, PendingFrames, list]]  # (group, its frames on their way, their pts)
    decode: Any  # timing.Lap of the decodes
    times: list  # upstream ranks' stage times carried by the forward


@dataclass
class _InFlight:
    fid: int
    issued: float
    sessions: int
    frames: int
    sids: frozenset = frozenset()
    chain: bool = False
    rows_back: bool = False  # its re-noised rows came back ("ret"): the DiT chain is through


class Rank0(RankBase):
    """Rank 0: the sessions' drivers, batching, the schedulers, and the caller's pipe."""

    def __init__(self, spec: RankSpec, events: Any, commands: Any) -> None:
        super().__init__(spec, events)
        self.commands = commands
        p = self.popts
        self.balancer = BlockScheduler(self.split, every=p.rebalance_every, gain=p.rebalance_gain,
                                       min_ms=p.rebalance_min_ms, min_blocks=p.min_blocks, enabled=p.rebalance,
                                       settle=p.rebalance_settle, ban_windows=p.rebalance_ban_windows)
        self.batcher = BatchScheduler(p.max_batch, p.target_fps, p.deadline_ms)
        # A ring of one holds two forwards, so that one's frames go out while the next is queued.
        self.capacity = p.ring_capacity or max(2, self.world)
        self.drivers: dict[int, tuple[DriverSession, Any]] = {}  # sid -> (driver, generator)
        self.waits: dict[int, Any] = {}  # sid -> what its generator waits for
        self.pending: list[tuple[int, Submit]] = []  # submitted rows, oldest first
        self.issued: dict[int, int] = {}  # sid -> fid its Submit got (resume value)
        self.returns: dict[tuple[int, int], torch.Tensor] = {}
        self.discard: set[tuple[int, int]] = set()
        self.inflight: dict[int, _InFlight] = {}
        self.max_inflight = 0  # most forwards in the ring at once so far
        self.max_stream_overlap = 0  # most steady multi-step forwards of one stream in flight at once
        self.next_fid = 0
        self.timing: dict[int, dict[int, tuple[float, float]]] = {}
        self.balance_from_fid = 0  # forwards before the last move say nothing of the new split
        self.skip_fids: set[int] = set()  # forwards not representative (first chunks)
        self.manual_moves: deque[Move] = deque()
        self.moves: list[dict] = []  # the latest block moves made, automatic or asked for
        self.moves_total = 0
        self.rebalancing = False
        self.awaiting_blocks: Optional[tuple[int, int]] = None
        self.batched_forwards = 0
        self.early_frames = 0  # first frames of fresh streams sent ahead of their chunks
        self.forwards = 0
        self.rank_forwards = [[0, 0] for _ in range(self.world)]  # per rank: blocks from a graph, eager
        self.hop_ms: Optional[float] = None
        self._ping_back: Optional[Message] = None
        self._stats_dirty = True
        self._stats_sent = 0.0

    def embed_prompt(self, prompt: str) -> torch.Tensor:
        return embed_prompt(self.text, self.cfg, prompt, self.device, self.dtype)

    def info(self) -> EngineInfo:
        return engine_info(
            model=self.cfg.name, height=self.defaults.height, width=self.defaults.width, steps=self.defaults.steps,
            random_weights=self.layout is None,
            device=",".join(self.spec.devices.devices) if not self.spec.devices.external else f"torchrun:{self.world}",
            dtype=str(self.dtype).replace("torch.", ""), attention=attention.backend_name(self.device),
            decoder=self.opts.decoder,
            encoder=self.opts.encoder,
        )

    # -- the loop --------------------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stopped:
            busy = self._read_commands()
            busy = self._read_ring() or busy
            busy = self._step_drivers() or busy
            busy = self._issue() or busy
            busy = self._maybe_rebalance() or busy
            self._maybe_send_stats()
            if not busy and not self.stopped:
                if self.deferred is not None:  # a ring of one's last frames: nothing else to queue first
                    self.flush_outputs()
                    continue
                self.commands.poll(0.0005)  # wakes at once on a command; ring messages are polled

    def _send_event(self, event: Any) -> None:
        self.events.send(event)

    def _read_commands(self) -> bool:
        busy = False
        while not self.stopped and self.commands.poll(0):
            busy = True
            cmd = self.commands.recv()
            log.debug("command %s", type(cmd).__name__)
            if isinstance(cmd, P.OpenCmd):
                from interface.controls import StreamParams

                d = DriverSession(self, cmd.sid, cmd.prompt, StreamParams.model_validate(cmd.params))
                self.drivers[cmd.sid] = (d, d.run(cmd.seq))
                self.waits[cmd.sid] = None  # start it
            elif isinstance(cmd, (P.ChunkCmd, P.UpdateCmd, P.DrainCmd, P.CloseCmd)):
                if cmd.sid in self.drivers:
                    self.drivers[cmd.sid][0].commands.append(cmd)
                else:
                    self._send_event(P.Done(cmd.sid, cmd.seq, error="no such session"))
            elif isinstance(cmd, P.RebalanceCmd):
                self.manual_moves.append(Move(cmd.boundary, cmd.blocks))
            elif isinstance(cmd, P.ConfigureCmd):
                if cmd.rebalance is not None:
                    self.balancer.enabled = cmd.rebalance
                    self._stats_dirty = True
                if cmd.profile is not None:
                    directory, count = cmd.profile
                    self._emit(Message("prof", {"dir": directory, "from": self.next_fid, "count": count}))
            elif isinstance(cmd, P.PingCmd):
                self._ping(cmd)
            elif isinstance(cmd, P.StopCmd):
                self._emit(Message("stop", {}))
        return busy

    def _emit(self, msg: Message) -> None:
        """A control message from rank 0: apply it here, then send it around the ring."""
        self.handle(msg)

    # -- sessions' generators --------------------------------------------------------------------------
    def _step_drivers(self) -> bool:
        busy = False
        for sid in list(self.drivers):
            while sid in self.drivers:
                driver, gen = self.drivers[sid]
                w = self.waits[sid]
                if w is None:
                    value = None
                elif isinstance(w, NeedCommand) and driver.commands:
                    value = driver.commands.popleft()
                elif isinstance(w, Submit) and sid in self.issued:
                    value = self.issued.pop(sid)
                elif isinstance(w, AwaitRows) and (w.fid, sid) in self.returns:
                    value = self.returns.pop((w.fid, sid))
                else:
                    break
                busy = True
                self._advance(sid, gen, value)
        return busy

    def _advance(self, sid: int, gen: Any, value: Any) -> None:
        while True:
            try:
                w = gen.send(value) if self.waits[sid] is not None else next(gen)
            except StopIteration:
                self.drivers.pop(sid, None)
                self.waits.pop(sid, None)
                return
            self.waits[sid] = w
            value = None
            if isinstance(w, Emit):
                self._emit(w.msg)
                continue
            if isinstance(w, Failure):
                self._send_event(P.Done(sid, w.seq, error=w.error))
                continue
            if isinstance(w, Submit):
                self.pending.append((sid, w))
            return

    # -- forwards --------------------------------------------------------------------------------------
    def _issue(self) -> bool:
        # Forwards keep flowing during a block move: ring order puts each one wholly before or after it.
        if not self.pending or len(self.inflight) >= self.capacity or self.awaiting_blocks:
            return False
        frames = self.pending[0][1].group.frames
        same = [p for p in self.pending if p[1].group.frames == frames]
        # forwards between a chunk entering and leaving (engine.stream_batch)
        lag = max((len(p[1].group.t) - 1) * self.opts.step_lag if p[1].group.frames == 1 else 0 for p in same)
        b = self.batcher.choose(len(same), lag)
        chosen = same[:b]
        for p in chosen:
            self.pending.remove(p)
        # rows in session order: the same sessions always make the same forward, so one CUDA graph per
        # set of sessions serves it on every rank (a forward's order changes no number)
        chosen.sort(key=lambda p: p[0])
        fid = self.next_fid
        self.next_fid += 1
        self.profiler.forward(fid)
        groups = [s.group for _, s in chosen]
        xs = [s.x for _, s in chosen]
        times = ForwardTimes(fid)
        for _, s in chosen:
            times.other.extend(s.laps)
        lap = self.clock.lap()
        emb = self.stage.embed(groups, xs)
        times.other.append(lap.stop())
        tokens = self.run_stage(groups, emb, times)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        sids = frozenset(g.sid for g in groups)
        chain = frames == 1 and all(g.renoise for g in groups)  # steady forwards of multi-step streams
        if chain:  # ... of the same streams whose rows are not back yet: > 1 means such a stream pipelines
            overlap = 1 + sum(1 for f in self.inflight.values() if f.chain and f.sids & sids and not f.rows_back)
            self.max_stream_overlap = max(self.max_stream_overlap, overlap)
        self.inflight[fid] = _InFlight(fid, time.perf_counter(), len(groups), frames, sids, chain)
        self.max_inflight = max(self.max_inflight, len(self.inflight))
        if frames != 1:
            self.skip_fids.add(fid)
        header = {"fid": fid, "groups": groups, "grid": list(emb.grid), "times": []}
        if self.last:  # a ring of one
            self.finish_forward(header, groups, Embedded(tokens, emb.e, emb.e6, emb.grid), x, times)
        else:
            self.clock.add(times)
            header["times"] = [(self.rank, *r) for r in self.clock.harvest()]
            self.out_link.send(Message("fwd", header, {"tokens": tokens, "e": emb.e, "e6": emb.e6, "x": x}))
        for sid, _ in chosen:
            self.issued[sid] = fid
        self.forwards += 1
        if len(groups) > 1:
            self.batched_forwards += 1
        self._stats_dirty = True
        return True

    # -- what comes back from the last rank (and back links) -----------------------------------------
    def _read_ring(self) -> bool:
        busy = False
        while not self.stopped and self.in_link.ready():
            busy = True
            self._on_return(self.in_link.recv())
        if self.awaiting_blocks is not None and not self.stopped:
            link = self.link(*self.awaiting_blocks)
            if link is not self.in_link and link.ready():
                self._on_return(link.recv())
                busy = True
        return busy

    def _on_return(self, msg: Message) -> None:
        kind, h = msg.kind, msg.header
        if kind == "ret":
            if h["fid"] in self.inflight:
                self.inflight[h["fid"]].rows_back = True
            for name, rows in msg.tensors.items():
                key = (h["fid"], int(name[1:]))
                if key in self.discard:
                    self.discard.discard(key)
                else:
                    self.returns[key] = rows
        elif kind == "out":
            self._on_out(h)
        elif kind == "early":  # a fresh stream's frame 0, ahead of its chunk's "out"
            for sid, frames, pts, stats in h["outputs"]:
                self._send_event(P.Output(sid, frames, pts, stats))
                self.early_frames += len(frames)
            self._stats_dirty = True
        elif kind == "blocks":
            self.stage.import_layers(h["layers"], msg.tensors)
            self.awaiting_blocks = None
            self._stats_dirty = True
        elif kind == "reb":
            self.rebalancing = False
            self._stats_dirty = True
        elif kind == "ping":
            self._ping_back = msg
        elif kind == "stop":
            self.stopped = True
        elif h.get("done") is not None:  # open / ctl / close / note acknowledgements
            self._send_event(P.Done(h["sid"], h["done"]))

    def _on_out(self, h: dict) -> None:
        now = time.perf_counter()
        f = self.inflight.pop(h["fid"], None)
        latency = None if f is None else 1000.0 * (now - f.issued)
        for sid, frames, pts, stats in h["outputs"]:
            if latency is not None:
                stats = dict(stats, latency_ms=latency)
            self._send_event(P.Output(sid, frames, pts, stats))
        for sid, seq in h["done"]:
            self._send_event(P.Done(sid, seq))
        if f is not None and f.frames == 1 and latency is not None:
            self.batcher.observe(f.sessions, latency)
        for rank, fid, dit_ms, other_ms, graphed in list(h["times"]) + [(self.rank, *r) for r in self.clock.harvest()]:
            self.timing.setdefault(fid, {})[rank] = (dit_ms, other_ms)
            self.rank_forwards[rank][0 if graphed else 1] += 1
        for fid in sorted(self.timing):
            rec = self.timing[fid]
            if len(rec) == self.world:
                del self.timing[fid]
                if fid >= self.balance_from_fid and fid not in self.skip_fids:
                    self.balancer.observe([rec[r] for r in range(self.world)])
                self.skip_fids.discard(fid)
        for fid in [k for k in self.timing if k < self.next_fid - 256]:
            del self.timing[fid]
        self._stats_dirty = True

    # -- block moves ---------------------------------------------------------------------------------
    def _maybe_rebalance(self) -> bool:
        if self.rebalancing or self.awaiting_blocks or self.world < 2:
            return False
        manual = bool(self.manual_moves)
        move = self.manual_moves.popleft() if manual else self.balancer.decide()
        if move is None:
            return False
        if not (0 <= move.boundary < self.world - 1) or move.blocks == 0 or \
                self.split[move.giver] - abs(move.blocks) < 0:
            log.warning("ignoring impossible block move %s for split %s", move, self.split)
            return False
        layers = moved_layers(self.split, move)
        after = apply_move(self.split, move)
        self.moves.append(dict(time=time.time(), forward=self.next_fid, boundary=move.boundary, blocks=move.blocks,
                               layers=layers, split_before=list(self.split), split_after=after,
                               automatic=not manual))
        del self.moves[:-32]
        self.moves_total += 1
        log.info("moving blocks %s from rank %d to rank %d (split %s -> %s)", layers, move.giver, move.taker,
                 self.split, after)
        self.rebalancing = True
        self.balance_from_fid = self.next_fid
        msg = Message("reb", {"move": (move.boundary, move.blocks), "layers": layers, "split": after})
        self.on_rebalance(msg)  # rank 0's part (giver or taker), then around the ring
        self.out_link.send(msg)
        if move.taker == 0:
            self.awaiting_blocks = (move.giver, 0)
        self.balancer.applied(move)
        self._maybe_send_stats(force=True)  # /metrics shows a move at once
        return True

    # -- hop time ----------------------------------------------------------------------------------------
    def _ping(self, cmd: P.PingCmd) -> None:
        """Round trips of a payload of `nbytes` through the ring; per hop = round trip / ranks. Run when
        idle (the bench calls it between streams): it synchronises the device to time real transfers."""
        if self.world == 1:
            self._send_event(P.PingResult(0.0, []))
            return
        buf = torch.zeros(max(1, cmd.nbytes), dtype=torch.uint8, device=self.device)
        rtts = []
        for i in range(cmd.repeats + 2):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._ping_back = None
            t0 = time.perf_counter()
            self.out_link.send(Message("ping", {"i": i}, {"buf": buf}))
            while self._ping_back is None:
                self._on_return(self.in_link.recv())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i >= 2:  # the first round trips set up connections
                rtts.append(1000.0 * (time.perf_counter() - t0))
        rtts.sort()
        self.hop_ms = rtts[len(rtts) // 2] / self.world
        self._send_event(P.PingResult(self.hop_ms, rtts))
        self._stats_dirty = True

    # -- stats for the caller (and the server's /metrics) ----------------------------------------------
    def stats(self) -> dict:
        return dict(
            world=self.world, devices=list(self.spec.devices.devices), split=list(self.split),
            blocks=[_span(list(r)) for r in ranges(self.split)], forwards=self.forwards,
            batched_forwards=self.batched_forwards, early_frames=self.early_frames, inflight=len(self.inflight),
            capacity=self.capacity,
            graphs=[dict(rank=r, replayed=g, eager=e) for r, (g, e) in enumerate(self.rank_forwards)],
            max_inflight=self.max_inflight, max_stream_overlap=self.max_stream_overlap,
            sessions=len(self.drivers), hop_ms=self.hop_ms, moves=list(self.moves), moves_total=self.moves_total,
            balance=self.balancer.stats(), batch=self.batcher.stats(),
        )

    def _maybe_send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or (self._stats_dirty and now - self._stats_sent > 0.25):
            self._send_event(P.Stats(self.stats()))
            self._stats_sent, self._stats_dirty = now, False


# -- process entry points ---------------------------------------------------------------------------------
def _watch_parent(ppid: int) -> None:
    """Spawned ranks die with their caller, also when it is killed (no orphans holding GPUs)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(3)


def _setup_logging(rank: int, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")


def rank_main(spec: RankSpec, events: Any, commands: Any, ppid: Optional[int]) -> None:
    """Entry point of a rank (a spawned process, or rank 0's thread under torchrun)."""
    if ppid is not None:
        _setup_logging(spec.rank, logging.DEBUG if os.environ.get("STREAMGEN_PARALLEL_DEBUG") else logging.INFO)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is it stuck?
        threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
        # CPU ranks keep torch's default thread count even though they share the cores: some CPU
        # kernels (oneDNN convolutions) sum in another order with another thread count, and a rank
        # count must not change a frame.
    r: Optional[RankBase] = None
    try:
        with torch.no_grad():
            r = Rank0(spec, events, commands) if spec.rank == 0 else RankBase(spec, events)
            if spec.rank == 0:
                events.send(P.Ready(0, r.info(), r.split))  # type: ignore[attr-defined]
                r._maybe_send_stats(force=True)  # type: ignore[attr-defined]
            r.serve()
    except BaseException as exc:  # report, then die: a rank that failed leaves the ring inconsistent
        log.error("rank %d failed: %s", spec.rank, traceback.format_exc())
        if events is not None:
            try:
                events.send(P.Failed(spec.rank, f"rank {spec.rank}: {type(exc).__name__}: {exc}"))
            except Exception:
                pass
        if ppid is not None:
            os._exit(1)
        raise
    finally:
        if r is not None:
            try:
                r.profiler.finish()
            except Exception as exc:  # a profile is a diagnostic: it never masks how the rank ended
                log.warning("rank %d: profile not written: %s", spec.rank, exc)
            if r.stopped:
                r.close()
    log.info("rank %d stopped", spec.rank)
