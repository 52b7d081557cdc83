"""Rolling KV cache of one session (docs/ARCHITECTURE.md §3): a window of `window` latent frames per layer and row,
the first `num_sink` slots being sinks, FIFO eviction of the rolling slots, adaptive sink refresh, and
RoPE re-basing so that the window stays consistent when positions wrap.

Layout: per layer, k/v [rows, window*frame_tokens, heads, head_dim], keys stored already rotated.
Decisions that depend on the keys (sink refresh) stay on the device: no host sync per block.

Where this differs from the reference on purpose (each shown by a test):
- eviction state belongs to the cache (the session), not to the attention module, so a restart or a
  second session cannot disturb it;
- the sink-similarity check runs when a frame is about to evict one (cache full); the reference also
  runs it while the cache fills, when a sink slot may still be empty (cosine 0), which flags that sink;
- the FIFO covers every rolling slot; the reference's queue starts at slot 3 after a 2-latent first
  chunk, so it never evicts the rolling slots below 3;
- on a position wrap, cached keys are re-rotated to the new positions (rolling slots move with the
  query, sinks go back to their slot index); the reference keeps the old rotations.
With policy "reference" (engine/kv_policy.py) the cache follows the reference in each of these instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from engine import kernels
from engine.attention import attention
from engine.kv_policy import EvictionQueues, KVPolicy, rebase_on_wrap
from engine.rope import Rope, rotate
from engine.transfer import h2d, h2d_into


class StreamKVCache:
    def __init__(
        self,
        layers: Sequence[int],
        rows: int,
        window: int,
        frame_tokens: int,
        heads: int,
        head_dim: int,
        num_sink: int,
        sink_threshold: Optional[float],
        rope: Rope,
        dtype: torch.dtype,
        device: torch.device,
        policy: KVPolicy = "ours",
        queues: Optional[EvictionQueues] = None,
    ) -> None:
        if num_sink >= window:
            raise ValueError("num_sink must be smaller than the window")
        # reference: slots come from the session's eviction queues (decided on the host, per layer)
        self.policy: KVPolicy = policy
        self.queues = queues if queues is not None or policy == "ours" else EvictionQueues(num_sink, window, sink_threshold)
        self.layers = list(layers)
        self.rows, self.window, self.frame_tokens = rows, window, frame_tokens
        self.num_sink, self.sink_threshold, self.rope = num_sink, sink_threshold, rope
        self.device = device
        shape = (rows, window * frame_tokens, heads, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in self.layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in self.layers}
        # Per layer and row, on the device: rolling-slot round robin and the position each slot holds.
        self.rr = {i: torch.zeros(rows, dtype=torch.long, device=device) for i in self.layers}
        self.slot_pos = {i: torch.zeros(rows, window, dtype=torch.long, device=device) for i in self.layers}
        # Per row, on the host: frames written so far (prefix) and the newest position.
        self.filled = [0] * rows
        self.last_pos = [-1] * rows
        # rows of (evicting?, slot when not evicting, position): written by begin(), read by the layers
        self.plan = torch.zeros(3, rows, dtype=torch.long, device=device)
        self._plan: Optional[dict] = None
        # Per layer, the token-mean key and value of each sink slot, for the refresh test: kept up to date
        # where sinks are written instead of being recomputed over the sink slots at every eviction.
        self._refresh = sink_threshold is not None and num_sink > 0 and self.queues is None
        self.sink_mean: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self._refresh:
            for i in self.layers:
                self._update_sink_mean(i)

    # -- per forward ------------------------------------------------------------------------------
    def begin(self, positions: Sequence[int], frames: int) -> None:
        """Plan a forward whose row r brings `frames` new frames starting at position positions[r].

        Host decisions (fill level, wraps) happen here; what the layers need on the device goes into
        one persistent buffer with one non-blocking copy, so a captured CUDA graph can replay it.
        """
        full, host_slot = [], []
        for r, p in enumerate(positions):
            is_full = p + frames > self.window or self.filled[r] >= self.window
            if is_full and frames != 1:
                raise ValueError("only single-frame chunks can evict")
            if is_full and p < self.last_pos[r] and rebase_on_wrap(self.policy):
                self._rebase(r, self.last_pos[r] + 1 - p)
            full.append(int(is_full))
            host_slot.append(0 if is_full else p)
            self.filled[r] = self.window if is_full else p + frames
            self.last_pos[r] = p + frames - 1
        h2d_into(self.plan, [full, host_slot, list(positions)])
        # A first chunk (several frames, rows alike) attends to the filled prefix alone and without a
        # mask: with the whole window behind a mask, SDPA left cuDNN's kernel for a slower one and read
        # the empty slots too (two 480x832 priming forwards: 120 ms before, 51 ms after, H200). Later
        # forwards keep the window's length while it fills, so that a forward batching several
        # sessions' rows computes exactly what each session alone does.
        prefix = self.filled[0] if frames > 1 and len(set(self.filled)) == 1 and not any(full) else None
        valid = None
        if not all(full) and prefix is None:
            slots = torch.arange(self.window * self.frame_tokens, device=self.device) // self.frame_tokens
            valid = slots[None, :] < h2d(self.filled, self.device)[:, None]
        # a row still filling writes a sink slot: the kept sink means of every layer follow (once per
        # layer, decided here once per forward)
        writes_sink = self._refresh and any(not f and p < self.num_sink for f, p in zip(full, host_slot))
        self._plan = dict(frames=frames, any_full=any(full), all_full=all(full), host_slot=host_slot, valid=valid,
                          prefix=prefix, writes_sink=writes_sink)

    @property
    def positions(self) -> torch.Tensor:
        """Device view of this forward's row positions (persistent: safe inside a CUDA graph)."""
        return self.plan[2]

    @property
    def all_full(self) -> bool:
        return bool(self._plan and self._plan["all_full"])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this forward's k/v of `layer`, then attention of q [rows, L, heads, hd] to the window."""
        keys, values, valid = self.update(layer, k, v)
        return attention(q, keys, values, valid)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this forward's keys/values of `layer`; return (keys, values, key_valid) to attend to."""
        plan = self._plan
        assert plan is not None, "begin() first"
        kc, vc = self.k[layer], self.v[layer]
        rows, t = self.rows, self.frame_tokens
        if plan["frames"] > 1:  # first chunk: contiguous prefix, never evicting
            f = plan["frames"]
            for r, p in enumerate(plan["host_slot"]):
                kc[r, p * t : (p + f) * t] = k[r]
                vc[r, p * t : (p + f) * t] = v[r]
                self.slot_pos[layer][r, p : p + f] = torch.arange(p, p + f, device=self.device)
            if plan["writes_sink"]:
                self._update_sink_mean(layer)
            if self.queues is not None:
                q = self.queues
                q.rows(layer, rows)
                for r, p in enumerate(plan["host_slot"]):
                    q.filled(layer, r, p, f)
            if plan["prefix"] is not None:
                return kc[:, : plan["prefix"] * t], vc[:, : plan["prefix"] * t], None
            return kc, vc, plan["valid"]
        # On CUDA the slot decision and the write are Triton kernels (kernels.evict_slots, write_frames:
        # the same rule and copies, in 3 + 1 kernels instead of about 25 per layer); elsewhere torch.
        slot = self.plan[1]
        fused = kernels.evict_usable(k) and v.is_contiguous() and self.queues is None
        if self.queues is not None:
            slot = self._reference_slots(layer, k, v)
        elif plan["any_full"] and fused:
            slot = kernels.evict_slots(k, v, self.plan, self.rr[layer], self.sink_mean.get(layer) if self._refresh else None,
                                       self.num_sink, self.window - self.num_sink, self.sink_threshold)
        elif plan["any_full"]:
            full = self.plan[0].bool()
            idx = torch.arange(rows, device=self.device)
            slot = torch.where(full, self._evict_slot(layer, k, v, full, idx), slot)
        if not (fused and kernels.write_frames(kc, vc, k, v, slot, self.slot_pos[layer], self.plan[2])):
            # one index_copy_ per tensor (a row's frame is one contiguous block): about twice as fast as
            # advanced-index assignment, which computes an index per element
            idx = torch.arange(rows, device=self.device)
            dst = idx * self.window + slot
            kc.view(rows * self.window, -1).index_copy_(0, dst, k.reshape(rows, -1))
            vc.view(rows * self.window, -1).index_copy_(0, dst, v.reshape(rows, -1))
            self.slot_pos[layer][idx, slot] = self.plan[2]
        if plan["writes_sink"]:
            self._update_sink_mean(layer)
        return kc, vc, plan["valid"]

    def _reference_slots(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The slots of a single-frame write under the reference's queues (engine/kv_policy.py); host
        decisions, one sync per layer, as the reference makes them."""
        plan, q = self._plan, self.queues
        assert plan is not None and q is not None
        q.rows(layer, self.rows)
        low: list[float] = []
        idx: list[int] = []
        if q.checks_sinks:
            low, idx = q.sink_similarity(self.k[layer], self.v[layer], k, v, self.frame_tokens)
        full = self.plan[0].tolist()
        slots = []
        for r in range(self.rows):
            if q.checks_sinks and low[r] < q.threshold:  # type: ignore[operator]
                q.flag_sink(layer, r, idx[r])
            if full[r]:
                slots.append(q.evict(layer, r))
            else:
                p = plan["host_slot"][r]
                q.filled(layer, r, p, 1)
                slots.append(p)
        return h2d(slots, self.device)

    def _update_sink_mean(self, layer: int) -> None:
        rows, s, t = self.rows, self.num_sink, self.frame_tokens
        km = self.k[layer][:, : s * t].reshape(rows, s, t, -1).mean(2)
        vm = self.v[layer][:, : s * t].reshape(rows, s, t, -1).mean(2)
        cur = self.sink_mean.get(layer)
        if cur is None or cur[0].shape != km.shape:
            self.sink_mean[layer] = (km, vm)
            return
        # in place: a captured CUDA graph of the steady state reads these very tensors, and a position
        # wrap (_rebase, between replays) changes the means
        cur[0].copy_(km)
        cur[1].copy_(vm)

    def _evict_slot(self, layer: int, k: torch.Tensor, v: torch.Tensor, full: torch.Tensor,
                    idx: torch.Tensor) -> torch.Tensor:
        """The slot each full row writes (FIFO, or a sink to refresh); idx = arange(rows)."""
        s, rolling = self.num_sink, self.window - self.num_sink
        rr = self.rr[layer]
        slot = s + rr % rolling
        if self._refresh:
            rows, t = self.rows, self.frame_tokens
            ks, vs = self.sink_mean[layer]
            kn = k.reshape(rows, 1, t, -1).mean(2)
            vn = v.reshape(rows, 1, t, -1).mean(2)
            sim = (F.cosine_similarity(ks.float(), kn.float(), dim=-1) + F.cosine_similarity(vs.float(), vn.float(), dim=-1)) / 2
            low_val, low_idx = sim.min(dim=1)
            refresh = full & (low_val < self.sink_threshold)
            slot = torch.where(refresh, low_idx, slot)
            rr += (full & ~refresh).long()
            # the refreshed sink now holds the new frame: its means are the new frame's
            keep = ~refresh[:, None]
            ks[idx, low_idx] = torch.where(keep, ks[idx, low_idx], kn[:, 0])
            vs[idx, low_idx] = torch.where(keep, vs[idx, low_idx], vn[:, 0])
        else:
            rr += full.long()
        return slot

    # -- position wrap ----------------------------------------------------------------------------
    def _rebase(self, row: int, delta: int) -> None:
        """Positions of `row` jump back by `delta`: move rolling keys with them, put sinks at slot index."""
        w, t = self.window, self.frame_tokens
        slot_idx = torch.arange(w, device=self.device)
        for layer in self.layers:
            old = self.slot_pos[layer][row]
            new = torch.where(slot_idx < self.num_sink, slot_idx, old - delta)
            ang = self.rope.time_angles(new - old).repeat_interleave(t, dim=0)[None]  # [1, W*T, pairs]
            k = self.k[layer][row : row + 1]
            self.k[layer][row : row + 1] = rotate(k, ang.cos(), ang.sin())
            self.slot_pos[layer][row] = new
            if self._refresh:
                self._update_sink_mean(layer)

    # -- moving a layer to another cache (pipeline block moves) --------------------------------------
    LAYER_STATE = ("k", "v", "rr", "pos")

    @property
    def layer_state(self) -> tuple[str, ...]:
        """What export_layer returns: LAYER_STATE, and the eviction queues under the reference policy."""
        return self.LAYER_STATE + (("queue",) if self.queues is not None else ())

    def export_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Remove `layer` from this cache and return its state (layer_state names)."""
        self.layers.remove(layer)
        self.sink_mean.pop(layer, None)  # derived: the taker recomputes it
        out = dict(k=self.k.pop(layer), v=self.v.pop(layer), rr=self.rr.pop(layer), pos=self.slot_pos.pop(layer))
        if self.queues is not None:
            out["queue"] = self.queues.export_layer(layer)
        return out

    def import_layer(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        if self.queues is not None:
            self.queues.import_layer(layer, state["queue"])
        self.k[layer], self.v[layer] = state["k"], state["v"]
        self.rr[layer], self.slot_pos[layer] = state["rr"], state["pos"]
        self.layers = sorted(set(self.layers) | {layer})
        if self._refresh:
            self._update_sink_mean(layer)

    # -- stream batch bookkeeping -------------------------------------------------------------------
    def expand_rows(self, rows: int) -> None:
        """Replicate row 0 into `rows` rows (after the first chunk, one row per denoising step)."""
        for i in self.layers:
            self.k[i] = self.k[i][:1].repeat(rows, 1, 1, 1)
            self.v[i] = self.v[i][:1].repeat(rows, 1, 1, 1)
            self.rr[i] = self.rr[i][:1].repeat(rows)
            self.slot_pos[i] = self.slot_pos[i][:1].repeat(rows, 1)
            if self._refresh:
                self.sink_mean[i] = tuple(m[:1].repeat(rows, 1, 1) for m in self.sink_mean[i])  # type: ignore[assignment]
        self.filled = self.filled[:1] * rows
        self.last_pos = self.last_pos[:1] * rows
        self.plan = torch.zeros(3, rows, dtype=torch.long, device=self.device)
        self.rows = rows
