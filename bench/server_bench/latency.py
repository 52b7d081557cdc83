"""Latency, jitter and frame rates: the client's (pts-matched) and the server's (polled series)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from bench.server_bench.client import Client


def percentiles_ms(values: list[float] | np.ndarray) -> dict[str, Optional[float]]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": int(arr.size), "mean": round(float(arr.mean()), 2), "p50": round(float(p50), 2),
            "p95": round(float(p95), 2), "p99": round(float(p99), 2), "max": round(float(arr.max()), 2)}

def series_stats(latency_ms: list[float], contiguous: list[bool], deadline_ms: float) -> dict:
    """Latency percentiles, jitter (|Δ| of consecutive latencies, only where no sample is missing
    in between) and the share over the deadline."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    jit = [abs(lat[i] - lat[i - 1]) for i in range(1, lat.size) if contiguous[i]]
    return {
        "latency_ms": percentiles_ms(lat),
        "jitter_ms": percentiles_ms(jit),
        "miss_rate": round(float((lat > deadline_ms).mean()), 5) if lat.size else None,
        "misses": int((lat > deadline_ms).sum()),
    }

def _new_samples(recent: list, seq: int, seen: int) -> tuple[list, int]:
    """Of a snapshot's newest samples `recent` (`seq` so far), those after the first `seen`, and how many
    of those the window no longer holds (missed between two polls)."""
    new = seq - seen
    if new <= 0:
        return [], 0
    take = list(recent[-new:]) if new <= len(recent) else list(recent)
    return take, new - len(take)


class SessionPoller:
    """Rebuilds the server's full per-frame latency series from successive session snapshots."""

    def __init__(self) -> None:
        self.latency_ms: list[float] = []
        self.contiguous: list[bool] = []  # False where samples before this one were missed
        self.sample_time: list[float] = []  # poll time at which the sample was seen (monotonic)
        self.missed = 0
        self.last_seq = 0
        self.polls: list[dict] = []  # compact time series
        self.frames: list[dict] = []  # every sent frame's server stage times (FrameTimes), in order
        self.frames_missed = 0
        self.last_frame_seq = 0
        self.last: Optional[dict] = None

    def add(self, info: dict, now: float, t0: float) -> None:
        stats = info["stats"]
        self.last = info
        take, gap = _new_samples(stats.get("recent_latency_ms", []), int(stats.get("latency_seq", 0)), self.last_seq)
        self.missed += gap
        for i, v in enumerate(take):
            self.contiguous.append(bool(self.latency_ms) and not (gap and i == 0))
            self.latency_ms.append(float(v))
            self.sample_time.append(now)
        self.last_seq = max(self.last_seq, int(stats.get("latency_seq", 0)))
        frames, missed = _new_samples(stats.get("recent_frames", []), int(stats.get("frame_seq", 0)), self.last_frame_seq)
        self.frames_missed += missed
        self.frames.extend(frames)
        self.last_frame_seq = max(self.last_frame_seq, int(stats.get("frame_seq", 0)))
        self.polls.append({
            "t": round(now - t0, 3), "state": info.get("state"), "frames_in": stats["frames_in"],
            "frames_out": stats["frames_out"], "chunks": stats["chunks"], "fps_in": stats["fps_in"],
            "fps_out": stats["fps_out"], "dropped": stats["dropped"], "engine": stats["engine"],
        })

    def rate(self, key: str, since: float, t0: float) -> Optional[float]:
        """Frames per second of a counter between the first poll at/after `since` and the last."""
        rows = [p for p in self.polls if p["t"] >= since - t0]
        if len(rows) < 2 or rows[-1]["t"] <= rows[0]["t"]:
            return None
        return round((rows[-1][key] - rows[0][key]) / (rows[-1]["t"] - rows[0]["t"]), 2)

def match_received(sent_pts: list[int], received_pts: list[int], tol: int = 3, probe: int = 90) -> tuple[list[int], int]:
    """Index into sent_pts of every received frame (-1 if none), and the offset's support.

    Received pts = sent pts - a constant (RTP and the server keep differences), so try each sent
    frame as the one the first received frame came from and keep the offset that matches most."""
    if not sent_pts or not received_pts:
        return [-1] * len(received_pts), 0
    s = np.asarray(sent_pts, dtype=np.int64)
    r = np.asarray(received_pts, dtype=np.int64)
    r = r - r[0]
    head = r[:probe]

    def nearest(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.clip(np.searchsorted(s, targets), 1, len(s) - 1) if len(s) > 1 else np.zeros_like(targets)
        if len(s) > 1:
            left = np.abs(s[i - 1] - targets) <= np.abs(s[i] - targets)
            i = np.where(left, i - 1, i)
        return i, np.abs(s[i] - targets)

    best, best_score = 0, -1
    for m0 in range(len(s)):
        _, d = nearest(head + s[m0])
        score = int((d <= tol).sum())
        if score > best_score:
            best, best_score = m0, score
    idx, d = nearest(r + s[best])
    return [int(i) if ok else -1 for i, ok in zip(idx, d <= tol)], best_score

def client_stats(client: Client, deadline_ms: float, warmup_s: float) -> dict:
    cam = client.camera
    out: dict[str, Any] = {
        "frames_sent": len(cam.sent_at), "frames_received": len(client.received_at),
        "received_sizes": sorted(client.sizes),
    }
    buffer = client.jitter_buffer
    out["receiver"] = {"kind": "stock"} if buffer is None else {
        "kind": "marker", "frames_on_marker": buffer.frames_on_marker, "frames_on_next": buffer.frames_on_next}
    if cam.sent_at and len(cam.sent_at) > 1:
        out["fps_in"] = round((len(cam.sent_at) - 1) / (cam.sent_at[-1] - cam.sent_at[0]), 2)
    if not client.received_at or not cam.sent_at:
        return out
    first_rx = client.received_at[0]
    out["ttff_ms"] = round(1000 * (first_rx - cam.sent_at[0]), 1)
    end = client.received_at[-1]
    steady = [t for t in client.received_at if t >= first_rx + warmup_s]
    if len(steady) > 1 and end > steady[0]:
        out["fps_out"] = round((len(steady) - 1) / (end - steady[0]), 2)
    out["fps_out_all"] = round((len(client.received_at) - 1) / max(1e-9, end - first_rx), 2)
    # Frames delivered per second of wall time from the warm-up's end to the camera's last frame: a
    # stream that stalls and then bursts scores what it delivered, unlike fps_out (first to last frame).
    window = cam.sent_at[-1] - (first_rx + warmup_s)
    if window > 0:
        got = sum(1 for t in client.received_at if first_rx + warmup_s <= t <= cam.sent_at[-1])
        out["fps_out_window"] = round(got / window, 2)
    gaps = np.diff(client.received_at) * 1000 if len(client.received_at) > 1 else np.array([])
    out["interframe_ms"] = percentiles_ms(gaps)
    idx, support = match_received(cam.pts, client.received_pts)
    matched = [(i, k) for k, i in enumerate(idx) if i >= 0]
    probe = min(90, len(client.received_pts))
    out["pts_match"] = {"matched": len(matched), "of": len(idx), "offset_support": f"{support}/{probe}"}
    if matched and support >= 0.8 * probe:
        lat = [1000 * (client.received_at[k] - cam.sent_at[i]) for i, k in matched]
        contiguous = [False] + [True] * (len(lat) - 1)
        out["e2e_all"] = series_stats(lat, contiguous, deadline_ms)
        keep = [j for j, (i, k) in enumerate(matched) if client.received_at[k] >= first_rx + warmup_s]
        if keep:
            out["e2e_steady"] = series_stats([lat[j] for j in keep], [False] + [True] * (len(keep) - 1), deadline_ms)
        out["first_output_of_sent_frame"] = matched[0][0]
    else:
        out["pts_match"]["note"] = "received pts did not map onto sent pts: no client-side per-frame latency"
    return out
