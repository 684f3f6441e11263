"""The Ray engine: one `NodeWorker` actor per GPU in the cluster (or N CPU workers), each holding the unchanged
pipeline through `sync.open_pipeline` (its models loaded once per actor), driven from this process.

`RayEngine` is a `run.Engine`: `run.drive` feeds it and owns the run contract (stop, drain, every slide one result,
the report's life). The engine keeps `in_flight` slides outstanding per worker (pull: a worker gets its next slide
when one finishes, so slow and fast slides balance themselves), writes each slide's report line locally, and merges
the workers' statistics into `run_end`. Workers write H5s straight to the shared output with the usual temporary
name, rename and claim; the driver only moves slide paths and small result records, never pixels.

Faults: a worker that dies (killed, out of memory, node lost) or whose pipeline breaks has its slides retried on
other workers, each slide counted against `max_attempts`; Ray restarts the actor (up to `max_restarts`), which
reloads its models. A slide that fails as a slide fails once, as in local mode. Claims are tagged with the run
(`process ray:<run id>`), so a retry takes over at once the claim its dead worker left, even on another host where
only the lease would tell: the driver gives a slide to one worker at a time, so no live worker of this run holds it.

`ray` is imported inside functions only, and this module never calls `ray.init`: the caller connects (the CLI's
`--ray-address`), and the library never starts a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import errors, outputs
from ..config import PipelineConfig
from ..errors import STOP_REASONS, ConfigError, PipelineClosed, import_extra, refused
from ..items import EngineStatistics, SlideJob, SlideResult
from ..outputs import claims
from ..outputs.h5outputs import H5Outputs
from ..pipeline import Mode
from ..report import RunReport, flat_statistics
from ..run import OnResult, RunSummary, Stop, run_jobs, serving
from ..sources.job_list import JobList
from ..sources.local_copy import CopyOptions, LocalCopier
from ..stages.book import Tally

log = logging.getLogger("atlaspatch_stream")


def import_ray() -> Any:
    """The `ray` module.

    Raises:
        MissingExtraError: the `[ray]` extra is not installed.
    """
    return import_extra("ray", "ray", "--engine ray needs the ray extra")


@dataclass(frozen=True)
class RayOptions:
    """How the driver uses the cluster.

    Attributes:
        workers: N CPU workers; None: one worker per GPU in the cluster.
        in_flight: slides outstanding per worker (a few keep its encoder batches full across slides).
        max_attempts: tries per slide when workers die under it.
        max_restarts: times Ray restarts each worker actor.
        stage: stage slides on each worker's local disk.
        start_timeout_s: how long the workers may take to start (place, import, load models).
        close_timeout_s: how long they may take to close at the end.
    """

    workers: int | None = None
    in_flight: int = 3
    max_attempts: int = 3
    max_restarts: int = 4
    stage: CopyOptions | None = None
    start_timeout_s: float = 600.0
    close_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.max_attempts < 1 or self.in_flight < 1 or self.max_restarts < 0:
            raise ConfigError("--max-attempts and in_flight must be at least 1, max_restarts at least 0")


# -- the worker (inside a Ray actor) ---------------------------------------------------------------------------------


class NodeWorker:
    """One pipeline on one GPU (or CPU), inside a Ray actor; its methods run in the actor's threads.

    Start-up errors (weights, extras, settings) are kept and reported by `ready()`, so the driver can show the
    cause instead of a bare actor death.
    """

    def __init__(self, config: PipelineConfig, mode: Mode, tag: str, stage: CopyOptions | None) -> None:
        from .. import sync
        from ..assembly import RealBackends

        self.config = config
        self.tag = tag
        self.error: tuple[str, str] | None = None
        self.copier: LocalCopier | None = None
        self._stack = contextlib.ExitStack()
        try:
            if stage is not None:
                self.copier = self._stack.enter_context(LocalCopier(stage))
            backends = RealBackends(config)
            backends.outputs = H5Outputs(config, backends.settings, purpose=tag)
            self.pipeline = self._stack.enter_context(sync.open_pipeline(
                config, mode=mode, backends=backends, command="ray-worker", run_report=False))
        except Exception as exc:  # noqa: BLE001 - reported to the driver by ready()
            self.error = (type(exc).__name__, " ".join(str(exc).split()) or errors.describe(exc))
            self._stack.close()

    def ready(self) -> dict[str, Any]:
        """Where this worker runs, and its start-up error if any."""
        return {"error": self.error, "pid": os.getpid(), "host": socket.gethostname()}

    def process(self, job: SlideJob, retry: bool) -> SlideResult:
        """Process one slide and return its result (the driver names it by its own job, whatever was staged).

        On a retry, a claim of this run on the slide belongs to a worker that died: it is taken over at once.
        """
        if retry:
            claims.break_claim(outputs.lock_path(self.config.write.output, job.stem),
                               lambda holder: holder.purpose == self.tag, "its Ray worker died")
        write = self.config.write
        copied = self.copier.copy_for(job, write.output, write.skip_existing) if self.copier is not None else job
        try:
            return self.pipeline.process(copied)
        finally:
            if self.copier is not None:
                self.copier.release(copied)

    def statistics(self) -> dict[str, Any]:
        """The pipeline's statistics, where it runs, and what staging did."""
        stats: dict[str, Any] = {**flat_statistics(self.pipeline.statistics()), "pid": os.getpid(),
                                 "host": socket.gethostname()}
        if self.copier is not None:
            stats["staging"] = self.copier.statistics()
        return stats

    def close(self) -> None:
        """Drain and close the pipeline (nothing is in flight when the driver calls this)."""
        self._stack.close()

    def abort(self) -> None:
        """Cancel the pipeline: slides in flight are dropped, partial outputs removed, claims released."""
        with contextlib.suppress(BaseException):
            self._stack.__exit__(_Aborted, _Aborted("the run was stopped"), None)


class _Aborted(Exception):
    """Thrown into a worker's pipeline to cancel it."""


# -- the driver's bookkeeping (pure: no Ray) -------------------------------------------------------------------------


@dataclass(eq=False)
class Attempt:
    """A slide on its way through the workers: failed tries so far, and the workers it failed on."""

    job: SlideJob
    tries: int = 0
    avoid: set[int] = field(default_factory=set)


class Dispatch:
    """Which slide each worker slot gets next: pending slides in order, retries first and on another worker.

    A retried slide goes to a worker it has not failed on, unless every live worker has failed it. `take` waits while
    nothing is pending but more may come (the input is open, or slides are still out and may come back), and
    returns None once all is done, the input closed, or intake stopped.
    """

    def __init__(self, jobs: Iterable[SlideJob], max_attempts: int, workers: Iterable[int]) -> None:
        self.pending: deque[Attempt] = deque(Attempt(j) for j in jobs)
        self.running: dict[int, Attempt] = {}
        self.live = set(workers)
        self.max_attempts = max_attempts
        self.stopped: str | None = None
        self.closed = False
        self._changed: anyio.Event | None = None  # made on the event loop, when somebody first waits

    def add(self, job: SlideJob) -> None:
        """One more slide to run."""
        self.pending.append(Attempt(job))
        self._notify()

    def close(self) -> None:
        """No more slides will be added."""
        self.closed = True
        self._notify()

    async def changed(self) -> None:
        """Until the next change (a slide taken, done, retried, a worker gone)."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def take(self, worker: int) -> Attempt | None:
        """The next slide for a slot of `worker`, or None when there is nothing left for it."""
        while self.stopped is None and worker in self.live:
            attempt = self._pick(worker)
            if attempt is not None:
                self.running[attempt.job.slide_id] = attempt
                self._notify()
                return attempt
            if self.closed and not self.pending and not self.running:
                return None
            await self.changed()
        return None

    def _pick(self, worker: int) -> Attempt | None:
        for attempt in self.pending:
            if worker not in attempt.avoid or self.live <= attempt.avoid:
                self.pending.remove(attempt)
                return attempt
        return None

    def done(self, attempt: Attempt) -> None:
        """The slide has its final result."""
        self.running.pop(attempt.job.slide_id, None)
        self._notify()

    def give_back(self, attempt: Attempt) -> None:
        """The slide was taken but never sent (its worker is gone): it goes first again, no attempt counted."""
        self.running.pop(attempt.job.slide_id, None)
        self.pending.appendleft(attempt)
        self._notify()

    def retry(self, attempt: Attempt, worker: int) -> bool:
        """The slide's worker died under it: queue it again first (True), or False when its attempts are used up."""
        attempt.tries += 1
        attempt.avoid.add(worker)
        if attempt.tries < self.max_attempts:
            self.give_back(attempt)
            return True
        self.done(attempt)
        return False

    def worker_gone(self, worker: int) -> None:
        """`worker` will take nothing more."""
        self.live.discard(worker)
        self._notify()

    def stop(self, reason: str) -> list[Attempt]:
        """No more slides start (the first reason is kept); returns those that were still pending."""
        self.stopped = self.stopped or reason
        left, self.pending = list(self.pending), deque()
        self._notify()
        return left

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


def absolute(value: Any) -> Any:
    """`value` with every `Path` inside it (dataclass fields, tuples) made absolute against this process's folder.

    Workers run in other processes, often on other nodes, in folders of their own: a relative output, weights file
    or slide path would name something else there.
    """
    if isinstance(value, Path):
        return value.absolute()
    if isinstance(value, tuple):
        return tuple(absolute(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: absolute(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def merge_worker_statistics(workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over the workers' pipeline statistics (each counts what its current actor saw since it started)."""
    by_status: Counter[str] = Counter()
    for stats in workers.values():
        by_status.update(stats.get("by_status", {}))
    total = {key: sum(int(s.get(key, 0)) for s in workers.values()) for key in ("finished", "submitted", "patches")}
    return {**total, "by_status": dict(by_status)}


# -- the driver ------------------------------------------------------------------------------------------------------


@dataclass
class Worker:
    """The driver's view of one worker actor."""

    index: int
    actor: Any
    pid: int | None = None
    host: str | None = None
    restarts: int = 0  # also which life of the actor a slot saw: a death is recovered once
    busy: int = 0  # slides sent and not yet answered
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def name(self) -> str:
        """`worker 1 (pid 123 on node-a)`."""
        return f"worker {self.index} (pid {self.pid} on {self.host})"


@dataclass(frozen=True)
class RayStatistics(EngineStatistics):
    """The Ray engine's statistics: the driver's totals, live workers, start-up time, retries; at the end, each
    worker's own pipeline statistics and their sum."""

    engine: str = "ray"
    workers_alive: int = 0
    workers_start_s: float = 0.0
    retried: int = 0
    worker_totals: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)


class RayEngine:
    """Runs slides on a Ray cluster the caller has connected to (`ray.init`), one pipeline per worker actor.

    `async with engine.open(report) as engine:` starts the workers (their own start-up error comes out, before the
    report's first line), then it is a `run.Engine` for `run.drive`; `process_slides(jobs, ...)` does both. Paths in
    the settings and the jobs are made absolute before they are sent (the H5s' `wsi_path` is then absolute too);
    results name slides as the caller's jobs do. A systemic output failure stops intake, as in a local run.
    """

    def __init__(self, config: PipelineConfig, *, options: RayOptions | None = None, mode: Mode = "features",
                 command: str = "process") -> None:
        self.config = absolute(config)
        self.options = absolute(options or RayOptions())
        self.mode = mode
        self.command = command
        self.workers: list[Worker] = []
        self.tally = Tally()
        self.retried = 0
        self.start_s = 0.0  # how long the workers took to start (placed, imported, models loaded)
        self.submitted = 0
        self.torn_down: list[SlideResult] = []
        self._dispatch = Dispatch([], self.options.max_attempts, [])
        room = 2 * self.options.in_flight * max(1, self.options.workers or 1) + 8
        self._send, self._receive = anyio.create_memory_object_stream[SlideResult](room)
        self._abort: anyio.CancelScope | None = None  # made by `open`, on the event loop
        self._final_stats: RayStatistics | None = None
        self._io = anyio.CapacityLimiter(1)

    # -- run.Engine -------------------------------------------------------------------------------------------------

    async def submit(self, job: SlideJob) -> None:
        """Queue one slide; waits while every worker slot already has one waiting."""
        dispatch = self._dispatch
        while len(dispatch.pending) >= self.options.in_flight * max(1, len(dispatch.live)) and not self._done():
            await dispatch.changed()
        if self._done():
            raise PipelineClosed("the Ray engine takes no more slides")
        self.submitted += 1
        dispatch.add(job)

    def results(self) -> MemoryObjectReceiveStream[SlideResult]:
        """Final results as the workers return them; ends when every slot has ended."""
        return self._receive.clone()

    async def close_input(self) -> None:
        """No more slides: the workers finish what they have."""
        self._dispatch.close()

    def stop_intake(self, reason: str) -> None:
        """No slide starts any more: `run.drive` answers those still pending `cancelled` ("not started: <reason>")."""
        self._dispatch.stop(reason)

    def abort(self) -> None:
        """Cancel the slides in flight now (their workers' pipelines are aborted when the engine closes)."""
        if self._abort is not None:
            self._abort.cancel()

    @property
    def stop_reason(self) -> str | None:
        """Why intake stopped: a request, a systemic failure, or every worker gone."""
        return self._dispatch.stopped

    def statistics(self) -> RayStatistics:
        """The driver's totals (one count per slide), live workers and retries; the workers' own at the end."""
        if self._final_stats is not None:
            return self._final_stats
        return RayStatistics(state="running", totals=self.tally.totals(), in_flight=len(self._dispatch.running),
                             submitted=self.submitted, stopped=self.stop_reason,
                             workers_alive=len(self._dispatch.live),
                             workers_start_s=round(self.start_s, 3), retried=self.retried)

    # -- opening and running ----------------------------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, report: RunReport) -> AsyncIterator[RayEngine]:
        """Start the workers (their start-up error comes out here), run their slots, and yield the engine; on exit
        close the input, wait for the slots, collect the workers' statistics and close (or abort) them.

        Raises:
            ConfigError: Ray is not initialised, the cluster has no GPU and no `workers` were asked for, or it lacks
                the CPUs for them.
            WeightsError, MissingExtraError, AtlasPatchError: a worker could not start (its own error).
        """
        self._report = report
        report.begin({**dataclasses.asdict(self.config), "ray": dataclasses.asdict(self.options)})
        await self._start_workers(f"process ray:{report.run_id}")
        self.tally = Tally()  # throughput from the first slide on, the workers' start-up apart
        self._abort = abort = anyio.CancelScope()
        clean = False
        try:
            async with serving(self, self._serve):
                yield self
            clean = not abort.cancel_called
        finally:
            with anyio.CancelScope(shield=True):
                self._final_stats = await self._finish_workers(drain=clean and not self._dispatch.running)

    async def process_slides(self, jobs: Sequence[SlideJob], *, stop: Stop | None = None,
                             on_result: OnResult | None = None) -> RunSummary:
        """Run `jobs` on the workers with the run's report: `run.run_jobs` over this engine."""
        report = RunReport(self.config.write.output, self.command)
        return await run_jobs(JobList(jobs), self.open(report), report=report, stop=stop, on_result=on_result,
                              drain_timeout_s=self.config.run.drain_timeout_s)

    def _done(self) -> bool:
        return self._dispatch.stopped is not None or not self._dispatch.live

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Every slot of every worker until all is done (or aborted); then answer what is left and end `results()`."""
        assert self._abort is not None, "open() made the abort scope"
        async with self._send:
            with self._abort:
                async with anyio.create_task_group() as slots:
                    for worker in self.workers:
                        for _ in range(self.options.in_flight):
                            slots.start_soon(self._slot, worker)
                    task_status.started()
            await self._settle(aborted=self._abort.cancel_called)

    async def _start_workers(self, tag: str) -> None:
        self._ray = ray = import_ray()
        if not ray.is_initialized():
            raise ConfigError("Ray is not initialised: connect to a cluster first (the CLI's --ray-address does)")
        count, gpus = self._worker_count()
        started = time.perf_counter()
        actor_class = ray.remote(NodeWorker).options(
            num_cpus=1, num_gpus=gpus, max_restarts=self.options.max_restarts, max_task_retries=0,
            max_concurrency=self.options.in_flight + 2, scheduling_strategy="SPREAD")
        self.workers = [Worker(i, actor_class.remote(self.config, self.mode, tag, self.options.stage))
                        for i in range(count)]
        try:
            with anyio.fail_after(self.options.start_timeout_s):
                infos = [await w.actor.ready.remote() for w in self.workers]
            failed = next((info["error"] for info in infos if info["error"]), None)
            if failed is not None:
                raise _startup_error(*failed)
        except TimeoutError:
            self._kill_all()
            raise ConfigError(f"{count} Ray worker(s) did not start within {self.options.start_timeout_s:g} s "
                              f"(is the cluster busy?)") from None
        except BaseException:
            self._kill_all()
            raise
        self.start_s = time.perf_counter() - started
        self._dispatch = Dispatch([], self.options.max_attempts, (w.index for w in self.workers))
        for worker, info in zip(self.workers, infos, strict=True):
            worker.pid, worker.host = info["pid"], info["host"]

    def _worker_count(self) -> tuple[int, int]:
        """(workers, GPUs each): `workers` CPU workers, or one per GPU in the cluster."""
        resources = self._ray.cluster_resources()
        if self.options.workers is not None:
            cpus = int(resources.get("CPU", 0))
            if cpus < self.options.workers:
                raise ConfigError(f"--workers {self.options.workers} needs {self.options.workers} CPUs in the Ray "
                                  f"cluster, it has {cpus}")
            return self.options.workers, 0
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise ConfigError("the Ray cluster has no GPU: pass --workers N to run N CPU workers")
        return gpus, 1

    async def _finish_workers(self, *, drain: bool) -> RayStatistics:
        """Collect every worker's statistics, close (or abort) it and release its actor; the run_end statistics."""
        per_worker: dict[str, dict[str, Any]] = {}
        with anyio.move_on_after(self.options.close_timeout_s):
            for worker in (w for w in self.workers if w.index in self._dispatch.live):
                with contextlib.suppress(Exception):
                    per_worker[f"worker-{worker.index}"] = {**await worker.actor.statistics.remote(),
                                                            "restarts": worker.restarts}
                with contextlib.suppress(Exception):
                    await (worker.actor.close if drain else worker.actor.abort).remote()
        self._kill_all()
        return dataclasses.replace(self.statistics(), state="closed", worker_totals=merge_worker_statistics(per_worker),
                                   workers=per_worker)

    def _kill_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self._ray.kill(worker.actor)

    # -- the slots ---------------------------------------------------------------------------------------------------

    async def _slot(self, worker: Worker) -> None:
        """One of a worker's in-flight places: take a slide, run it there, record or retry it; until nothing is left."""
        dispatch = self._dispatch
        while (attempt := await dispatch.take(worker.index)) is not None:
            async with worker.lock:  # while its actor restarts, a worker's slots wait here
                life = worker.restarts
            if worker.index not in dispatch.live:
                dispatch.give_back(attempt)
                return
            outcome = await self._call(worker, attempt)
            if isinstance(outcome, SlideResult):
                dispatch.done(attempt)
                await self._final(dataclasses.replace(outcome, job=attempt.job, attempts=attempt.tries + 1))
                continue
            await self._lost(worker, attempt, outcome)
            await self._recover(worker, life, kill=not isinstance(outcome, self._ray.exceptions.RayActorError))

    async def _call(self, worker: Worker, attempt: Attempt) -> SlideResult | Exception:
        """The slide's result from `worker`, or the Ray error that says the worker died (or its pipeline broke)."""
        worker.busy += 1
        try:
            result: SlideResult = await worker.actor.process.remote(absolute(attempt.job), attempt.tries > 0)
            return result
        except self._ray.exceptions.RayError as exc:
            return exc
        finally:
            worker.busy -= 1

    async def _lost(self, worker: Worker, attempt: Attempt, exc: BaseException) -> None:
        """A worker died (or its pipeline broke) with the slide in flight: retry it elsewhere, or fail it."""
        cause = _one_line(exc)
        log.warning("%s lost %s: %s", worker.name, attempt.job.name, cause)
        if self._dispatch.retry(attempt, worker.index):
            self.retried += 1
            return
        await self._final(SlideResult(
            attempt.job, "failed", message=f"{attempt.job.name}: its Ray worker died under it {attempt.tries} time(s) "
            f"(--max-attempts {self.options.max_attempts}); last: {cause}",
            failure=refused("worker", "worker_lost", "transient"), attempts=attempt.tries))

    async def _recover(self, worker: Worker, life: int, *, kill: bool) -> None:
        """Once per death: wait for Ray to restart the actor (restarting a broken one first); retire it if it cannot."""
        async with worker.lock:
            if worker.restarts != life or worker.index not in self._dispatch.live:
                return
            if kill:
                self._ray.kill(worker.actor, no_restart=False)
            info = await self._wait_ready(worker)
            if info is None or info["error"]:
                log.warning("%s is gone: %s", worker.name, info["error"][1] if info else "it cannot be restarted")
                self._dispatch.worker_gone(worker.index)
                return
            worker.restarts += 1
            worker.pid, worker.host = info["pid"], info["host"]

    async def _wait_ready(self, worker: Worker) -> dict[str, Any] | None:
        """The restarted actor's `ready()`, or None once Ray says it is dead for good (or it takes too long)."""
        with anyio.move_on_after(self.options.start_timeout_s):
            while True:
                try:
                    info: dict[str, Any] = await worker.actor.ready.remote()
                    return info
                except self._ray.exceptions.ActorUnavailableError:
                    await anyio.sleep(0.5)  # restarting: Ray answers "unavailable" until the actor is back
                except self._ray.exceptions.RayError:
                    return None
        return None

    async def _final(self, result: SlideResult) -> None:
        """Count and send one slide's final result with its report line; a systemic failure stops intake."""
        self.tally.add(result)
        await self._report_line(result)
        await self._send.send(result)
        if result.failure is not None and result.failure.systemic:
            self.stop_intake(STOP_REASONS.get(result.failure.kind, "output failure"))

    async def _report_line(self, result: SlideResult) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._report.slide, result, limiter=self._io)

    async def _settle(self, *, aborted: bool) -> None:
        """After the slots: slides in flight when aborted are torn down (with their report lines); slides no worker
        was left for fail."""
        for attempt in self._dispatch.running.values():
            result = SlideResult(attempt.job, "cancelled", message="interrupted before it finished")
            self.tally.add(result)
            self.torn_down.append(result)
            await self._report_line(result)
        if self._dispatch.pending and not aborted:
            for attempt in self._dispatch.stop("every Ray worker died"):
                await self._final(SlideResult(attempt.job, "failed", message=f"{attempt.job.name}: no Ray worker "
                                              "was left to process it",
                                              failure=refused("worker", "worker_lost", "transient")))


def _startup_error(kind: str, message: str) -> errors.AtlasPatchError:
    """A worker's start-up error as the same class the local pipeline would raise."""
    known: dict[str, type[errors.AtlasPatchError]] = {"WeightsError": errors.WeightsError, "ConfigError": ConfigError}
    if kind == "MissingExtraError":
        return errors.MissingExtraError(message)
    return known.get(kind, errors.AtlasPatchError)(f"a Ray worker could not start: {message}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")
