"""The in-process executor: the engine's core (rank 0 of a ring of one, engine.parallel.rank0) built in
the caller's process and stepped by the caller's thread. Nothing crosses a process or torch.distributed:
the ring's one hop is a loopback. Several sessions share it; those due together are batched into one
forward, as on a ring.

    engine = StreamEngine.create(EngineOptions(model="tiny"))
    s = engine.open_session("a watercolor painting")
    outputs = s.push(frames_uint8_THW3, pts) + s.flush()   # [(frame, pts), ...]

`device` names one device (`cpu`, `cuda`, `cuda:N`, `auto`) for this engine, or several ranks (`cpu:N`,
`cuda:0,1`, `cuda*N`, `torchrun`) for the ring executor of engine.parallel, which `create` returns
instead; both run the same schedule and have the same session API (docs/ARCHITECTURE.md §6).
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from engine.build import EngineOptions, resolve_device, resolve_dtype
from engine.config import ModelConfig, load_model_config
from engine import protocol as P
from engine.frontend import EngineFrontend, plain_stats
from engine.parallel.devices import parse_devices
from engine.parallel.engine import ParallelEngine
from engine.errors import EngineFailure
from engine.parallel.rank import RankSpec
from engine.parallel.rank0 import Rank0
from interface.devices import RankDevices

log = logging.getLogger(__name__)

__all__ = ["EngineOptions", "StreamEngine"]


class _Commands:
    """The core's command queue when it runs in the caller's thread (a pipe's poll/recv, without the pipe)."""

    def __init__(self) -> None:
        self._queue: deque = deque()

    def append(self, cmd: Any) -> None:
        self._queue.append(cmd)

    def poll(self, timeout: float = 0.0) -> bool:
        return bool(self._queue)

    def recv(self) -> Any:
        return self._queue.popleft()


class _Events:
    """The core's events, handed to the engine by a call. A weak reference: the engine holds the core, so
    a strong one back would make a cycle, and a dropped engine's GPU memory would wait for the garbage
    collector instead of going at once."""

    def __init__(self, engine: "StreamEngine") -> None:
        self._engine = weakref.ref(engine)

    def send(self, event: Any) -> None:
        engine = self._engine()
        if engine is not None:
            engine._on_event(event)


class StreamEngine(EngineFrontend):
    def __init__(self, cfg: ModelConfig, options: EngineOptions) -> None:
        super().__init__(options)
        self.cfg = cfg
        device = resolve_device(options.device)
        resolve_dtype(options.dtype, device)  # refuses fp8 where it cannot run, before building anything
        spec = RankSpec(0, 1, RankDevices(kind=device.type, devices=(str(device),)), options.model_dump(mode="json"),
                        init_method="", split=[cfg.dit.num_layers])
        self._commands = _Commands()
        with torch.no_grad():
            self.core = Rank0(spec, _Events(self), self._commands)
        self.info = self.core.info()
        self.finishes_in_background = device.type == "cuda"
        self.core._maybe_send_stats(force=True)
        if self.core.layout is None:
            log.warning("model %s runs with RANDOM WEIGHTS (no --weights given): the output is not a real restyling",
                        cfg.name)
        log.info("engine ready: %s", self.info.model_dump())

    @classmethod
    def create(cls, options: EngineOptions) -> Union["StreamEngine", ParallelEngine]:
        """The in-process engine for one device; the ring executor for several ranks."""
        cfg = load_model_config(options.model)
        ranks = parse_devices(options.device)
        if ranks is not None:
            if options.dtype == "fp8" and ranks.kind == "cpu":  # before spawning ranks (CUDA ranks check their own GPU)
                resolve_dtype(options.dtype, torch.device("cpu"))
            return ParallelEngine(cfg, options, ranks)
        return cls(cfg, options)

    # -- the executor: the core runs when the caller waits ---------------------------------------------
    @property
    def inflight(self) -> int:
        # on CUDA a push returns once its chunk is queued, so the GPU goes on while the host hands over
        # the previous chunk's frames
        return self.options.parallel.inflight or (2 if self.device.type == "cuda" else 1)

    def _command(self, cmd: Any) -> None:
        self._check()
        self._commands.append(cmd)

    def _step(self) -> bool:
        try:
            with torch.no_grad():
                return self.core.step()
        except Exception as exc:  # the core's state is not to be trusted any more: as a rank failing
            self._fail(EngineFailure(f"engine core: {type(exc).__name__}: {exc}", 0))
            raise EngineFailure(str(self._failure), 0) from exc

    def _flush_outputs(self, wait_next: bool = False) -> None:
        """The deferred forward's frames to the sessions; `wait_next`: only its next ones (waits for them)."""
        try:
            if wait_next:
                self.core.wait_outputs()
            else:
                self.core.flush_outputs()
        except Exception as exc:
            self._fail(EngineFailure(f"engine core: {type(exc).__name__}: {exc}", 0))
            raise EngineFailure(str(self._failure), 0) from exc

    def _wait(self, pred: Callable[[], bool], what: str, timeout: Optional[float] = None) -> None:
        while True:
            if self._failure is not None:
                raise EngineFailure(str(self._failure), self._failure.rank) from self._failure
            if pred():
                return
            if self._step():
                continue
            if self.core.deferred is not None:  # the last forward's frames: nothing else to queue first
                self._flush_outputs(wait_next=True)
                continue
            raise RuntimeError(f"the engine has nothing left to do while waiting for {what}")

    def _pump(self) -> None:
        while self._step():
            pass

    def _poll(self) -> None:
        self._pump()
        deferred = self.core.deferred
        if deferred is not None and all(pending.ready() for _, pending, _ in deferred.frames):
            self._flush_outputs()  # the frames are on the host: hand them over (one loopback hop)
            self._pump()

    def _close_session(self, s: Any) -> None:
        super()._close_session(s)
        if self._failure is None and not self._closed:
            self._poll()  # the session's KV cache goes now, not with the next push

    def close(self) -> None:
        """Stop serving and let go of every session's state now (sessions left open included: a
        schedule and the core reference each other, which only the garbage collector would undo)."""
        if self._closed:
            return
        self._closed = True
        self.core.close()
        self.core.drop_sessions()

    def __del__(self) -> None:  # a forgotten engine gives its GPU memory back at once
        try:
            self.close()
        except Exception:
            pass

    # -- the core's report, read as it is now (no process in between) ----------------------------------
    def ring_stats(self) -> P.RingStats:
        return self.core.stats()

    def stats(self) -> dict:
        return dict(plain_stats(self.core.stats()), failed=None if self._failure is None else str(self._failure))

    def wait_stats(self, pred: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        self._wait(lambda: pred(self.stats()), "a stats condition")
        return self.stats()

    # -- the parts, for tools and tests ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.core.device

    @property
    def dtype(self) -> torch.dtype:
        return self.core.dtype

    @property
    def defaults(self) -> Any:
        return self.core.defaults

    @property
    def dit(self) -> Any:
        return self.core.stage.dit

    @property
    def vae(self) -> Any:
        return self.core.vae

    @property
    def encoder(self) -> Any:
        return self.core.encoder

    @property
    def decoder(self) -> Any:
        return self.core.decoder

    @property
    def text(self) -> Any:
        return self.core.text

    @property
    def layout(self) -> Any:
        return self.core.layout

    def embed_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings [1, text_len, text_dim] for one prompt."""
        return self.core.embed_prompt(prompt)

    def to_video_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1] on the device."""
        return self.core.io.to_video_tensor(frames)

    def to_uint8(self, video: torch.Tensor) -> np.ndarray:
        """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the host."""
        return self.core.io.to_uint8(video)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
