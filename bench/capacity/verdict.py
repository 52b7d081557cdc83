"""The capacity rule: when a session holds the SLO, when an N passes, where the N-loop stops, the
row's figure, and the table printed last. Pure: no server, no network."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class Slo(BaseModel):
    """What every session must hold for an N to pass."""

    fps: float = Field(30.0, gt=0.0, description="output frame rate each session must hold")
    fps_tolerance: float = Field(
        0.03, ge=0.0, lt=1.0,
        description="share of `fps` a measured rate may fall short by (a 30 fps stream measures 29.9 with jitter)")
    p99_ms: float = Field(300.0, gt=0.0, description="client-measured latency p99 bound")

    @property
    def min_fps(self) -> float:
        return self.fps * (1.0 - self.fps_tolerance)


class SessionResult(BaseModel):
    """One client's session at one N (steady state: the warm-up excluded)."""

    session_id: str = ""
    fps_out: Optional[float] = Field(None, description="frames received per second from the warm-up's end to the camera's last frame")
    latency_p50_ms: Optional[float] = None
    latency_p99_ms: Optional[float] = None
    jitter_p99_ms: Optional[float] = None
    frames_sent: int = 0
    frames_received: int = 0
    dropped: dict[str, int] = Field(default_factory=dict, description="the server's per-session drops by reason")


class StepResult(BaseModel):
    """All sessions at one N; `error` when the step could not run (a refusal, a session lost)."""

    n: int = Field(ge=1)
    sessions: list[SessionResult] = Field(default_factory=list)
    error: Optional[str] = None


def session_failure(s: SessionResult, slo: Slo) -> Optional[str]:
    """Why a session misses the SLO, or None when it holds it. A missing measurement is a miss."""
    if s.fps_out is None:
        return "no steady output rate"
    if s.fps_out < slo.min_fps:
        return f"{s.fps_out:.1f} fps < {slo.min_fps:.1f}"
    if s.latency_p99_ms is None:
        return "no pts-matched latency"
    if s.latency_p99_ms > slo.p99_ms:
        return f"p99 {s.latency_p99_ms:.0f} ms > {slo.p99_ms:.0f}"
    return None


def passing_sessions(step: StepResult, slo: Slo) -> int:
    return sum(session_failure(s, slo) is None for s in step.sessions)


def step_passes(step: StepResult, slo: Slo) -> bool:
    """Every one of the N sessions ran and held the SLO."""
    return step.error is None and len(step.sessions) == step.n and passing_sessions(step, slo) == step.n


def should_stop(step: StepResult, slo: Slo, keep_going: bool) -> bool:
    """The N-loop ends at the first N that fails, unless told to keep going."""
    return not keep_going and not step_passes(step, slo)


def capacity(steps: list[StepResult], slo: Slo) -> int:
    """The largest N up to which every tested N passed (0: the first one failed)."""
    best = 0
    for step in sorted(steps, key=lambda s: s.n):
        if not step_passes(step, slo):
            break
        best = step.n
    return best


def parse_n_range(text: str) -> list[int]:
    """'1-6' or '1,2,4' (or both, '1-3,6') -> sorted distinct N >= 1; ValueError otherwise."""
    ns: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        if a < 1 or b < a:
            raise ValueError(f"bad N range {part!r}: expected N or A-B with 1 <= A <= B")
        ns.update(range(a, b + 1))
    return sorted(ns)


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(steps: list[StepResult], slo: Slo, row: str) -> str:
    """Per N: sessions passing, worst fps, worst p99, worst jitter p99, drops, verdict; then the figure."""
    head = f"{'N':>3s}{'passing':>9s}{'worst fps':>11s}{'worst p99 ms':>14s}{'jitter p99 ms':>15s}{'drops':>7s}  verdict"
    lines = [f"capacity: {row}",
             f"SLO: every session >= {slo.min_fps:.1f} fps ({slo.fps:g} - {100 * slo.fps_tolerance:g}%), "
             f"client p99 <= {slo.p99_ms:g} ms", head, "-" * len(head)]
    for step in sorted(steps, key=lambda s: s.n):
        # Worst of the sessions that measured it (a session without a measurement fails; the verdict says why).
        fps = [s.fps_out for s in step.sessions if s.fps_out is not None]
        p99 = [s.latency_p99_ms for s in step.sessions if s.latency_p99_ms is not None]
        jit = [s.jitter_p99_ms for s in step.sessions if s.jitter_p99_ms is not None]
        worst_fps = min(fps) if fps else None
        worst_p99 = max(p99) if p99 else None
        drops = sum(sum(s.dropped.values()) for s in step.sessions)
        if step_passes(step, slo):
            verdict = "pass"
        else:
            reasons = [r for r in (session_failure(s, slo) for s in step.sessions) if r]
            why = step.error.splitlines()[0][:80] if step.error else None
            verdict = "FAIL: " + (why or (reasons[0] if reasons else f"{len(step.sessions)} of {step.n} sessions ran"))
        lines.append(f"{step.n:>3d}{passing_sessions(step, slo):>5d}/{step.n:<3d}{_fmt(worst_fps):>11s}"
                     f"{_fmt(worst_p99, 0):>14s}{_fmt(max(jit) if jit else None, 0):>15s}{drops:>7d}  {verdict}")
    lines.append(f"capacity (largest N with every session within the SLO): {capacity(steps, slo)}")
    return "\n".join(lines)
