"""Watching the in-process engine's core from a tool: `engine.core` of engine.runtime.StreamEngine is
rank 0 of a ring of one (docs/ARCHITECTURE.md §5-§6); its parts (the encoder and decoder, its stage
with the DiT blocks, its frame I/O) are called by the sessions' schedule while a push runs. The tools
put a wrapper over a part's method for a while (timing marks, recording the last call's arguments)
and take it off again; the wrapped parts run exactly as before.
"""

from __future__ import annotations

import inspect
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

Wrapper = Callable[[Callable], Callable]


@contextmanager
def wrapped(obj: Any, method: str, wrapper: Wrapper) -> Iterator[None]:
    """`obj.method` replaced by `wrapper(obj.method)` (an instance attribute over the class's method)
    inside the block; what was there before afterwards."""
    had = method in vars(obj)
    before = vars(obj).get(method)
    setattr(obj, method, wrapper(getattr(obj, method)))
    try:
        yield
    finally:
        if had:
            setattr(obj, method, before)
        else:
            delattr(obj, method)


class Marks:
    """Timestamps in device order (CUDA events on a GPU, the host clock elsewhere) taken after chosen
    calls of the core's parts: the time between two marks is what the device spent from the end of one
    call to the end of the next (idle time waiting for the host included)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, bool]] = []  # (label, event or time, starts a new segment)
        self._seen: dict[str, int] = {}

    def mark(self, label: str, anchor: bool = False) -> None:
        """A mark after what just ran; `anchor`: only a start (the time since the previous mark is not
        reported, e.g. the camera's 4/30 s between frame 0 and frames 1-4)."""
        n = self._seen[label] = self._seen.get(label, 0) + 1
        label = label if n == 1 else f"{label} #{n}"
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((label, ev, anchor))
        else:
            self.marks.append((label, time.perf_counter(), anchor))

    def after(self, label: Callable[..., str]) -> Wrapper:
        """A wrapper that marks after each call, labelled by `label(*args, **kwargs)`."""

        def wrap(inner: Callable) -> Callable:
            if inspect.isgeneratorfunction(inner):  # a call in parts (a decode): a mark after each
                def parts(*args: Any, **kwargs: Any) -> Iterator[Any]:
                    for out in inner(*args, **kwargs):
                        n = out.shape[2]
                        self.mark(f"{label(*args, **kwargs)} ({n} frame{'s' if n > 1 else ''})")
                        yield out

                return parts

            def call(*args: Any, **kwargs: Any) -> Any:
                out = inner(*args, **kwargs)
                self.mark(label(*args, **kwargs))
                return out

            return call

        return wrap

    def intervals(self) -> dict[str, float]:
        """ms from each mark to the next, labelled by the later one (call after a device synchronise)."""
        out = {}
        for (_, a, _), (label, b, anchor) in zip(self.marks, self.marks[1:]):
            if not anchor:
                out[label] = a.elapsed_time(b) if self.cuda else 1000 * (b - a)
        return out


@contextmanager
def marking(engine: Any, marks: Marks) -> Iterator[None]:
    """Marks after every call of the core's parts that a chunk's work goes through: frames to the device,
    VAE encode, the stage's embedding, blocks and head, VAE decode, frames to the host (queued)."""
    core = engine.core
    stage = core.stage

    def frames(t: Any) -> str:
        return f"{t.shape[2]} frame{'s' if t.shape[2] > 1 else ''}"

    def forward(groups: Any, *_: Any) -> str:
        g = groups[0]
        kind = "first chunk" if g.frames > 1 else "steady"
        rows = sum(x.rows for x in groups)
        return f"{kind}, {len(groups)} session{'s' if len(groups) > 1 else ''}, {rows} row{'s' if rows > 1 else ''}"

    hooks: list[tuple[Any, str, Callable[..., str]]] = [
        (core.io, "to_video_tensor", lambda f: f"frames to the device ({len(f)})"),
        (core.encoder, "stream_encode", lambda v, st, *a, **k: f"VAE encode {frames(v)}"),
        (stage, "embed", lambda groups, xs: f"DiT embed ({forward(groups)})"),
        (stage, "run", lambda groups, emb: f"DiT blocks ({forward(groups)}; "
                                           f"{'graph' if stage.last_graphed else 'eager'})"),
        (stage, "finish", lambda groups, *a: f"DiT head + x0 ({forward(groups)})"),
        (core.decoder, "stream_decode_parts", lambda z, st: f"VAE decode {z.shape[2]} latent{'s' if z.shape[2] > 1 else ''}"),
        (core.io, "to_uint8_later", lambda v: f"frames to the host, queued ({v.shape[2]})"),
    ]
    with ExitStack() as stack:
        for obj, method, label in hooks:
            stack.enter_context(wrapped(obj, method, marks.after(label)))
        yield


class LastCall:
    """The arguments of the latest call of a wrapped method."""

    def __init__(self) -> None:
        self.args: Optional[tuple] = None
        self.kwargs: dict = {}

    def __call__(self, inner: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.args, self.kwargs = args, kwargs
            return inner(*args, **kwargs)

        return call
