"""Rank 0, the engine's core: besides its stage (engine/parallel/rank.py) it runs the sessions'
schedules (engine.schedule), batches several sessions into one forward under the SLO, runs the block
scheduler, and takes the caller's commands (docs/ARCHITECTURE.md §5, docs/PARALLEL.md). The other ranks
only execute. In a ring of one (the in-process engine, engine.runtime) it is the whole engine, stepped
by the caller's thread; in a ring of several it serves in its own process."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine import attention
from engine.dit import Embedded
from engine import protocol as P
from engine.protocol import DIT_MS, ENCODE_MS, engine_info
from engine.parallel.balance import BlockScheduler, Move, apply_move, moved_layers, ranges
from engine.schedule import AwaitRows, Emit, Failure, NeedCommand, SessionSchedule, Submit
from engine.parallel.slo import BatchScheduler
from engine.timing import ForwardTimes
from engine import ring_messages as M
from engine.build import embed_prompt
from interface.controls import StreamParams
from interface.messages import EngineInfo
from engine.parallel.rank import RankBase, RankSpec, layer_span

log = logging.getLogger("engine.parallel.rank")


@dataclass
class _Arrivals:
    """When a session's chunks reach the core: the latest, and the usual interval between two."""

    last: float
    interval: Optional[float] = None

    def add(self, now: float) -> None:
        gap = now - self.last
        self.interval = gap if self.interval is None else self.interval + 0.3 * (gap - self.interval)
        self.last = now

    def next_due(self, now: float) -> Optional[float]:
        """When the next chunk is expected; None when unknown, or overdue by half an interval or more
        (a session that has paused is not waited for)."""
        if self.interval is None:
            return None
        due = self.last + self.interval
        return None if now > due + 0.5 * self.interval else due


@dataclass
class _InFlight:
    fid: int
    issued: float
    sessions: int
    frames: int
    sids: frozenset = frozenset()
    chain: bool = False
    rows_back: bool = False  # its re-noised rows came back (ReturnedRows): the DiT chain is through


class Rank0(RankBase):
    """Rank 0: the sessions' schedules, batching, the schedulers, and the caller's commands."""

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
        self.drivers: dict[int, tuple[SessionSchedule, Any]] = {}  # sid -> (schedule, its generator)
        # per session, for its chunks' stats: its latest chunk's encode laps, its latest timed forward's
        # DiT ms (all ranks); the sessions of forwards whose times are not all in yet
        self.encode_laps: dict[int, list] = {}
        self.encode_ms: dict[int, float] = {}
        self.dit_ms: dict[int, float] = {}
        self.fid_sids: dict[int, list[int]] = {}
        self.waits: dict[int, Any] = {}  # sid -> what its generator waits for
        self.pending: list[tuple[int, Submit]] = []  # submitted rows, oldest first
        self.arrivals: dict[int, _Arrivals] = {}  # sid -> when its new chunks come (steady forwards)
        self.issued: dict[int, int] = {}  # sid -> fid its Submit got (resume value)
        self.returns: dict[tuple[int, int], torch.Tensor] = {}
        self.discard: set[tuple[int, int]] = set()
        self.inflight: dict[int, _InFlight] = {}
        self.max_inflight = 0  # most forwards in the ring at once so far
        self.max_stream_overlap = 0  # most steady multi-step forwards of one stream in flight at once
        self.next_fid = 0
        self._waiting_since: Optional[tuple[float, int]] = None  # (when, sessions then) while forwards wait
        self.timing: dict[int, dict[int, tuple[float, float]]] = {}
        self.balance_from_fid = 0  # forwards before the last move say nothing of the new split
        self.skip_fids: set[int] = set()  # forwards not representative (first chunks)
        self.manual_moves: deque[Move] = deque()
        self.moves: list[P.BlockMove] = []  # the latest block moves made, automatic or asked for
        self.moves_total = 0
        self.rebalancing = False
        self.awaiting_blocks: Optional[tuple[int, int]] = None
        self.batched_forwards = 0
        self.early_frames = 0  # first frames of fresh streams sent ahead of their chunks
        self.forwards = 0
        self.rank_forwards = [[0, 0] for _ in range(self.world)]  # per rank: blocks from a graph, eager
        self.hop_ms: Optional[float] = None
        self._ping_back: Optional[M.Ping] = None
        self._stats_dirty = True
        self._stats_sent = 0.0

    def drop_sessions(self) -> None:
        """Forget every session at once (the engine is closing): their schedules, the forwards waiting
        for them, and the stage's caches and graphs."""
        self.drivers.clear()
        self.waits.clear()
        self.pending.clear()
        self.arrivals.clear()
        self._waiting_since = None
        self.returns.clear()
        self.deferred = None
        self.stage.drop_graphs()
        self.stage.sessions.clear()

    def embed_prompt(self, prompt: str) -> torch.Tensor:
        return embed_prompt(self.text, self.cfg, prompt, self.device, self.dtype)

    def info(self) -> EngineInfo:
        return engine_info(
            model=self.cfg.name, height=self.defaults.height, width=self.defaults.width, steps=self.defaults.steps,
            random_weights=self.layout is None,
            device=",".join(self.spec.devices.devices) if not self.spec.devices.external else f"torchrun:{self.world}",
            dtype="fp8" if self.fp8 else str(self.dtype).replace("torch.", ""), attention=attention.backend_name(self.device),
            decoder=self.opts.decoder,
            encoder=self.opts.encoder,
        )

    # -- the loop --------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One round of everything there is to do without waiting; False when there was nothing."""
        busy = self._read_commands()
        busy = self._read_ring() or busy
        busy = self._step_drivers() or busy
        busy = self._issue() or busy
        busy = self.send_early() or busy  # a ring of one's frames that land ahead of their forward's output
        busy = self._maybe_rebalance() or busy
        self._maybe_send_stats()
        return busy

    def serve(self) -> None:
        while not self.stopped:
            busy = self.step()
            if not busy and not self.stopped:
                if self.deferred is not None:  # a ring of one's last frames: nothing else to queue first
                    self.wait_outputs()
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
                d = SessionSchedule(self, cmd.sid, cmd.prompt, StreamParams.model_validate(cmd.params), cmd.output_ring)
                self.drivers[cmd.sid] = (d, d.run(cmd.seq))
                self.waits[cmd.sid] = None  # start it
            elif isinstance(cmd, (P.ChunkCmd, P.AheadCmd, P.UpdateCmd, P.DrainCmd, P.CloseCmd)):
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
                    self._emit(M.Profile(directory, self.next_fid, count))
            elif isinstance(cmd, P.PingCmd):
                self._ping(cmd)
            elif isinstance(cmd, P.StopCmd):
                self._emit(M.Stop())
        return busy

    def _emit(self, msg: M.RingMessage) -> None:
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
                self.encode_laps.pop(sid, None)
                self.arrivals.pop(sid, None)
                self.encode_ms.pop(sid, None)
                self.dit_ms.pop(sid, None)
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
                if w.group.frames == 1 and w.laps:  # a new chunk of a steady stream (not a drain's filler)
                    now = time.perf_counter()
                    if sid in self.arrivals:
                        self.arrivals[sid].add(now)
                    else:
                        self.arrivals[sid] = _Arrivals(now)
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
        if frames == 1 and self._wait_for_others(same, lag):
            return False
        b = self.batcher.choose(len(same), lag)
        chosen = same[:b]
        if self._waiting_since is not None:
            since, alone = self._waiting_since
            self.batcher.waited(1000.0 * (time.perf_counter() - since), len(chosen) - alone)
            self._waiting_since = None
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
        for sid, s in chosen:
            times.other.extend(s.laps)
            if s.laps:
                self.encode_laps[sid] = s.laps
        self.fid_sids[fid] = [sid for sid, _ in chosen]
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
        if self.last:  # a ring of one
            fwd = M.Forward(fid, groups, tuple(emb.grid), [])
            self.finish_forward(fwd, Embedded(tokens, emb.e, emb.e6, emb.grid), x, times)
        else:
            self.clock.add(times)
            records = [(self.rank, *r) for r in self.clock.harvest()]
            self.out_link.send(M.Forward(fid, groups, tuple(emb.grid), records, tokens, emb.e, emb.e6, x))
        for sid, _ in chosen:
            self.issued[sid] = fid
        self.forwards += 1
        if len(groups) > 1:
            self.batched_forwards += 1
        self._stats_dirty = True
        return True

    def _wait_for_others(self, same: list[tuple[int, Submit]], lag: int) -> bool:
        """Whether steady forwards that could go now wait for other sessions' chunks, to share one forward.
        Only while the device is busy anyway (the rows would queue behind its work: waiting costs no device
        time), only for sessions whose next chunk is expected before the bound, and never beyond the bound
        the SLO leaves (engine.parallel.slo), or `batch_wait_ms`."""
        if not self._device_busy():
            return False
        bound = self.batcher.wait_bound_ms(len(same), lag)
        if self.popts.batch_wait_ms is not None:
            bound = min(bound, self.popts.batch_wait_ms)
        now = time.perf_counter()
        since = now if self._waiting_since is None else self._waiting_since[0]
        limit = since + bound / 1000.0
        if now >= limit:
            return False
        here = {sid for sid, _ in same}
        due = [a.next_due(now) for sid, a in self.arrivals.items() if sid not in here and sid in self.drivers]
        if not any(d is not None and d <= limit for d in due):
            return False
        if self._waiting_since is None:
            self._waiting_since = (now, len(same))
        return True

    def _device_busy(self) -> bool:
        """On a ring of one, whether the device still works on forwards (the newest one's frames are not on
        the host yet). A ring of several never waits: rank 0 would idle while its next blocks could run,
        and its forwards meet anyway once the ring is full."""
        if not self.inflight or self.world > 1:
            return False
        d = self.deferred
        return d is not None and not all(pending.ready() for _, pending, _ in d.frames)

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

    def _on_return(self, msg: M.RingMessage) -> None:
        match msg:
            case M.ReturnedRows(fid=fid, rows=rows):
                if fid in self.inflight:
                    self.inflight[fid].rows_back = True
                for sid, r in rows.items():
                    if (fid, sid) in self.discard:
                        self.discard.discard((fid, sid))
                    else:
                        self.returns[(fid, sid)] = r
            case M.ForwardOutput():
                self._on_out(msg)
            case M.EarlyFrames(outputs=outputs):  # a chunk's first frame(s), ahead of the chunk's output
                for o in outputs:
                    self._send_event(P.Output(o.sid, o.frames, o.pts, o.stats, o.first_seq, o.dropped))
                    self.early_frames += len(o.pts)
                self._stats_dirty = True
            case M.Blocks():
                self.stage.import_layers(msg.layers, msg.tensors)
                self.awaiting_blocks = None
                self._stats_dirty = True
            case M.Rebalance():
                self.rebalancing = False
                self._stats_dirty = True
            case M.Ping():
                self._ping_back = msg
            case M.Stop():
                self.stopped = True
            # session state coming back around: acknowledgements
            case M.OpenSession(sid=sid, done=done) | M.Note(sid=sid, done=done) | \
                    M.PrepareFirstChunk(sid=sid, done=done) | M.CloseSession(sid=sid, done=done) if done is not None:
                self._send_event(P.Done(sid, done))
            case M.ResetStream() | M.SetPrompt() | M.CloseSession() | M.Profile():
                pass  # back around, nothing to acknowledge
            case _:
                raise TypeError(f"rank 0 got an unexpected ring message: {type(msg).__name__}")

    def _on_out(self, out: M.ForwardOutput) -> None:
        now = time.perf_counter()
        f = self.inflight.pop(out.fid, None)
        latency = None if f is None else 1000.0 * (now - f.issued)
        for rank, fid, dit_ms, other_ms, graphed in list(out.times) + [(self.rank, *r) for r in self.clock.harvest()]:
            self.timing.setdefault(fid, {})[rank] = (dit_ms, other_ms)
            self.rank_forwards[rank][0 if graphed else 1] += 1
        for fid in sorted(self.timing):
            rec = self.timing[fid]
            if len(rec) == self.world:
                del self.timing[fid]
                sids = self.fid_sids.pop(fid, [])
                for sid in sids:  # a session's share of its latest timed forward's DiT time (all ranks)
                    self.dit_ms[sid] = sum(d for d, _ in rec.values()) / len(sids)
                if fid >= self.balance_from_fid and fid not in self.skip_fids:
                    self.balancer.observe([rec[r] for r in range(self.world)])
                self.skip_fids.discard(fid)
        for fid in [k for k in self.timing if k < self.next_fid - 256]:
            del self.timing[fid]
            self.fid_sids.pop(fid, None)
        for o in out.outputs:
            stats = dict(o.stats)
            if latency is not None:
                stats["latency_ms"] = latency
            encode = [lap.ms() for lap in self.encode_laps.get(o.sid, [])]
            if encode and None not in encode:  # else the last one measured (the latest may still run)
                self.encode_ms[o.sid] = float(sum(encode))  # type: ignore[arg-type]
            if o.sid in self.encode_ms:
                stats[ENCODE_MS] = self.encode_ms[o.sid]
            if o.sid in self.dit_ms:
                stats[DIT_MS] = self.dit_ms[o.sid]
            self._send_event(P.Output(o.sid, o.frames, o.pts, stats, o.first_seq, o.dropped))
        for sid, seq in out.done:
            self._send_event(P.Done(sid, seq))
        if f is not None and f.frames == 1 and latency is not None:
            self.batcher.observe(f.sessions, latency)
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
        self.moves.append(P.BlockMove(time=time.time(), forward=self.next_fid, boundary=move.boundary,
                                      blocks=move.blocks, layers=layers, split_before=list(self.split),
                                      split_after=after, automatic=not manual))
        del self.moves[:-32]
        self.moves_total += 1
        log.info("moving blocks %s from rank %d to rank %d (split %s -> %s)", layers, move.giver, move.taker,
                 self.split, after)
        self.rebalancing = True
        self.balance_from_fid = self.next_fid
        msg = M.Rebalance(move.boundary, move.blocks, layers, after)
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
            self.out_link.send(M.Ping(i, buf))
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
    def stats(self) -> P.RingStats:
        return P.RingStats(
            world=self.world, devices=list(self.spec.devices.devices), split=list(self.split),
            blocks=[layer_span(list(r)) for r in ranges(self.split)], forwards=self.forwards,
            batched_forwards=self.batched_forwards, early_frames=self.early_frames, inflight=len(self.inflight),
            capacity=self.capacity,
            graphs=[P.RankForwards(rank=r, replayed=g, eager=e) for r, (g, e) in enumerate(self.rank_forwards)],
            max_inflight=self.max_inflight, max_stream_overlap=self.max_stream_overlap,
            sessions=len(self.drivers), hop_ms=self.hop_ms, moves=list(self.moves), moves_total=self.moves_total,
            balance=self.balancer.stats(), batch=self.batcher.stats(),
        )

    def _maybe_send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or (self._stats_dirty and now - self._stats_sent > 0.25):
            self._send_event(P.Stats(self.stats()))
            self._stats_sent, self._stats_dirty = now, False
