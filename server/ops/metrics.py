"""What is measured (docs/ARCHITECTURE.md §9): TTFF, per-frame latency matched by pts, jitter, deadline misses,
fps in/out, drops and engine stage times; per session (for the page) and server-wide (/metrics).

TTFF is the time from a session's first camera frame arriving to its first generated frame
leaving (the output track handing it to the encoder). A frame's latency is the time from its
camera frame arriving to the generated frame with the same pts leaving. Jitter is |Δ| of
consecutive latencies.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from interface.messages import PipelineStats, RankStage
from server.ops.prometheus import Counter, Gauge, Histogram, Registry
from server.schemas import FrameTimes, Percentiles, SessionStats

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
JITTER_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
STAGE_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STAGE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
# A sent frame's time in the server, stage by stage (each ends where the next begins; they add up to its latency).
FRAME_STAGES = ("fill", "engine", "output", "pacing")
DROP_REASONS = ("input", "late", "engine")
RECENT_SAMPLES = 600  # window for percentiles
PLOT_SAMPLES = 120  # latencies sent with each stats message


class ServerMetrics:
    """The server-wide registry behind GET /metrics. One per app."""

    def __init__(self, deadline_s: float) -> None:
        self.registry = Registry()
        r = self.registry
        self.sessions_started = r.add(Counter("streamgen_sessions_started_total", "sessions opened"))
        self.frames_in = r.add(Counter("streamgen_input_frames_total", "camera frames received"))
        self.frames_out = r.add(Counter("streamgen_output_frames_total", "generated frames sent"))
        self.chunks = r.add(Counter("streamgen_engine_chunks_total", "chunks the engine processed"))
        self.dropped = r.add(
            Counter(
                "streamgen_dropped_frames_total",
                "frames dropped: input (not taken at a chunk boundary), late (pacing), engine",
                labels=("reason",),
            )
        )
        for reason in DROP_REASONS:
            self.dropped.inc(0, reason=reason)
        self.ttff = r.add(
            Histogram("streamgen_ttff_seconds", "first camera frame in to first generated frame out", LATENCY_BUCKETS)
        )
        self.latency = r.add(
            Histogram("streamgen_frame_latency_seconds", "camera frame in to generated frame out, by pts", LATENCY_BUCKETS)
        )
        self.jitter = r.add(
            Histogram("streamgen_frame_jitter_seconds", "|difference| of consecutive frame latencies", JITTER_BUCKETS)
        )
        self.misses = r.add(Counter("streamgen_deadline_misses_total", "sent frames later than the deadline"))
        deadline = r.add(Gauge("streamgen_deadline_seconds", "the per-frame latency deadline"))
        assert isinstance(deadline, Gauge)
        deadline.set(deadline_s)
        self.stage = r.add(
            Histogram(
                "streamgen_engine_stage_seconds", "engine time per chunk by stage", STAGE_BUCKETS, labels=("stage",)
            )
        )
        self.chunk_roundtrip = r.add(
            Histogram("streamgen_engine_chunk_seconds", "chunk push to reply, seen by the server", STAGE_BUCKETS)
        )
        self.frame_stage = r.add(
            Histogram(
                "streamgen_frame_stage_seconds",
                "a sent frame's time in the server by stage: fill (camera frame in -> its chunk pushed), engine "
                "(-> generated frame back), output (-> handed to the paced track), pacing (-> sent to the encoder)",
                STAGE_SECONDS_BUCKETS,
                labels=("stage",),
            )
        )
        self.session_errors = r.add(Counter("streamgen_session_errors_total", "sessions ended by an error"))
        self._sessions_numbered = 0

    def add_gauges(
        self,
        sessions: Callable[[], float],
        fps: Callable[[str], float],
        engine: Callable[[], dict[tuple[str, ...], float]],
        engine_up: Callable[[], float],
    ) -> None:
        """Gauges read from the live app state at scrape time."""
        r = self.registry
        r.add(Gauge("streamgen_sessions", "active sessions", read=lambda: {(): sessions()}))
        r.add(Gauge("streamgen_input_fps", "camera frames per second, all sessions", read=lambda: {(): fps("in")}))
        r.add(Gauge("streamgen_output_fps", "generated frames per second, all sessions", read=lambda: {(): fps("out")}))
        r.add(Gauge("streamgen_engine_up", "1 when the engine process is ready", read=lambda: {(): engine_up()}))
        r.add(
            Gauge(
                "streamgen_engine_info",
                "the engine's model and device",
                labels=("model", "device", "dtype", "attention", "random_weights", "height", "width", "decoder", "encoder"),
                read=engine,
            )
        )

    def session_number(self) -> int:
        """The next session's number in this server's life: its label in /metrics (its id, which lets a
        caller control it, stays off the open endpoint)."""
        self._sessions_numbered += 1
        return self._sessions_numbered

    def add_session_gauges(self, sessions: Callable[[], Iterable["SessionMetrics"]]) -> None:
        """Each live session's latency (recent window) and output rate, labelled by its number."""
        r = self.registry

        def latency() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {}
            for m in sessions():
                p = m.latency_percentiles_s()
                if p is not None:
                    out[(str(m.number), "0.5")], out[(str(m.number), "0.99")] = p
            return out

        r.add(Gauge("streamgen_session_latency_seconds",
                    "each live session's frame latency over its recent frames (camera frame in to generated frame out)",
                    labels=("session", "quantile"), read=latency))
        r.add(Gauge("streamgen_session_output_fps", "each live session's generated frames per second",
                    labels=("session",), read=lambda: {(str(m.number),): m.fps("out") for m in sessions()}))

    def add_pipeline_gauges(self, pipeline: Callable[[], Optional[PipelineStats]]) -> None:
        """A pipeline-parallel engine's ranks and block scheduler (no samples on one device)."""
        r = self.registry

        def read(fn: Callable[[PipelineStats], dict[tuple[str, ...], float]]) -> Callable[[], dict]:
            return lambda: {} if (p := pipeline()) is None else fn(p)

        def per_rank(fn: Callable[[RankStage], dict[tuple[str, ...], Optional[float]]]) -> Callable[[], dict]:
            """fn: a rank's values by their other labels (None: not measured yet, no sample)."""
            return read(lambda p: {(str(i), *k): float(v) for i, rs in enumerate(p.ranks)
                                   for k, v in fn(rs).items() if v is not None})

        def seconds(ms: Optional[float]) -> Optional[float]:
            return None if ms is None else ms / 1000

        r.add(Gauge("streamgen_pipeline_blocks", "DiT blocks each rank holds", labels=("rank",),
                    read=per_rank(lambda rs: {(): rs.blocks})))
        r.add(Gauge("streamgen_pipeline_stage_seconds",
                    "each rank's time per forward since the last block move: its blocks, and the rest of its share",
                    labels=("rank", "part"),
                    read=per_rank(lambda rs: {("blocks",): seconds(rs.dit_ms), ("other",): seconds(rs.other_ms)})))
        r.add(Gauge("streamgen_pipeline_rank_forwards", "forwards each rank ran, by how its blocks ran",
                    labels=("rank", "blocks"),
                    read=per_rank(lambda rs: {("graph",): rs.graph_forwards, ("eager",): rs.eager_forwards})))
        r.add(Gauge("streamgen_pipeline_block_moves", "block moves since the engine started",
                    read=read(lambda p: {(): float(p.moves)})))
        r.add(Gauge("streamgen_pipeline_rebalance", "1 when the block scheduler is on",
                    read=read(lambda p: {(): float(p.rebalance)})))
        r.add(Gauge("streamgen_pipeline_forwards", "DiT forwards through the ring, by sessions carried",
                    labels=("sessions",),
                    read=read(lambda p: {("one",): float(p.forwards - p.batched_forwards),
                                         ("several",): float(p.batched_forwards)})))
        r.add(Gauge("streamgen_pipeline_batch_forwards", "steady DiT forwards by the number of sessions they carried",
                    labels=("sessions",),
                    read=read(lambda p: {(str(b),): float(c) for b, c in sorted(p.forwards_by_batch.items())})))
        r.add(Gauge("streamgen_pipeline_batch_waits", "forwards that waited for other sessions' chunks to share them",
                    read=read(lambda p: {(): float(p.batch_waits)})))
        r.add(Gauge("streamgen_pipeline_batch_wait_seconds", "the time those forwards waited, in all",
                    read=read(lambda p: {(): p.batch_wait_ms / 1000})))
        r.add(Gauge("streamgen_pipeline_hop_seconds", "one hop of a forward's payload, as last measured",
                    read=read(lambda p: {} if p.hop_ms is None else {(): p.hop_ms / 1000})))

    def render(self) -> str:
        return self.registry.render()


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 2.0) -> None:
        self._window = window_s
        self._times: deque[float] = deque()

    def mark(self, now: float, n: int = 1) -> None:
        self._times.extend([now] * n)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return len(self._times) / self._window

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self._window:
            self._times.popleft()


def _percentiles_ms(values: Iterable[float]) -> Percentiles:
    arr = np.fromiter(values, dtype=np.float64)
    if arr.size == 0:
        return Percentiles()
    p50, p95, p99 = np.percentile(arr, [50, 95, 99]) * 1000.0
    return Percentiles(
        p50=round(p50, 2), p95=round(p95, 2), p99=round(p99, 2), mean=round(arr.mean() * 1000.0, 2),
        max=round(arr.max() * 1000.0, 2),
    )


class SessionMetrics:
    """One session's measurements; also feeds the server-wide registry."""

    def __init__(
        self, session_id: str, server: ServerMetrics, deadline_s: float, clock: Callable[[], float] = time.monotonic,
        stage_stats: Sequence[str] = (),
    ) -> None:
        """`stage_stats`: the engine's chunk stats that time a stage, in ms (EngineInfo.stage_stats)."""
        self.session_id = session_id
        self.number = server.session_number()
        self._server = server
        self._stage_stats = tuple(stage_stats)
        self._deadline = deadline_s
        self._clock = clock
        self._started = clock()
        self.first_input_at: Optional[float] = None
        self.ttff_s: Optional[float] = None
        self.frames_in = 0
        self.frames_out = 0
        self.chunks = 0
        self.pushes = 0  # requests that brought frames to the engine (per frame with encode ahead)
        self.misses = 0
        self.dropped = {reason: 0 for reason in DROP_REASONS}
        self._fps_in = RateMeter()
        self._fps_out = RateMeter()
        self._latencies: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self._jitters: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self._last_latency: Optional[float] = None
        self.latency_seq = 0
        self._stages: dict[str, deque[float]] = {stage: deque(maxlen=RECENT_SAMPLES) for stage in FRAME_STAGES}
        self._frames: deque[FrameTimes] = deque(maxlen=PLOT_SAMPLES)
        self.frame_seq = 0
        self.engine: dict[str, float] = {}
        self.engine_prompt = ""
        self.engine_updates = 0

    def input_arrived(self, now: float) -> None:
        if self.first_input_at is None:
            self.first_input_at = now
        self.frames_in += 1
        self._fps_in.mark(now)
        self._server.frames_in.inc()

    def drop(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped[reason] += n
            self._server.dropped.inc(n, reason=reason)

    def output_sent(self, arrived_at: float, now: float, times: Optional[FrameTimes] = None) -> None:
        """A generated frame left; `times`: where its time went in the server, when every stage was stamped."""
        if times is not None:
            self._frame_timed(times)
        if self.ttff_s is None and self.first_input_at is not None:
            self.ttff_s = now - self.first_input_at
            self._server.ttff.observe(self.ttff_s)
        latency = now - arrived_at
        self.frames_out += 1
        self._fps_out.mark(now)
        self._latencies.append(latency)
        self.latency_seq += 1
        self._server.frames_out.inc()
        self._server.latency.observe(latency)
        if latency > self._deadline:
            self.misses += 1
            self._server.misses.inc()
        if self._last_latency is not None:
            jitter = abs(latency - self._last_latency)
            self._jitters.append(jitter)
            self._server.jitter.observe(jitter)
        self._last_latency = latency

    def _frame_timed(self, t: FrameTimes) -> None:
        bounds = (t.arrived, t.pushed, t.returned, t.delivered, t.sent)
        for stage, start, end in zip(FRAME_STAGES, bounds, bounds[1:]):
            seconds = end - start
            self._stages[stage].append(seconds)
            self._server.frame_stage.observe(seconds, stage=stage)
        self._frames.append(t)
        self.frame_seq += 1

    def engine_chunk(self, stats: dict[str, float], roundtrip_s: float, prompt: str, updates: int) -> None:
        self.chunks += 1
        self.engine = dict(stats)
        self.engine["chunk_ms"] = roundtrip_s * 1000.0
        self.engine_prompt = prompt
        self.engine_updates = updates
        self._server.chunks.inc()
        self._server.chunk_roundtrip.observe(roundtrip_s)
        for key in self._stage_stats:  # e.g. dit_ms -> stage "dit"
            if key in stats:
                self._server.stage.observe(stats[key] / 1000.0, stage=key.removesuffix("_ms"))

    def latency_percentiles_s(self) -> Optional[tuple[float, float]]:
        """(p50, p99) of the recent frames' latencies in seconds; None before the first frame."""
        if not self._latencies:
            return None
        p50, p99 = np.percentile(np.fromiter(self._latencies, dtype=np.float64), [50, 99])
        return float(p50), float(p99)

    def fps(self, direction: str, now: Optional[float] = None) -> float:
        now = self._clock() if now is None else now
        return (self._fps_in if direction == "in" else self._fps_out).rate(now)

    def snapshot(self, with_frames: bool = False) -> SessionStats:
        """with_frames: include the newest frames' stage times (for GET /api/sessions/{id}, not the data channel)."""
        now = self._clock()
        return SessionStats(
            session_id=self.session_id,
            uptime_s=round(now - self._started, 3),
            fps_in=round(self.fps("in", now), 2),
            fps_out=round(self.fps("out", now), 2),
            ttff_ms=None if self.ttff_s is None else round(self.ttff_s * 1000.0, 1),
            latency_ms=_percentiles_ms(self._latencies),
            jitter_ms=_percentiles_ms(self._jitters),
            deadline_ms=self._deadline * 1000.0,
            miss_rate=round(self.misses / self.frames_out, 4) if self.frames_out else 0.0,
            frames_in=self.frames_in,
            frames_out=self.frames_out,
            chunks=self.chunks,
            pushes=self.pushes,
            dropped=dict(self.dropped),
            engine={k: round(v, 3) for k, v in self.engine.items()},
            engine_prompt=self.engine_prompt,
            engine_updates=self.engine_updates,
            latency_seq=self.latency_seq,
            recent_latency_ms=[round(v * 1000.0, 1) for v in list(self._latencies)[-PLOT_SAMPLES:]],
            stages_ms={stage: _percentiles_ms(values) for stage, values in self._stages.items() if values},
            frame_seq=self.frame_seq,
            recent_frames=list(self._frames) if with_frames else [],
        )
