"""The daemon's notion of time, injectable so that settle periods, backoff and retries are deterministic in tests.

`now()` is wall-clock seconds since the epoch, because the ledger stores due times (`next_attempt_at`) that must
survive a restart. `sleep_until()` waits on that same clock.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["Clock", "ManualClock", "SystemClock"]


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


class ManualClock:
    """A clock that moves only when told to: `advance()` wakes every sleeper whose deadline has come.

    Args:
        start: the initial time, seconds since the epoch.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._waiters: list[anyio.Event] = []

    def now(self) -> float:
        """The current manual time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the sleepers.

        Raises:
            ValueError: `seconds` is negative.
        """
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds
        waiters, self._waiters = self._waiters, []
        for event in waiters:  # a waiter woken early re-checks its deadline itself
            event.set()

    async def sleep_until(self, deadline: float) -> None:
        """Wait until `advance()` has moved the time to `deadline`."""
        while self._now < deadline:
            await self.wait_until(deadline, anyio.Event())
        await anyio.lowlevel.checkpoint()

    async def wait_until(self, deadline: float, event: anyio.Event) -> None:
        """Wait for `event`, or for `advance()` (which sets `event` so the caller re-checks its deadline)."""
        if self._now < deadline and not event.is_set():
            self._waiters.append(event)
            await event.wait()
        await anyio.lowlevel.checkpoint()
