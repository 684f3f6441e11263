"""What every stage test needs: a slide book whose results can be read, opened fake slides, memory streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from atlaspatch_stream.items import OpenedSlide, Reuse, SlideJob, SlideResult
from atlaspatch_stream.stages.book import SlideBook
from atlaspatch_stream.testing.fakes import FakeSlides, fake_jobs


@dataclass
class Books:
    """A `SlideBook` and the receive end of its results."""

    book: SlideBook
    results: MemoryObjectReceiveStream[SlideResult]

    def drained(self) -> list[SlideResult]:
        """Every result sent so far."""
        out = []
        while True:
            try:
                out.append(self.results.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                return out


@pytest.fixture
def books() -> Books:
    """A book admitting up to 10 slides; results buffered (up to 100)."""
    send, receive = anyio.create_memory_object_stream[SlideResult](100)
    return Books(SlideBook(send, 10, anyio.CapacityLimiter(1)), receive)


@dataclass
class CountingLock:
    """A lock that counts its releases."""

    released: int = 0
    beats: int = 0

    def heartbeat(self) -> bool:
        self.beats += 1
        return True

    def release(self) -> None:
        self.released += 1


@dataclass
class Opened:
    """Admitted, opened fake slides (the state a slide is in after `prepare`)."""

    books: Books
    slides: FakeSlides = field(default_factory=FakeSlides)

    async def slide(self, job: SlideJob, reuse: Reuse | None = None) -> OpenedSlide:
        assert await self.books.book.admit(job)
        handle = self.slides.open_slide(job)
        self.books.book.attach(job, handle=handle)
        return OpenedSlide(job, handle, reuse)


@pytest.fixture
def opened(books: Books) -> Opened:
    return Opened(books)


def jobs(folder: Path, n: int, prefix: str = "s") -> list[SlideJob]:
    """`n` fake jobs."""
    return fake_jobs(folder, [f"{prefix}{i}" for i in range(n)])


def statuses(results: list[SlideResult]) -> dict[str, Any]:
    """stem -> status."""
    return {r.job.stem: r.status for r in results}
