"""The Ray engine on a private local cluster (`num_cpus=2`): two CPU workers give a local run's H5s, a worker killed
with SIGKILL mid-run still leaves every slide done once, and the CLI drives a cluster by HOST:PORT and resumes
after its driver is killed. Skipped without the `[ray]` extra."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from atlaspatch_stream import api, sync
from atlaspatch_stream.distributed.ray_engine import RayEngine, RayOptions
from atlaspatch_stream.errors import WeightsError
from atlaspatch_stream.items import SlideResult
from tests.distributed.common import (
    CLI,
    COUNT,
    ENV,
    PROCESS,
    assert_same_outputs,
    config,
    events,
    slide_events,
)
from tests.helpers import leftovers

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One private local cluster for the module (what the CLI's `--ray-address local` starts); its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _run(engine: RayEngine, slides: Path, on_result=None, stop: api.Stop | None = None) -> api.RunSummary:
    jobs = api.make_jobs([slides], engine.config)
    return sync.run(lambda: engine.process_slides(jobs, stop=stop, on_result=on_result))


def _each_slide_once(out: Path, slides: Path, statuses: frozenset[str] = frozenset({"done"})) -> None:
    """The run report has one slide line per slide, each with one of `statuses` (`done` unless said), and a
    run_end."""
    lines = slide_events(out)
    assert sorted(e["slide"] for e in lines) == sorted(str(p) for p in slides.glob("*.svs"))
    assert {e["status"] for e in lines} <= statuses
    assert [e["event"] for e in events(out)][-1] == "run_end"


def test_two_workers_give_the_local_run_s_outputs(cluster: str, slides: Path, reference: Path,
                                                  tmp_path: Path) -> None:
    """8 slides on 2 CPU workers: every slide done, the H5s equal a local run's, the report lists each slide once,
    and run_end merges both workers' statistics."""
    out = tmp_path / "out"
    summary = _run(RayEngine(config(out), options=RayOptions(workers=2)), slides)
    assert summary.ok and summary.count("done") == COUNT
    assert_same_outputs(out, reference)
    _each_slide_once(out, slides)
    end = events(out)[-1]
    assert end["engine"] == "ray" and end["finished"] == COUNT and end["worker_totals"]["finished"] == COUNT
    assert sorted(end["workers"]) == ["worker-0", "worker-1"]
    assert all(w["finished"] > 0 for w in end["workers"].values())
    assert leftovers(out) == []


def test_a_worker_killed_mid_run_still_finishes_every_slide(cluster: str, slides: Path, reference: Path,
                                                             tmp_path: Path) -> None:
    """When the first slide is in, one worker with slides in flight is killed with SIGKILL: its slides are retried
    on the other worker (taking over the claims it left), Ray restarts it, every slide ends `done` exactly once in
    the report, the outputs equal a local run's, and no claim or temporary file is left. A slide whose H5 the
    killed worker had already moved into place (killed before it could report) is `skipped` on its retry: its
    complete output is reused, not computed again."""
    out = tmp_path / "out"
    killed: list[int] = []

    engine = RayEngine(config(out), options=RayOptions(workers=2))

    def kill_one(result: SlideResult) -> None:
        busy = [w for w in engine.workers if w.busy and w.pid]
        if not killed and busy:
            killed.append(busy[0].pid or 0)
            os.kill(busy[0].pid or 0, signal.SIGKILL)

    summary = _run(engine, slides, kill_one)
    statuses = Counter(f"{r.status} (attempt {r.attempts}): {r.message}" for r in summary.results)
    assert killed and summary.ok and summary.count("done", "skipped") == COUNT, statuses
    assert all(r.attempts > 1 for r in summary.results if r.status == "skipped")
    assert any(r.attempts > 1 for r in summary.results)
    assert engine.retried >= 1 and sum(w.restarts for w in engine.workers) == 1
    assert_same_outputs(out, reference)
    _each_slide_once(out, slides, frozenset({"done", "skipped"}))
    assert leftovers(out) == []


def test_a_worker_that_cannot_start_stops_the_run_before_any_slide(cluster: str, slides: Path,
                                                                   tmp_path: Path) -> None:
    """An encoder without weights (offline): the workers' own error comes out of the run, and no report or output is
    written."""
    out = tmp_path / "out"
    cfg = config(out)
    cfg = type(cfg)(**{**cfg.__dict__, "encode": type(cfg.encode)(**{**cfg.encode.__dict__,
                                                                     "extractors": ("resnet18",)})})
    with pytest.raises(WeightsError, match="resnet18"):
        _run(RayEngine(cfg, options=RayOptions(workers=1)), slides)
    assert not out.exists()


def test_a_stop_drains_the_slides_in_flight_and_cancels_the_rest(cluster: str, slides: Path,
                                                                 tmp_path: Path) -> None:
    """A stop requested when the first slide is in (the CLI's first Ctrl-C): the slides already sent finish, the
    others are `cancelled` ("not started"), every slide still has one result and one report line, the run ends
    `interrupted`, and no claim or temporary file is left."""
    out = tmp_path / "out"
    stop = api.Stop()
    engine = RayEngine(config(out), options=RayOptions(workers=1, in_flight=2))
    summary = _run(engine, slides, lambda result: stop.request("interrupted by SIGINT"), stop)
    assert summary.stop_reason == "interrupted by SIGINT" and not summary.ok
    statuses = Counter(r.status for r in summary.results)
    assert sum(statuses.values()) == COUNT and 1 <= statuses["done"] <= 3
    assert statuses["cancelled"] == COUNT - statuses["done"]
    assert all(r.message.startswith("not started") for r in summary.results if r.status == "cancelled")
    assert len(slide_events(out)) == COUNT and events(out)[-1]["status"] == "interrupted"
    assert leftovers(out) == []


def _wait_for_slides(proc: subprocess.Popen[str], out: Path, count: int, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while len(slide_events(out)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no slide finished in time"
        time.sleep(0.02)


def test_the_cli_drives_a_cluster_and_resumes_after_its_driver_is_killed(cluster: str, slides: Path,
                                                                          reference: Path, tmp_path: Path) -> None:
    """`process --engine ray --ray-address HOST:PORT --workers 2` is killed with SIGKILL after its first slide (its
    workers die with it); the same command again finishes: no slide is done twice over both runs, the outputs equal
    a local run's, and nothing is left behind. Exit status 0, as in local mode."""
    out = tmp_path / "out"
    args = [*CLI, "process", str(slides), "-o", str(out), *PROCESS, "--engine", "ray", "--ray-address", cluster,
            "--workers", "2"]
    env = {**ENV, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "")}  # the cluster's token auth, for its clients
    first = subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_slides(first, out, 1)
    first.kill()
    first.communicate()
    assert len(slide_events(out)) < COUNT  # the first run was cut short
    second = subprocess.run(args, env=env, text=True, capture_output=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    run = events(out)[-1]["run"]
    again = [e for e in slide_events(out) if e["run"] == run]
    assert len(again) == COUNT and {e["status"] for e in again} <= {"done", "skipped"}
    done = Counter(e["slide"] for e in slide_events(out) if e["status"] == "done")
    assert set(done.values()) == {1}
    assert_same_outputs(out, reference)
    assert leftovers(out) == []
