"""Errors of the parallel engine. No torch here: the server may import this module."""

from __future__ import annotations


class EngineFailure(RuntimeError):
    """The engine as a whole stopped working (a rank died, raised, or stopped making progress).

    Raised from every session call once it happens; every session of the engine is lost, and the
    engine must be closed and created again. `rank` is the rank that failed first, when known.
    """

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
