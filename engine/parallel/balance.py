"""Block scheduler: moves DiT blocks between neighbouring ranks until the stage times balance.

Each rank reports, per forward, the time of its blocks and of the rest of its share (rank 0: VAE encode
and embedding; the last rank: head, flow step and VAE decode). From the medians since the last change
the scheduler predicts, for every boundary and every number of blocks moved across it, the slowest
stage after the move (a block costs what the blocks of the rank receiving it cost there, so unequal
devices are handled), and takes the best move only when it shortens the slowest stage by a real margin
(hysteresis: a relative and an absolute threshold, doubled to undo the previous move at a boundary,
and a fresh window of measurements after each change). It then goes half way (at least one block):
per-block costs are estimates (on a host-bound GPU a stage's time is not proportional to its blocks),
and overshooting makes the next decision undo this one. Decisions are kept for /metrics.

Every move is checked once a fresh window of measurements exists: if the slowest stage came out worse
than before the move (per-block costs are only estimates: on 2×H200 a 1.3B 2-step stream got slower
after its first move), a second fresh window is measured, and only if it reads worse too is the move
rolled back and that direction across that boundary left alone for `ban_windows` windows. One window
alone misjudged moves on 2×H200: 15/15 -> 19/11 read 48.8 -> 50.4 ms right after the move, while 19/11
held from the start ran its stages at 38/44 ms and 81.7 fps against 75.2 (docs/BENCHMARKS.md, sixth
round); a ban for good then kept the pipeline on the slower split.

The first `settle` forwards after a change are not measured: forwards that were in flight during the
move ran on the old split, and the moved layers' first forwards run eagerly while their CUDA graphs are
captured again (on 2×H200 those made a helpful move read as 33 % worse).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from engine.protocol import Ban, BalanceStats, StageTimes
from interface.messages import BlockDecision

log = logging.getLogger("engine.parallel.balance")


@dataclass(frozen=True)
class Move:
    boundary: int  # between rank `boundary` and rank `boundary + 1`
    blocks: int  # > 0: that many blocks go downstream (boundary -> boundary+1); < 0: upstream

    @property
    def giver(self) -> int:
        return self.boundary if self.blocks > 0 else self.boundary + 1

    @property
    def taker(self) -> int:
        return self.boundary + 1 if self.blocks > 0 else self.boundary


def ranges(split: Sequence[int]) -> list[range]:
    out, start = [], 0
    for n in split:
        out.append(range(start, start + n))
        start += n
    return out


def even_split(layers: int, world: int) -> list[int]:
    """Contiguous shares; the remainder goes to the middle ranks (the end ranks also run the VAE)."""
    base, extra = divmod(layers, world)
    split = [base] * world
    order = list(range(1, world - 1)) + [0, world - 1] if world > 2 else list(range(world))
    for r in order[:extra]:
        split[r] += 1
    return split


def moved_layers(split: Sequence[int], move: Move) -> list[int]:
    r = ranges(split)[move.giver]
    k = abs(move.blocks)
    return list(r[-k:]) if move.blocks > 0 else list(r[:k])


def apply_move(split: Sequence[int], move: Move) -> list[int]:
    out = list(split)
    out[move.giver] -= abs(move.blocks)
    out[move.taker] += abs(move.blocks)
    return out


class BlockScheduler:
    def __init__(self, split: Sequence[int], every: int = 8, gain: float = 0.08, min_ms: float = 0.5,
                 min_blocks: int = 1, enabled: bool = True, settle: int = 0, ban_windows: int = 16) -> None:
        self.split = list(split)
        self.every, self.gain, self.min_ms, self.min_blocks = every, gain, min_ms, min_blocks
        self.settle = settle
        self._skip = 0  # forwards still to ignore after the last change
        self.enabled = enabled
        self._samples: list[list[tuple[float, float]]] = []  # since the last change: per forward, per rank
        self._last_sign: dict[int, int] = {}  # boundary -> direction of the last move across it
        self._check: Optional[tuple[Move, float]] = None  # the last move and the slowest stage before it
        self._strikes = 0  # windows since that move that read worse
        self._rollback: Optional[Move] = None  # decided and not yet applied
        self.ban_windows = ban_windows
        # (boundary, direction) that made things worse -> the observed forward count when the ban ends
        self._bans: dict[tuple[int, int], int] = {}
        self.decisions: list[BlockDecision] = []
        self.observed = 0

    # -- measurements --------------------------------------------------------------------------------
    def observe(self, per_rank: Sequence[tuple[float, float]]) -> None:
        """One forward: (dit_ms, other_ms) of each rank, in rank order."""
        if len(per_rank) != len(self.split):
            return
        if self._skip > 0:
            self._skip -= 1
            return
        self._samples.append([(float(d), float(o)) for d, o in per_rank])
        del self._samples[: -4 * self.every]
        self.observed += 1

    def stage_ms(self) -> Optional[list[tuple[float, float]]]:
        """Median (dit_ms, other_ms) per rank since the last change."""
        if not self._samples:
            return None
        world = len(self.split)
        return [
            (statistics.median(s[r][0] for s in self._samples), statistics.median(s[r][1] for s in self._samples))
            for r in range(world)
        ]

    # -- decisions -----------------------------------------------------------------------------------
    def decide(self) -> Optional[Move]:
        if not self.enabled or len(self.split) < 2 or len(self._samples) < self.every:
            return None
        stage = self.stage_ms()
        assert stage is not None
        if self._check is not None:
            undo = self._verify(stage)
            if undo is not None or self._check is not None:  # a rollback, or a second window to measure
                return undo
        move, before, after = self.best_move(stage)
        if move is None:
            return None
        threshold = max(self.min_ms, self.gain * before)
        sign = 1 if move.blocks > 0 else -1
        if self._last_sign.get(move.boundary, sign) != sign:
            threshold *= 2  # undoing the last move across this boundary needs a clearer case
        if before - after < threshold:
            return None
        move = Move(move.boundary, sign * max(1, (abs(move.blocks) + 1) // 2))  # half way
        after = self.predict(stage, move)
        self.decisions.append(BlockDecision(
            time=time.time(), forward=self.observed, boundary=move.boundary, blocks=move.blocks,
            split_before=list(self.split), split_after=apply_move(self.split, move),
            slowest_ms_before=round(before, 3), slowest_ms_predicted=round(after, 3),
            stage_ms=[round(d + o, 3) for d, o in stage],
        ))
        del self.decisions[:-32]
        log.info("block scheduler: move %d block(s) %s across boundary %d|%d: split %s -> %s, slowest stage "
                 "%.1f ms -> %.1f ms predicted (stages %s ms)", abs(move.blocks),
                 "downstream" if move.blocks > 0 else "upstream", move.boundary, move.boundary + 1, self.split,
                 apply_move(self.split, move), before, after, [round(d + o, 1) for d, o in stage])
        return move

    @property
    def banned(self) -> set[tuple[int, int]]:
        """(boundary, direction) pairs not tried now: they made things worse not long ago."""
        return {k for k, until in self._bans.items() if self.observed < until}

    def _verify(self, stage: Sequence[tuple[float, float]]) -> Optional[Move]:
        """The reverse of the last move if two fresh windows in a row found the slowest stage worse than
        before it (by a margin), else None (after a first such window, a second one is measured)."""
        assert self._check is not None
        move, before = self._check
        now = max(d + o for d, o in stage)
        if now <= before + max(self.min_ms, 0.5 * self.gain * before):
            self._check, self._strikes = None, 0
            return None
        self._strikes += 1
        if self._strikes < 2:
            log.info("block scheduler: the slowest stage read %.1f ms after the last move (%.1f ms before); "
                     "measuring a second window before judging it", now, before)
            self._samples.clear()
            return None
        self._check, self._strikes = None, 0
        undo = Move(move.boundary, -move.blocks)
        self._bans[(move.boundary, 1 if move.blocks > 0 else -1)] = self.observed + self.ban_windows * self.every
        self._rollback = undo
        self.decisions.append(BlockDecision(
            time=time.time(), forward=self.observed, boundary=undo.boundary, blocks=undo.blocks,
            split_before=list(self.split), split_after=apply_move(self.split, undo), rollback=True,
            slowest_ms_before=round(now, 3), slowest_ms_predicted=round(before, 3),
            stage_ms=[round(d + o, 3) for d, o in stage],
        ))
        del self.decisions[:-32]
        log.warning("block scheduler: the last move made the slowest stage worse (%.1f ms -> %.1f ms): moving "
                    "%d block(s) back across boundary %d|%d, split %s -> %s; that direction is not tried again",
                    before, now, abs(undo.blocks), undo.boundary, undo.boundary + 1, self.split,
                    apply_move(self.split, undo))
        return undo

    def _per_block(self, stage: Sequence[tuple[float, float]]) -> list[float]:
        known = [d / n for (d, _), n in zip(stage, self.split) if n > 0]
        fallback = statistics.median(known) if known else 0.0
        return [d / n if n > 0 else fallback for (d, _), n in zip(stage, self.split)]

    def predict(self, stage: Sequence[tuple[float, float]], move: Move) -> float:
        """The slowest stage after `move`."""
        t = [d + o for d, o in stage]
        per_block = self._per_block(stage)
        t[move.giver] -= abs(move.blocks) * per_block[move.giver]
        t[move.taker] += abs(move.blocks) * per_block[move.taker]
        return max(t)

    def best_move(self, stage: Sequence[tuple[float, float]]) -> tuple[Optional[Move], float, float]:
        """(move, slowest stage now, slowest stage predicted after it) for the best single move."""
        total = [d + o for d, o in stage]
        per_block = self._per_block(stage)
        now = max(total)
        best: tuple[Optional[Move], float] = (None, now)
        for b in range(len(self.split) - 1):
            for sign in (1, -1):
                if (b, sign) in self.banned:
                    continue
                giver, taker = (b, b + 1) if sign > 0 else (b + 1, b)
                for k in range(1, self.split[giver] - self.min_blocks + 1):
                    t = list(total)
                    t[giver] -= k * per_block[giver]
                    t[taker] += k * per_block[taker]
                    if max(t) < best[1] - 1e-9:
                        best = (Move(b, sign * k), max(t))
        return best[0], now, best[1]

    def applied(self, move: Move) -> None:
        stage = self.stage_ms()
        rollback = self._rollback is not None and move == self._rollback
        self._rollback = None
        # a move the scheduler chose is checked against the slowest stage it replaced (manual ones too)
        self._check = None if rollback or stage is None else (move, max(d + o for d, o in stage))
        self.split = apply_move(self.split, move)
        self._last_sign[move.boundary] = 1 if move.blocks > 0 else -1
        self._samples.clear()  # measurements of the old split say nothing of the new one
        self._skip = self.settle

    def stats(self) -> BalanceStats:
        stage = self.stage_ms()
        return BalanceStats(
            enabled=self.enabled, split=list(self.split),
            stage_ms=None if stage is None else [StageTimes(round(d, 3), round(o, 3), round(d + o, 3)) for d, o in stage],
            decisions=list(self.decisions), samples=len(self._samples),
            banned=[Ban(b, "downstream" if d > 0 else "upstream") for b, d in sorted(self.banned)],
        )
