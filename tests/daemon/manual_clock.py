"""A clock for the daemon's tests that moves only when told to (`daemon.clock.Clock`)."""

from __future__ import annotations

import anyio
import anyio.lowlevel


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
