"""The library as a service uses it: `process()` per request, backpressure, withdrawal, one exception out, and the
host application's event loop, thread limiter, signals and logging left alone."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import anyio
import h5py
import pytest

from atlaspatch_stream import sync
from atlaspatch_stream.api import open_pipeline, process_slides
from atlaspatch_stream.backends.encoders.group import EncoderGroup
from atlaspatch_stream.config import (
    EncodeConfig,
    OpenConfig,
    PipelineConfig,
    QueueConfig,
    SegmentConfig,
    WriteConfig,
)
from atlaspatch_stream.errors import ConfigError, PipelineClosed, PipelineFull, WeightsError
from atlaspatch_stream.items import SlideJob, SlideResult
from atlaspatch_stream.pipeline import Pipeline
from atlaspatch_stream.testing.fakes import FakeBackends, fake_jobs
from atlaspatch_stream.testing.synthetic import write_synthetic_slide
from tests.helpers import BrokenDeviceBackends, fake_config

pytestmark = pytest.mark.anyio



def _jobs(out: Path, n: int, prefix: str = "s") -> list[SlideJob]:
    return fake_jobs(out, [f"{prefix}{i}" for i in range(n)])


async def test_concurrent_process_calls_each_get_their_own_result(tmp_path: Path) -> None:
    """12 tasks call `process()` at once: each gets the result of its own slide (routed by job), with a complete H5;
    `results()` sees none of them."""
    config = fake_config(tmp_path, max_open=3)
    backends = FakeBackends(config, read_delay=0.005)
    jobs = _jobs(tmp_path, 12)
    got: dict[int, object] = {}
    with anyio.fail_after(20):
        async with open_pipeline(config, backends=backends) as pipeline:

            async def one(job: SlideJob) -> None:
                got[job.slide_id] = await pipeline.process(job)

            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(one, job)
            assert pipeline.streams.results.send.statistics().current_buffer_used == 0
    for job in jobs:
        result = got[job.slide_id]
        assert result.job == job and result.status == "done"  # type: ignore[attr-defined]
        with h5py.File(result.h5_path, "r") as f:  # type: ignore[attr-defined]
            assert f["features"]["a"].shape == (10, 3)


async def test_process_nowait_raises_pipeline_full_without_losing_accepted_slides(tmp_path: Path) -> None:
    """A pipeline with one slot and a job queue of 1: calls beyond its capacity get `PipelineFull` at once; every
    accepted call still completes."""
    base = fake_config(tmp_path, max_open=1, queues=QueueConfig(jobs=1))
    config = base.replace(open=OpenConfig(max_open_slides=1, open_workers=1))
    backends = FakeBackends(config, read_delay=0.05)
    accepted: list[SlideResult] = []
    refused: list[SlideJob] = []
    with anyio.fail_after(20):
        async with open_pipeline(config, backends=backends) as pipeline, anyio.create_task_group() as tg:

            async def one(job: SlideJob) -> None:
                try:
                    accepted.append(await pipeline.process_nowait(job))
                except PipelineFull:
                    refused.append(job)

            for job in _jobs(tmp_path, 8):
                tg.start_soon(one, job)
                await anyio.wait_all_tasks_blocked()
    assert refused and accepted and len(accepted) + len(refused) == 8
    assert all(r.status == "done" for r in accepted)
    assert sorted(p.stem for p in (tmp_path / "patches").glob("*.h5")) == sorted(r.job.stem for r in accepted)


async def test_full_pipeline_refuses_with_pipeline_full(tmp_path: Path) -> None:
    """`submit_nowait` on a full job queue raises `PipelineFull` (documented for a 503), and the slide is not lost
    from the counts: it was never accepted."""
    base = fake_config(tmp_path, max_open=1, queues=QueueConfig(jobs=1))
    config = base.replace(open=OpenConfig(max_open_slides=1, open_workers=1))
    jobs = _jobs(tmp_path, 6)
    with anyio.fail_after(20):
        async with open_pipeline(config, backends=FakeBackends(config, read_delay=0.05)) as pipeline:
            taken = 0
            with pytest.raises(PipelineFull, match="full"):
                for job in jobs:
                    pipeline.submit_nowait(job)
                    taken += 1
                    await anyio.wait_all_tasks_blocked()
            assert 1 <= taken < len(jobs) and pipeline.submitted == taken
            async with pipeline.results() as results:
                await pipeline.close_input()
                statuses = [r.status async for r in results]
    assert statuses == ["done"] * taken


async def test_cancelled_caller_withdraws_a_slide_that_has_not_started(tmp_path: Path) -> None:
    """One slot, a slow first slide: a second caller cancelled while its slide waits is withdrawn — its slide is
    never opened and leaves no output; the first slide completes."""
    base = fake_config(tmp_path, max_open=1)
    config = base.replace(open=OpenConfig(max_open_slides=1, open_workers=1))
    backends = FakeBackends(config, patches_per_slide=12, read_delay=0.05)
    first, second = _jobs(tmp_path, 2)
    with anyio.fail_after(20):
        async with open_pipeline(config, backends=backends) as pipeline, anyio.create_task_group() as tg:
            results = []

            async def run_first() -> None:
                results.append(await pipeline.process(first))

            tg.start_soon(run_first)
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.1):
                await pipeline.process(second)
    assert [r.status for r in results] == ["done"]
    assert [h.info.path for h in backends.slides.opened] == [str(first.path)]
    assert not (tmp_path / "patches" / "s1.h5").exists()
    assert pipeline.statistics().totals.by_status == {"done": 1, "cancelled": 1}


async def test_cancelled_caller_of_a_started_slide_lets_it_finish(tmp_path: Path) -> None:
    """A caller cancelled after its slide started: the wait ends, the slide keeps going to a complete output."""
    config = fake_config(tmp_path)
    backends = FakeBackends(config, patches_per_slide=12, read_delay=0.05)
    [job] = _jobs(tmp_path, 1)
    with anyio.fail_after(20):
        async with open_pipeline(config, backends=backends) as pipeline:
            with anyio.move_on_after(0.1):
                await pipeline.process(job)
            assert pipeline.book.in_flight == 1
    with h5py.File(tmp_path / "patches" / "s0.h5", "r") as f:
        assert f["features"]["a"].shape == (12, 3)


class NoWeights(FakeBackends):
    def make_encoders(self) -> EncoderGroup:
        raise WeightsError("weights for a not found")


async def test_startup_error_comes_out_as_itself(tmp_path: Path) -> None:
    """Missing weights at start-up: `open_pipeline` raises the WeightsError itself, never an ExceptionGroup, and
    leaves no output folder behind."""
    out = tmp_path / "out"
    config = fake_config(out)
    with anyio.fail_after(10), pytest.raises(WeightsError, match="weights for a"):
        async with open_pipeline(config, backends=NoWeights(config)):
            pass
    assert not out.exists()


async def test_body_exception_propagates_unchanged(tmp_path: Path) -> None:
    """An exception raised inside `async with open_pipeline(...)` comes out unchanged."""
    config = fake_config(tmp_path)
    with anyio.fail_after(10), pytest.raises(ValueError, match="the service's own bug"):
        async with open_pipeline(config, backends=FakeBackends(config)):
            raise ValueError("the service's own bug")


async def test_broken_device_wakes_waiting_callers_with_pipeline_closed(tmp_path: Path) -> None:
    """A device that breaks mid-run while request handlers (tasks outside the pipeline's scope, as in a web server)
    wait in `process()`: each gets `PipelineClosed` caused by the device error, and `open_pipeline` raises the device
    error itself."""
    config = fake_config(tmp_path)
    errors: list[BaseException] = []
    raised: list[BaseException] = []
    ready = anyio.Event()
    holder: list[Pipeline] = []

    async def lifespan() -> None:
        try:
            async with open_pipeline(config, backends=BrokenDeviceBackends(config)) as pipeline:
                holder.append(pipeline)
                ready.set()
                await anyio.sleep_forever()
        except RuntimeError as exc:
            raised.append(exc)

    async def request(job: SlideJob) -> None:
        try:
            await holder[0].process(job)
        except PipelineClosed as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan)
            await ready.wait()
            for job in _jobs(tmp_path, 3):
                tg.start_soon(request, job)
    assert [str(e) for e in raised] == ["CUDA error: device lost"]
    assert len(errors) == 3 and all("device lost" in str(e.__cause__) for e in errors)
    assert holder[0].statistics().state == "failed"


async def test_closed_pipeline_refuses_new_slides(tmp_path: Path) -> None:
    """After `close_input()`, `submit` and `process` raise `PipelineClosed`."""
    config = fake_config(tmp_path)
    with anyio.fail_after(10):
        async with open_pipeline(config, backends=FakeBackends(config)) as pipeline:
            await pipeline.close_input()
            with pytest.raises(PipelineClosed):
                await pipeline.submit(_jobs(tmp_path, 1)[0])
            with pytest.raises(PipelineClosed):
                await pipeline.process(_jobs(tmp_path, 1, "t")[0])


async def test_folder_of_sub_folders_raises_config_error_itself(tmp_path: Path) -> None:
    """A non-recursive root holding only sub-folders: `process_slides` raises ConfigError (pointing at --recursive),
    not an ExceptionGroup."""
    write_synthetic_slide(tmp_path / "root" / "sub" / "s.svs", width=1024, height=768)
    config = PipelineConfig(segment=SegmentConfig(segmenter="otsu", device="cpu"),
                            write=WriteConfig(output=tmp_path / "out"))
    with anyio.fail_after(10), pytest.raises(ConfigError, match="--recursive"):
        await process_slides([tmp_path / "root"], config)
    assert not (tmp_path / "out").exists()


async def test_host_thread_limiter_signals_and_logging_are_untouched(tmp_path: Path) -> None:
    """A real pipeline (otsu, color_stats, a synthetic slide) runs while the host holds every token of anyio's
    default thread limiter: it completes, so it never needed one; it installs no signal handler and no logging
    handler."""
    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536)
    config = PipelineConfig(segment=SegmentConfig(segmenter="otsu", device="cpu"),
                            encode=EncodeConfig(extractors=("color_stats",), device="cpu"),
                            write=WriteConfig(output=tmp_path / "out"))
    default = anyio.to_thread.current_default_thread_limiter()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root_handlers = list(logging.getLogger().handlers)
    saved = default.total_tokens
    default.total_tokens = 1
    try:
        async with default:
            with anyio.fail_after(120):
                async with open_pipeline(config) as pipeline:
                    result = await pipeline.process(slide)
                    assert {s: signal.getsignal(s) for s in handlers} == handlers
            assert default.borrowed_tokens == 1
    finally:
        default.total_tokens = saved
    assert result.status == "done" and result.num_patches
    assert logging.getLogger().handlers == root_handlers


def test_blocking_process_from_several_threads(tmp_path: Path) -> None:
    """The blocking twin: four threads call `process()` on one `sync.open_pipeline`; each gets its own result."""
    config = fake_config(tmp_path)
    jobs = _jobs(tmp_path, 4)
    results: dict[int, str] = {}
    with sync.open_pipeline(config, backends=FakeBackends(config)) as pipeline:
        threads = [threading.Thread(target=lambda j=j: results.__setitem__(j.slide_id, pipeline.process(j).job.stem))
                   for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        stats = pipeline.statistics()
    assert results == {j.slide_id: j.stem for j in jobs}
    assert stats.totals.by_status == {"done": 4}
