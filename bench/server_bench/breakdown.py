"""Where each frame's time goes, camera to screen, measured per frame (not estimated).

The client and the server run on one host, so their time.monotonic() stamps (CLOCK_MONOTONIC) compare
directly. A frame is followed by its pts: the server's stage times (its session's `recent_frames`) are
matched to the camera's frames the way the received frames are (`match_received`). Each stage ends
where the next begins, so for every frame they add up to its client end-to-end latency:

- upstream: the camera frame handed to the client's encoder -> its arrival in the server (video
  encode, transport, the server's jitter buffer and decode);
- fill, engine, output, pacing: the server's (server/ops/metrics.py FRAME_STAGES);
- downstream: sent to the server's encoder -> decoded at the client (video encode, transport, the
  client's jitter buffer and decode).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from bench.server_bench.client import Client
from bench.server_bench.latency import match_received, percentiles_ms
from server.ops.metrics import FRAME_STAGES

STAGES = ("upstream", *FRAME_STAGES, "downstream")
LABELS = {
    "upstream": "upstream (encode, transport, server jitter buffer, decode)",
    "fill": "chunk fill (arrival -> chunk pushed)",
    "engine": "engine (push -> frames back)",
    "output": "server output (-> paced track, scaling)",
    "pacing": "pacing wait (-> sent to the encoder)",
    "downstream": "downstream (encode, transport, client jitter buffer, decode)",
}
SERVER_STAMPS = ("arrived", "pushed", "returned", "delivered", "sent")  # FrameTimes, in stage order
ENGINE_OWN = ("vae_encode_ms", "dit_ms", "vae_decode_ms")


def frame_breakdown(client: Client, server_frames: list[dict], warmup_s: float,
                    engine_polls: Optional[list[dict]] = None) -> dict[str, Any]:
    """Per-stage percentiles (ms) over the frames that both the server timed and the client received,
    from `warmup_s` after the first received frame; `engine_polls`: the session's polled engine stats
    (the engine's own per-chunk times, shown with the engine stage)."""
    cam = client.camera
    out: dict[str, Any] = {"frames": 0, "server_frames": len(server_frames)}
    if not server_frames or not client.received_at or not cam.sent_at:
        out["note"] = "no frames to break down"
        return out
    server_idx, server_support = match_received(cam.pts, [int(f["pts"]) for f in server_frames])
    client_idx, _ = match_received(cam.pts, client.received_pts)
    received = {i: client.received_at[k] for k, i in enumerate(client_idx) if i >= 0}
    steady_from = client.received_at[0] + warmup_s
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    e2e: list[float] = []
    for frame, i in zip(server_frames, server_idx):
        rx = received.get(i) if i >= 0 else None
        if rx is None or rx < steady_from:
            continue
        bounds = (cam.sent_at[i], *(float(frame[k]) for k in SERVER_STAMPS), rx)
        for stage, start, end in zip(STAGES, bounds, bounds[1:]):
            samples[stage].append(1000.0 * (end - start))
        e2e.append(1000.0 * (rx - cam.sent_at[i]))
    out.update(frames=len(e2e), server_pts_support=f"{server_support}/{min(90, len(server_frames))}")
    if not e2e:
        out["note"] = "no frame was both timed by the server and received in the steady window"
        return out
    out["stages_ms"] = {stage: percentiles_ms(values) for stage, values in samples.items()}
    out["stages_min_ms"] = {stage: round(min(values), 3) for stage, values in samples.items()}
    out["e2e_ms"] = percentiles_ms(e2e)
    out["sum_of_means_ms"] = round(float(sum(np.mean(samples[s]) for s in STAGES)), 2)
    rows = [p for p in engine_polls or [] if p]
    out["engine_own_ms_median"] = {
        k: round(float(np.median([p[k] for p in rows if k in p])), 2) for k in ENGINE_OWN if any(k in p for p in rows)
    }
    return out


def breakdown_table(bd: dict[str, Any]) -> str:
    if not bd.get("frames"):
        return f"latency breakdown: {bd.get('note', 'no frames')}"
    head = f"{'where a frame’s time goes (ms)':62s}{'p50':>9s}{'p99':>9s}{'mean':>9s}"
    lines = [head, "-" * len(head)]
    for stage in STAGES:
        p = bd["stages_ms"][stage]
        lines.append(f"{LABELS[stage]:62s}{p['p50']:9.1f}{p['p99']:9.1f}{p['mean']:9.1f}")
        if stage == "engine" and bd.get("engine_own_ms_median"):
            own = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in bd["engine_own_ms_median"].items())
            lines.append(f"  the engine's own per chunk (median): {own}")
    e2e = bd["e2e_ms"]
    lines.append(f"{'client end to end (the same frames)':62s}{e2e['p50']:9.1f}{e2e['p99']:9.1f}{e2e['mean']:9.1f}")
    lines.append(f"{bd['frames']} frames; the stages' means add up to {bd['sum_of_means_ms']:.1f} ms")
    return "\n".join(lines)
