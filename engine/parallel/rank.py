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
last rank sends the re-noised rows back to rank 0 as soon as they exist (`ReturnedRows`), then decodes and
sends frames, completions and its timings (`ForwardOutput`). Control messages come back to rank 0 as
acknowledgements. The messages are the typed ones of engine/ring_messages.py.

Block moves (balance.Move across boundary b|b+1): the giver exports the blocks' weights and every
session's KV cache and cross-attention K/V for them; downstream moves ride the ring link before the
`Rebalance` message, so the taker installs them exactly between the forwards before and after; upstream
moves use a back link the taker waits on before it runs anything after `Rebalance`. No forward is dropped or
sees a half-moved layer.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from engine.checkpoint import WeightsLayout
from engine.config import ModelConfig, load_model_config
from engine.dit import Embedded
from engine.parallel.balance import Move, ranges
from engine.build import ParallelOptions
from engine.parallel.profiling import RankProfiler
from engine import ring_messages as M
from engine.parallel.stage import Stage
from engine.timing import ForwardTimes, Lap, StageClock
from engine.parallel.wire import DistLink, Link, LoopbackLink, split_tensors
from engine.rope import Rope
from engine.build import (EngineOptions, build_codecs, build_dit, build_text, build_vae, needs_wan_vae, resolve_dtype,
                          stream_defaults, tune_backends)
from engine.noise import KeyedNoise
from engine.protocol import DECODE_MS
from engine.schedule import Group, first_latent_apart, renoise_rows
from engine.transfer import FrameIO, PendingFrames
from interface.devices import RankDevices
from interface.frame_ring import FrameRing, RingFull

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
        self.fp8 = self.opts.dtype == "fp8"
        self.dtype: torch.dtype = resolve_dtype(self.opts.dtype, self.device)  # refuses fp8 where it cannot run
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
        dit = build_dit(self.cfg, layout, self.device, self.dtype, self.opts.seed, blocks=layers, trunk=trunk,
                        fp8=self.fp8)
        need_vae = needs_wan_vae(self.opts, encodes=self.first, decodes=self.last)
        self.vae = build_vae(self.cfg, layout, self.device, self.dtype, self.opts.seed) if need_vae else None
        # rank 0 encodes, the last rank decodes (a ring of one does both)
        self.encoder, self.decoder = build_codecs(self.cfg, self.opts, self.vae, self.device, self.dtype,
                                                  encodes=self.first, decodes=self.last)
        self.text = build_text(self.cfg, layout, self.device, self.dtype, self.opts.seed) if self.first else None
        self.io = FrameIO(self.device)
        self.rope = Rope(self.cfg.dit.head_dim, self.device)
        self.stage = Stage(dit, self.rope, self.defaults, self.device, self.dtype, layers, fp8=self.fp8)
        self.clock = StageClock(self.device)
        self.profiler = RankProfiler(self.rank, self.device)
        self.renoise_source = KeyedNoise(0, 0, self.device, self.dtype)  # re-seeded per group (last rank)
        self.layout = layout
        parts = [", VAE" if self.vae is not None else "", ", text encoder" if self.first else "",
                 f", {self.opts.encoder} encoder" if self.first and self.opts.encoder != "wan" else "",
                 f", {self.opts.decoder} decoder" if self.last and self.opts.decoder != "wan" else ""]
        log.info("rank %d/%d on %s: blocks %s, trunk %s%s (%.1f s)", self.rank, self.world, self.device,
                 layer_span(layers), trunk, "".join(parts), time.perf_counter() - t0)
        self.stopped = False
        self.output_rings: dict[int, FrameRing] = {}  # last rank: the sessions' output rings
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
    def handle(self, msg: M.RingMessage) -> None:
        """Apply a message arriving from the previous rank (or made by rank 0) and pass it on."""
        if not isinstance(msg, M.Forward):
            self.flush_outputs()  # outputs go back before anything that follows them in the ring
        log.debug("message %s", msg.__class__.__name__)
        match msg:
            case M.Forward():
                self.on_forward(msg)
                return
            case M.OpenSession(sid=sid, context=context, output_ring=ring):
                assert context is not None
                self.stage.open(sid, context)
                if self.last and ring is not None:  # the frames' shortest way to the session's output
                    self.output_rings[sid] = FrameRing.attach(ring)
            case M.ResetStream(sid=sid):
                s = self.stage.sessions[sid]
                s.prompt.reset_blend()
                s.cache = s.decode_state = None
                self.stage.drop_graphs(sid)  # and the first chunk prepared for the old stream
            case M.SetPrompt(sid=sid, chunks=chunks, context=context):
                assert context is not None
                self.stage.set_prompt(sid, context, chunks)
            case M.PrepareFirstChunk(sid=sid, frames=frames):  # a fresh stream's frame 0 is in
                self.stage.prepare_prime(sid, frames)
            case M.CloseSession(sid=sid):
                self.stage.close(sid)
                ring = self.output_rings.pop(sid, None)
                if ring is not None:
                    ring.close()
            case M.Profile():
                self.profiler.arm(msg.directory, msg.first_fid, msg.count)
            case M.Rebalance():
                self.on_rebalance(msg)
                return
            case M.Blocks():
                self.stage.import_layers(msg.layers, msg.tensors)
                return
            case M.Stop() if not self.first:  # rank 0 stops when it comes back around
                self.stopped = True
        # Note / Ping / Stop / session state: pass on (the last rank's "next" is rank 0: an ack); the
        # tensors a control message carried are not needed downstream of the last rank
        self.out_link.send(msg if not self.last or isinstance(msg, M.Ping) else split_tensors(msg)[0])

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

    def on_forward(self, msg: M.Forward) -> None:
        self.profiler.forward(msg.fid)
        assert msg.tokens is not None and msg.e is not None and msg.e6 is not None and msg.x is not None
        emb = Embedded(msg.tokens, msg.e, msg.e6, msg.grid)  # type: ignore[arg-type]
        times = ForwardTimes(msg.fid)
        tokens = self.run_stage(msg.groups, emb, times)
        if not self.last:
            self.clock.add(times)
            records = msg.times + [(self.rank, *r) for r in self.clock.harvest()]
            self.out_link.send(dataclasses.replace(msg, times=records, tokens=tokens))
            return
        self.finish_forward(msg, Embedded(tokens, msg.e, msg.e6, emb.grid), msg.x, times)

    def finish_forward(self, fwd: M.Forward, emb: Embedded, x: torch.Tensor, times: ForwardTimes) -> None:
        """Last rank: head, flow step, rows back to rank 0 at once, then VAE decode and frames."""
        groups = fwd.groups
        lap = self.clock.lap()
        x0 = self.stage.finish(groups, emb, emb.tokens, x)
        back = renoise_rows(x0, groups, self.renoise_source)
        if back:
            self.out_link.send(M.ReturnedRows(fwd.fid, back))
        times.other.append(lap.stop())
        lap = self.clock.lap()
        decoding: list[_Decoding] = []
        start = 0
        for g in groups:
            s = self.stage.sessions[g.sid]
            if g.new_vae:
                s.decode_state = self.decoder.new_stream_state()  # type: ignore[union-attr]
            if g.decode is not None:
                latent = x0[start + g.rows - 1 : start + g.rows]
                decoding.append(_Decoding(g, self.session_parts(latent, s.decode_state), list(g.decode)))
            start += g.rows
        # Every decode is queued before any wait, a part of each session's in turn: each part's copy to
        # the host before the next part's decode, and every session's first frame before any session's
        # others, so a chunk's first frame can leave while the GPU decodes the rest (docs/ARCHITECTURE.md
        # §8). Each session's parts are timed on their own (its stats; admission control).
        made: list[tuple[Group, PendingFrames, list]] = []
        decodes: dict[int, list[Lap]] = {d.group.sid: [] for d in decoding}
        while decoding:
            for d in list(decoding):
                own = self.clock.lap()
                y = next(d.parts, None)
                if y is None:
                    decoding.remove(d)
                    continue
                n = y.shape[2]
                made.append((d.group, self.io.to_uint8_later(y), d.pts[:n]))
                decodes[d.group.sid].append(own.stop())
                d.pts = d.pts[n:]
        last = {g.sid: i for i, (g, _, _) in enumerate(made)}
        early = [p for i, p in enumerate(made) if i != last[p[0].sid]]
        frames = [made[i] for i in sorted(last.values())]
        decode = lap.stop()
        times.other.append(decode)
        self.clock.add(times)
        out = _Outputs(fwd.fid, groups, frames, decodes, fwd.times, early)
        previous, self.deferred = self.deferred, None
        if previous is not None:
            self.send_outputs(previous)  # its frames were copied before this forward's work began
        # Also in a ring of one: sending at once waited for this decode, and the GPU then idled while the
        # host sent the frames and queued the next chunk (39 against 46.6 fps in process on one H200).
        self.deferred = out

    def session_parts(self, latent: torch.Tensor, state: Any) -> Iterator[torch.Tensor]:
        """A session's frames of one forward in parts, in order, each decoded when asked for (a fresh
        stream's first chunk: latent 0's frame alone first)."""
        for z in first_latent_apart(latent):
            yield from self.decoder.stream_decode_parts(z, state)  # type: ignore[union-attr]

    def send_outputs(self, out: "_Outputs") -> None:
        """The forward's frames to rank 0 (waits for their device-to-host copy), with its completions and
        the stage times measured so far."""
        self.send_early(out, wait=True)
        outputs = []
        for g, pending, pts in out.frames:
            keep = [(f, p) for f, p in zip(pending.result(), pts) if p is not None]
            stats = {**g.stats, DECODE_MS: sum(lap.wait().ms() or 0.0 for lap in out.decodes[g.sid])}
            outputs.append(self.session_frames(g.sid, keep, stats))
        records = out.times + [(self.rank, *r) for r in self.clock.harvest()]
        done = [(g.sid, g.done) for g in out.groups if g.done is not None]
        self.out_link.send(M.ForwardOutput(out.fid, outputs, done, records))

    def send_early(self, out: Optional["_Outputs"] = None, wait: bool = False) -> bool:
        """The frames of a forward (the deferred one by default) that go ahead of its output: each
        session's parts but its last (a chunk's first frame; a fresh stream's first two), in order, those
        already on the host (every one, waiting, with `wait`). Earlier forwards' frames have gone already,
        so no stream's frames change order. Whether any went."""
        out = self.deferred if out is None else out
        sent = False
        while out is not None and out.early and (wait or out.early[0][1].ready()):
            g, pending, pts = out.early.pop(0)
            keep = [(f, p) for f, p in zip(pending.result(), pts) if p is not None]
            if keep:
                self.out_link.send(M.EarlyFrames([self.session_frames(g.sid, keep, dict(g.stats))]))
            sent = True
        return sent

    def session_frames(self, sid: int, frames: list[tuple[Any, int]], stats: dict) -> M.SessionFrames:
        """A session's decoded frames with their pts for rank 0: written into the session's output ring
        when it has one (only where they are travels on), else the frames themselves."""
        ring = self.output_rings.get(sid)
        if ring is None:
            return M.SessionFrames(sid, [f for f, _ in frames], [p for _, p in frames], stats)
        first_seq, written, dropped = ring.write_seq, [], 0
        for f, p in frames:
            try:
                ring.write(f, p)
                written.append(p)
            except RingFull:  # the server reads every announcement at once: it is stuck
                dropped += 1
        return M.SessionFrames(sid, [], written, stats, first_seq, dropped)

    def flush_outputs(self) -> None:
        if self.deferred is not None:
            out, self.deferred = self.deferred, None
            self.send_outputs(out)

    def wait_outputs(self) -> None:
        """With nothing else to do: wait for the deferred forward's next frames and send them, its early
        ones first (a chunk's first frame), the rest with its completions on the next call."""
        if self.deferred is not None and self.deferred.early:
            self.send_early(wait=True)
        else:
            self.flush_outputs()

    # -- block moves ---------------------------------------------------------------------------------
    def on_rebalance(self, msg: M.Rebalance) -> None:
        move = Move(msg.boundary, msg.blocks)
        layers = msg.layers
        me = self.rank
        if me == move.giver and move.taker == me + 1:
            self.link(me, move.taker).send(M.Blocks(layers, self.stage.export_layers(layers)))
        if not self.first:  # rank 0 made it; everyone else passes it on (the last rank: back to rank 0)
            self.out_link.send(msg)
        if me == move.giver and move.taker == me - 1:
            self.link(me, move.taker).send(M.Blocks(layers, self.stage.export_layers(layers)))
        if me == move.taker and move.giver == me + 1 and not self.first:
            got = self.link(move.giver, me).recv()
            assert isinstance(got, M.Blocks), type(got).__name__
            self.stage.import_layers(got.layers, got.tensors)
        self.split = list(msg.split)

    # -- the loop of ranks 1..N-1 ----------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stopped:
            self.send_early()
            if self.deferred is not None and not self.in_link.ready():
                self.wait_outputs()  # nothing to start first: send the last forward's frames now
                continue
            self.handle(self.in_link.recv())
        self.flush_outputs()

    def close(self) -> None:
        """After `Stop` went around: every message was delivered, so a peer that already closed its
        end may make waiting on an old send fail; that is not an error any more."""
        for ring in self.output_rings.values():
            ring.close()
        self.output_rings.clear()
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


def layer_span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "none"


@dataclass
class _Decoding:
    """A session's decode in one forward, while its parts are queued."""

    group: Group
    parts: Iterator[torch.Tensor]
    pts: list  # of the frames still to come


@dataclass
class _Outputs:
    """A forward's decoded frames on their way to the host, and what goes back to rank 0 with them."""

    fid: int
    groups: list[Group]
    frames: list[tuple[Group, PendingFrames, list]]  # per session, its last frames on their way (with their pts)
    decodes: dict[int, list[Lap]]  # per session: the timing laps of its decode's parts
    times: list[M.StageRecord]  # upstream ranks' stage times carried by the forward
    early: list[tuple[Group, PendingFrames, list]] = field(default_factory=list)  # the others, sent as they land
