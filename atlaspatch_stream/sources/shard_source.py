"""One shard on this machine: its own slides (biggest first), then with `--steal` the other shards' slides nobody has
claimed, each copied to node-local disk first with `--stage-dir`.

`ShardSource` is a `run.JobSource`: the engine, its claims and its run report are the ordinary ones. The claim each
slide takes when it starts (`<out>/patches/<stem>.lock`, see `outputs.claims`) is what keeps two shards, a
resubmitted task and a thief off one slide; this module only decides which slides to offer and when.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio

from ..items import SlideJob, SlideResult
from .job_list import JobList
from .local_copy import LocalCopier, free_to_take
from .shards import ShardWork

# A thief takes another slide only while fewer than this many of its slides are unfinished: enough to keep batches
# full across slides, few enough that it does not sit on slides their owner would have got to first.
STEAL_IN_FLIGHT = 4


class ShardSource(JobList):
    """Gives out a shard's slides, then (with `steal`) unclaimed slides of other shards; copies each with `copier`.
    Its `unsent()` are this shard's slides not given out yet (other shards' slides are theirs to report).

    Args:
        work: this process's slides and the others', in order (`shards.split_shard`).
        output: the output root (where claims and H5s are looked up).
        skip_existing: the run's `--skip-existing` (a slide with an output is not copied, and never stolen).
        steal: take other shards' slides once this shard's are all given out.
        copier: copy each slide to local disk before it is read (the copy is deleted when its result settles).
        on_steal: called with each stolen job just before it is given out (progress totals).
    """

    def __init__(self, work: ShardWork, output: Path, skip_existing: bool, *, steal: bool = False,
                 copier: LocalCopier | None = None, on_steal: Callable[[SlideJob], None] | None = None) -> None:
        super().__init__(work.own)
        self.work = work
        self.output = output
        self.skip_existing = skip_existing
        self.steal = steal
        self.copier = copier
        self.on_steal = on_steal
        self.stolen = 0
        self._unsettled = 0
        self._settled = anyio.Event()
        self._io = anyio.CapacityLimiter(1)

    async def jobs(self) -> AsyncIterator[SlideJob]:
        """This shard's slides, then the ones it steals; each copied to local disk when that is worth it."""
        async for job in super().jobs():
            yield await self._given(job)
        if self.steal:
            async for job in self._stolen():
                yield job

    async def settle(self, job: SlideJob, result: SlideResult) -> None:
        """The slide's result is in: delete its local copy, and let a waiting thief take another slide."""
        if self.copier is not None:
            self.copier.release(job)
        self._unsettled -= 1
        self._settled.set()
        self._settled = anyio.Event()

    async def _given(self, job: SlideJob) -> SlideJob:
        """`job`, counted as unsettled; copied to local disk in a worker thread when that is worth it (a cancelled
        run returns at once: the copy stops when the copier closes)."""
        self._unsettled += 1
        if self.copier is None:
            return job
        copied: SlideJob = await anyio.to_thread.run_sync(self.copier.copy_for, job, self.output, self.skip_existing,
                                                          abandon_on_cancel=True, limiter=self._io)
        return copied

    async def _stolen(self) -> AsyncIterator[SlideJob]:
        for job in self.work.others:
            while self._unsettled >= STEAL_IN_FLIGHT:
                await self._settled.wait()
            # no output yet and no live claim: a slide its owner has not started, or whose owner died
            if not await anyio.to_thread.run_sync(free_to_take, job, self.output, True, limiter=self._io):
                continue
            self.stolen += 1
            if self.on_steal is not None:
                self.on_steal(job)
            yield await self._given(job)
