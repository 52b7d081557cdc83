"""interface/pauses.py: long garbage collections and a late event loop are counted and logged."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time

from interface.pauses import GcPauses, LoopLag, freeze_startup_objects


def test_a_long_collection_is_counted_and_logged(caplog) -> None:
    ticks = itertools.count()
    pauses = GcPauses(log_ms=20.0, clock=lambda: 0.025 * next(ticks)).install()  # each collection "takes" 25 ms
    try:
        with caplog.at_level(logging.WARNING, logger="interface.pauses"):
            gc.collect()
    finally:
        pauses.uninstall()
    assert pauses.collections[2] >= 1 and pauses.long >= 1 and pauses.max_ms >= 25.0 - 1e-6
    assert any("generation 2 held the process for 25 ms" in r.getMessage() for r in caplog.records)
    n = sum(pauses.collections)
    gc.collect()  # uninstalled: no longer counted
    assert sum(pauses.collections) == n


def test_a_short_collection_is_counted_not_logged(caplog) -> None:
    pauses = GcPauses(log_ms=1e6).install()
    try:
        with caplog.at_level(logging.WARNING, logger="interface.pauses"):
            gc.collect()
    finally:
        pauses.uninstall()
    assert pauses.collections[2] >= 1 and pauses.long == 0 and not caplog.records


def test_a_blocked_event_loop_is_seen_late(caplog) -> None:
    async def main() -> LoopLag:
        lag = LoopLag(interval_s=0.02, log_ms=100.0)
        lag.start()
        await asyncio.sleep(0.1)  # on time
        time.sleep(0.25)  # a callback that blocks the loop
        await asyncio.sleep(0.1)
        lag.stop()
        return lag

    with caplog.at_level(logging.WARNING, logger="interface.pauses"):
        lag = asyncio.run(main())
    assert lag.long == 1 and 200 <= lag.max_ms < 400, (lag.long, lag.max_ms)
    assert "event loop ran" in caplog.records[0].getMessage()


def test_frozen_objects_are_left_out_of_collections() -> None:
    try:
        frozen = freeze_startup_objects()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
