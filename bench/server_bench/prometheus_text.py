"""The server's /metrics (Prometheus text) read back: samples, deltas, histogram summaries."""

from __future__ import annotations

import contextlib
import math
import re
from typing import Optional

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, tuple], float]:
    samples: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        with contextlib.suppress(ValueError):
            samples[(m.group(1), labels)] = float(m.group(4))
    return samples

def metrics_delta(after: dict, before: Optional[dict], gauges: set[str]) -> dict:
    """Counters and histograms as after - before; gauges as they are now."""
    if not before:
        return dict(after)
    out = {}
    for key, v in after.items():
        name = key[0]
        out[key] = v if name in gauges else v - before.get(key, 0.0)
    return out

def _get(samples: dict, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, tuple(sorted(labels.items()))))

def histogram_summary(samples: dict, name: str, scale: float = 1000.0, **labels: str) -> dict:
    count = _get(samples, name + "_count", **labels) or 0.0
    total = _get(samples, name + "_sum", **labels) or 0.0
    buckets = []
    for (n, lab), v in samples.items():
        d = dict(lab)
        if n == name + "_bucket" and all(d.get(k) == val for k, val in labels.items()):
            le = d.get("le", "")
            buckets.append((math.inf if le == "+Inf" else float(le), v))
    buckets.sort()
    out = {"count": int(count), "mean_ms": round(scale * total / count, 2) if count else None}
    for q in (0.5, 0.99):  # upper bucket bound: coarse, but from the server's own histogram
        bound = next((b for b, c in buckets if count and c >= q * count), None)
        out[f"p{int(q * 100)}_le_ms"] = None if bound is None else (None if math.isinf(bound) else bound * scale)
    return out

def summarize_metrics(samples: dict) -> dict:
    frames_out = _get(samples, "streamgen_output_frames_total") or 0.0
    misses = _get(samples, "streamgen_deadline_misses_total") or 0.0
    dropped = {dict(lab).get("reason", ""): int(v) for (n, lab), v in samples.items() if n == "streamgen_dropped_frames_total"}
    stages = {}
    for stage in ("vae_encode", "dit", "vae_decode"):
        stages[stage] = histogram_summary(samples, "streamgen_engine_stage_seconds", stage=stage)
    info = [dict(lab) for (n, lab), v in samples.items() if n == "streamgen_engine_info" and v]
    return {
        "input_frames": int(_get(samples, "streamgen_input_frames_total") or 0),
        "output_frames": int(frames_out),
        "chunks": int(_get(samples, "streamgen_engine_chunks_total") or 0),
        "deadline_s": _get(samples, "streamgen_deadline_seconds"),
        "deadline_misses": int(misses),
        "miss_rate": round(misses / frames_out, 5) if frames_out else None,
        "dropped": dropped,
        "ttff": histogram_summary(samples, "streamgen_ttff_seconds"),
        "latency": histogram_summary(samples, "streamgen_frame_latency_seconds"),
        "jitter": histogram_summary(samples, "streamgen_frame_jitter_seconds"),
        "engine_stage": stages,
        "engine_chunk_roundtrip": histogram_summary(samples, "streamgen_engine_chunk_seconds"),
        "session_errors": int(_get(samples, "streamgen_session_errors_total") or 0),
        "engine_info": info[0] if info else None,
        # the engine core's steady forwards by sessions carried, and those that waited to share
        "forwards_by_batch": {int(dict(lab)["sessions"]): int(v) for (n, lab), v in samples.items()
                              if n == "streamgen_pipeline_batch_forwards" and v},
        "batch_waits": int(_get(samples, "streamgen_pipeline_batch_waits") or 0),
        "batch_wait_s": _get(samples, "streamgen_pipeline_batch_wait_seconds"),
    }

GAUGES = {"streamgen_sessions", "streamgen_input_fps", "streamgen_output_fps", "streamgen_engine_up",
          "streamgen_engine_info", "streamgen_deadline_seconds"}
