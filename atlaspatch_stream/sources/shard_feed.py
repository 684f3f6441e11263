"""One shard on this machine: its own slides (biggest first), then with `--steal` the other shards' slides nobody has
claimed, each copied to node-local disk first with `--stage-dir`.

`ShardFeed` is a feeder for `api.process_slides(feed=...)`: the pipeline, its claims and its run report are the
ordinary local ones. The claim each slide takes when it starts (`<out>/patches/<stem>.lock`, see
`sources.claims`) is what keeps two shards, a resubmitted task and a thief off one slide; this module only decides
which slides to offer and when.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from .. import outputs
from ..items import SlideJob, SlideResult
from ..outputs import claims
from ..pipeline import Pipeline
from .local_copy import LocalCopier, worth_copying
from .shards import ShardWork

log = logging.getLogger("atlaspatch_stream")

# A thief takes another slide only while fewer than this many are in flight: enough to keep batches full across
# slides, few enough that it does not sit on slides their owner would have got to first.
STEAL_IN_FLIGHT = 4
STEAL_POLL_S = 0.1


class ShardFeed:
    """Submits a shard's slides, then (with `steal`) unclaimed slides of other shards; stages each with `copier`.

    Args:
        plan: this process's slides and the others', in order (`plan.split_shard`).
        output: the output root (where claims and H5s are looked up).
        skip_existing: the run's `--skip-existing` (a slide with an output is not staged, and never stolen).
        steal: take other shards' slides once this shard's are all submitted.
        copier: copy each slide to local disk before it is read (`release` is called with each result).
        on_steal: called with each stolen job just before it is submitted (progress totals).
    """

    def __init__(self, plan: ShardWork, output: Path, skip_existing: bool, *, steal: bool = False,
                 copier: LocalCopier | None = None, on_steal: Callable[[SlideJob], None] | None = None) -> None:
        self.plan = plan
        self.output = output
        self.skip_existing = skip_existing
        self.steal = steal
        self.copier = copier
        self.on_steal = on_steal
        self.stolen = 0
        self._io = anyio.CapacityLimiter(1)

    async def __call__(self, pipeline: Pipeline, jobs: Sequence[SlideJob]) -> None:
        """Feed `jobs` (this shard's), then steal; close the pipeline's input. Jobs not submitted are reported."""
        for index, job in enumerate(jobs):
            staged = await self._stage(job) if pipeline.book.stop_reason is None else job
            if pipeline.book.stop_reason is not None:
                self.release(staged)
                await pipeline.cancel_unsubmitted(jobs[index:])
                break
            await pipeline.submit(staged)
        else:
            if self.steal:
                await self._steal(pipeline)
        await pipeline.close_input()

    def release(self, job: SlideJob) -> None:
        """A slide's result is in: delete its staged copy."""
        if self.copier is not None:
            self.copier.release(job)

    def on_result(self, result: SlideResult) -> None:
        """For `process_slides(on_result=...)`: frees the slide's room in the staging budget."""
        self.release(result.job)

    async def _stage(self, job: SlideJob) -> SlideJob:
        if self.copier is None:
            return job
        worth = await anyio.to_thread.run_sync(worth_copying, job, self.output, self.skip_existing,
                                               limiter=self._io)
        return await self.copier.copy_async(job) if worth else job

    async def _steal(self, pipeline: Pipeline) -> None:
        for job in self.plan.others:
            await _wait_for_room(pipeline)
            if pipeline.book.stop_reason is not None:
                return
            if not await anyio.to_thread.run_sync(self._unclaimed, job, limiter=self._io):
                continue
            self.stolen += 1
            if self.on_steal is not None:
                self.on_steal(job)
            await pipeline.submit(await self._stage(job))

    def _unclaimed(self, job: SlideJob) -> bool:
        """No output yet and no live claim: a slide its owner has not started, or whose owner died."""
        if outputs.h5_path(self.output, job.stem).exists():
            return False
        try:
            return claims.judge(outputs.lock_path(self.output, job.stem)).state != "held"
        except OSError:
            return True  # the claim taken when it starts meets (and reports) the problem


async def _wait_for_room(pipeline: Pipeline) -> None:
    """Until fewer than `STEAL_IN_FLIGHT` slides are queued or in flight (or intake stopped)."""
    while pipeline.book.stop_reason is None:
        stats = pipeline.statistics()
        if stats["in_flight"] + stats["streams"]["jobs"]["used"] < STEAL_IN_FLIGHT:
            return
        await anyio.sleep(STEAL_POLL_S)
