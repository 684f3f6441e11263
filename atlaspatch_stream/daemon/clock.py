"""The daemon's notion of time, injectable so that settle periods, backoff and retries are deterministic in tests
(the tests' manual clock is `tests/daemon/manual_clock.py`).

`now()` is wall-clock seconds since the epoch, because the ledger stores due times (`next_attempt_at`) that must
survive a restart. `sleep_until()` waits on that same clock.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """What the watcher and the ledger need from a clock."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once `now() >= deadline` (at once when it already is)."""
        ...

    async def wait_until(self, deadline: float, event: anyio.Event) -> None:
        """Return once `now() >= deadline` or `event` is set, whichever comes first (early returns are allowed)."""
        ...


class SystemClock:
    """The real clock: `time.time()` and `anyio.sleep`."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until `deadline` (a checkpoint even when it has passed)."""
        await anyio.sleep(max(0.0, deadline - time.time()))

    async def wait_until(self, deadline: float, event: anyio.Event) -> None:
        """Wait for `event`, at most until `deadline`."""
        with anyio.move_on_after(max(0.0, deadline - time.time())):
            await event.wait()
