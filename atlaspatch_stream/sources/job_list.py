"""`JobList`: the plainest job source, a list of jobs given out in order (`process` on paths)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from ..items import SlideJob, SlideResult


class JobList:
    """Gives out `jobs` in order; those never given out (the run stopped first) are `unsent()`."""

    def __init__(self, jobs: Sequence[SlideJob]) -> None:
        self._jobs = list(jobs)
        self._next = 0

    async def jobs(self) -> AsyncIterator[SlideJob]:
        """Each job once, in order."""
        while self._next < len(self._jobs):
            self._next += 1
            yield self._jobs[self._next - 1]

    async def settle(self, job: SlideJob, result: SlideResult) -> None:
        """Nothing to release."""

    def unsent(self) -> list[SlideJob]:
        """The jobs not given out yet."""
        return self._jobs[self._next:]
