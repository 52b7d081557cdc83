"""Background tasks owned by one object (a session, the app state): kept referenced until done, a
failure reported to the owner, all cancelled when the owner closes."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine


class BackgroundTasks:
    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._on_error = on_error
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_error(task.exception())  # type: ignore[arg-type]

    def cancel_all(self) -> None:
        """Cancel every task but the one calling (a task may close its owner)."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
