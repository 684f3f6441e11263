"""Scaling out from the command line: `--shard`, `--steal`, `--stage-dir`, `--engine ray`, and `slurm-template`.

The flags only change which slides this process takes and what runs them (`runner.Scaling`); each node still runs
the ordinary pipeline. Bad values fail at once with one line, before any slide or output is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..config import PipelineConfig
from ..cpu import usable_cores
from ..errors import ConfigError, MissingExtraError
from ..items import SlideJob
from ..pipeline import Mode, running
from ..report import RunReport
from ..run import Engine, JobSource
from ..sources.job_list import JobList
from .options import Decorator, _apply
from .runner import Progress, execute, write_line

if TYPE_CHECKING:
    from ..sources.local_copy import CopyOptions, LocalCopier
    from ..sources.shard_source import ShardSource
    from ..sources.shards import Shard, ShardWork

SCALE_KEYS = ("shard", "steal", "stage_dir", "stage_max_gb", "engine", "ray_address", "workers", "max_attempts")
RAY_CONNECT_TIMEOUT_S = 5.0

SCALE_OPTIONS: list[Decorator] = [
    click.option("--shard", default=None, metavar="I/N",
                 help="Take shard I (0-based) of N: a stable hash of each output name. In a SLURM array job the "
                      "default comes from SLURM_ARRAY_TASK_ID (this flag wins; --shard 0/1 takes every slide)."),
    click.option("--steal", is_flag=True,
                 help="Once this shard's slides are done, take other shards' slides that nobody has claimed."),
    click.option("--stage-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Copy each slide to this (node-local) folder before reading it, and delete it after."),
    click.option("--stage-max-gb", type=click.FloatRange(min=0, min_open=True), default=None, show_default="20",
                 help="With --stage-dir: gigabytes of slides staged at once."),
    click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="local: this process; ray: worker actors on a Ray cluster (the [ray] extra)."),
    click.option("--ray-address", default=None, metavar="auto|HOST:PORT|local",
                 help="The Ray cluster: auto (RAY_ADDRESS or the cluster started on this node), HOST:PORT of its "
                      "head, or local (a private cluster on this machine) [auto]."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="With --engine ray: N CPU workers instead of one per GPU in the cluster."),
    click.option("--max-attempts", type=click.IntRange(min=1), default=None, show_default="3",
                 help="With --engine ray: tries per slide when workers die under it."),
]
scale_options = _apply(SCALE_OPTIONS)  # the scaling flags of a slide command


class BadFlag(click.ClickException):
    """A bad flag value: `Error: <one line>`, exit status 2 (a usage error)."""

    exit_code = 2


@dataclass(frozen=True)
class ScaleRequest:
    """The scaling flags, checked."""

    shard: Shard | None
    shard_source: str
    steal: bool
    stage: CopyOptions | None
    engine: str
    ray_address: str
    workers: int | None
    max_attempts: int


def pop_request(params: dict[str, Any]) -> ScaleRequest | None:
    """Take the scaling flags out of `params`; None when they change nothing (a plain local run).

    Raises:
        BadFlag: a malformed or contradictory value.
        click.ClickException: `--engine ray` without the extra, or a Ray address that cannot be reached.
    """
    from ..sources.local_copy import DEFAULT_STAGE_MAX_GB, CopyOptions
    from ..sources.slurm import resolve_shard

    p = {k: params.pop(k, None) for k in SCALE_KEYS}
    try:
        shard, source = resolve_shard(p["shard"], os.environ)
    except ValueError as exc:
        raise BadFlag(f"--shard {exc}" if p["shard"] is not None else f"SLURM array: {exc}") from None
    _check_combination(p)
    stage = CopyOptions(p["stage_dir"], p["stage_max_gb"] or DEFAULT_STAGE_MAX_GB) if p["stage_dir"] else None
    engine = p["engine"] or "local"
    if shard is None and not p["steal"] and stage is None and engine == "local":
        return None
    address = p["ray_address"] or "auto"
    if engine == "ray":
        _check_ray(address)
    return ScaleRequest(shard, source, bool(p["steal"]), stage, engine, address, p["workers"], p["max_attempts"] or 3)


def _check_combination(p: dict[str, Any]) -> None:
    if p["stage_max_gb"] is not None and p["stage_dir"] is None:
        raise BadFlag("--stage-max-gb needs --stage-dir")
    ray_only = [f"--{k.replace('_', '-')}" for k in ("ray_address", "workers", "max_attempts") if p[k] is not None]
    if (p["engine"] or "local") != "ray" and ray_only:
        raise BadFlag(f"{', '.join(ray_only)} needs --engine ray")
    if p["engine"] == "ray" and p["steal"]:
        raise BadFlag("--steal is for independent shard processes; --engine ray balances its workers itself")


def _check_ray(address: str) -> None:
    """The extra is installed and the cluster answers (before any slide is touched)."""
    from ..distributed.ray_engine import import_ray

    try:
        import_ray()
    except MissingExtraError as exc:
        raise click.ClickException(str(exc)) from None
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    if target in ("", "auto", "local") or "://" in target:
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadFlag(f"--ray-address {target}: expected auto, local or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise click.ClickException(f"--ray-address {target}: cannot reach the Ray cluster "
                                   f"({exc.strerror or exc})") from None


class Scaled:
    """`runner.Scaling` for a checked `ScaleRequest`: splits the shard, runs it locally or on Ray."""

    def __init__(self, request: ScaleRequest, config: PipelineConfig) -> None:
        self.request = request
        self.config = config
        self.work: ShardWork | None = None
        self.copier: LocalCopier | None = None
        self.shard: ShardSource | None = None

    def select(self, jobs: list[SlideJob]) -> list[SlideJob]:
        """This shard's slides, biggest first (the rest kept for stealing); one line says what was taken."""
        from ..sources.local_copy import slide_bytes
        from ..sources.shards import split_shard

        sizes = {j.slide_id: slide_bytes(j.path) for j in jobs}
        self.work = split_shard(jobs, self.request.shard, sizes)
        if self.request.shard is not None:
            tail = "; then unclaimed slides of other shards" if self.request.steal else ""
            hint = "" if self.request.shard_source == "--shard" else " (pass --shard 0/1 to take every slide)"
            write_line(f"Shard {self.request.shard} from {self.request.shard_source}: {len(self.work.own)} of "
                       f"{len(jobs)} slide(s){tail}{hint}", sys.stderr)
        return list(self.work.own)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Connected to Ray (`--engine ray`) or holding the staging folder (local), for the run."""
        if self.request.engine == "ray":
            with _ray_session(self.request):
                yield
            return
        if self.request.stage is None:
            yield
            return
        from ..sources.local_copy import LocalCopier

        try:
            copier = LocalCopier(self.request.stage)
        except OSError as exc:
            raise ConfigError(f"--stage-dir {self.request.stage.root}: cannot stage slides there "
                              f"({exc.strerror or exc})") from None
        with copier:
            self.copier = copier
            yield

    def source(self, jobs: list[SlideJob], progress: Progress) -> JobSource:
        """This shard's slides, then (with --steal) other shards' unclaimed ones; each copied first with --stage-dir.
        With --engine ray, the slides as they are (each worker copies its own)."""
        if self.request.engine == "ray":
            return JobList(jobs)
        from ..sources.shard_source import ShardSource

        assert self.work is not None, "select() splits the shard before the run"
        self.shard = ShardSource(self.work, self.config.write.output, self.config.write.skip_existing,
                                 steal=self.request.steal, copier=self.copier, on_steal=lambda _job: progress.extend(1))
        return self.shard

    def opening(self, config: PipelineConfig, mode: Mode, report: RunReport) -> AbstractAsyncContextManager[Engine]:
        """The local pipeline, or the Ray workers."""
        if self.request.engine != "ray":
            return running(config, None, mode, report, stop_on_output_failure=True)
        from ..distributed.ray_engine import RayEngine, RayOptions

        options = RayOptions(workers=self.request.workers, max_attempts=self.request.max_attempts,
                             stage=self.request.stage)
        return RayEngine(config, options=options, mode=mode, command=report.command).open(report)

    def finished(self) -> None:
        """After the run: how many slides were stolen."""
        if self.shard is not None and self.request.steal:
            write_line(f"Took {self.shard.stolen} slide(s) of other shards")


@contextlib.contextmanager
def _ray_session(request: ScaleRequest) -> Iterator[None]:
    """`ray.init` for the run (only the CLI connects; the library never starts a cluster), then `ray.shutdown`."""
    from ..distributed.ray_engine import import_ray

    ray = import_ray()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    if request.ray_address == "local":
        kwargs["num_cpus"] = max(usable_cores(), request.workers or 1)
    else:
        kwargs = {"address": request.ray_address, "logging_level": logging.WARNING}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray-address {request.ray_address}: {_first_line(exc)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_scaled_or_local(config: PipelineConfig, wsi_path: Path, params: dict[str, Any], mode: Mode,
                        command: str) -> int:
    """Run a slide command with its scaling flags (taken out of `params`); returns the exit status."""
    request = pop_request(params)
    scale = Scaled(request, config) if request is not None else None
    return execute(config, wsi_path, mode, command, params["verbose"], scale)


# -- atlaspatch slurm-template ---------------------------------------------------------------------------------------


@click.command("slurm-template")
@click.option("--input", "-i", "input_", default="/path/to/slides", show_default=True, help="Slide folder.")
@click.option("--output", "-o", default="/path/to/output", show_default=True, help="Output root (shared).")
@click.option("--tasks", type=click.IntRange(min=1), default=16, show_default=True, help="Array tasks = shards.")
@click.option("--max-running", type=click.IntRange(min=1), default=None, help="Tasks running at once (the %N).")
@click.option("--gpus", type=click.IntRange(min=0), default=1, show_default=True, help="GPUs per task (0: CPU).")
@click.option("--cpus", type=click.IntRange(min=1), default=8, show_default=True, help="CPUs per task.")
@click.option("--mem", default="32G", show_default=True, help="Memory per task.")
@click.option("--time", "time_", default="24:00:00", show_default=True, help="Time limit per task.")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--account", default=None, help="SLURM account.")
@click.option("--job-name", default="atlaspatch", show_default=True, help="Job name (and log file prefix).")
@click.option("--steal/--no-steal", default=True, show_default=True, help="Tasks take unclaimed slides when done.")
@click.option("--stage-dir", default="${TMPDIR:-/tmp}", show_default=True,
              help="Node-local folder to stage slides in (expanded on the node); '' to read slides in place.")
@click.option("--stage-max-gb", type=click.FloatRange(min=0, min_open=True), default=None, help="Staging budget.")
@click.option("--requeue", is_flag=True, help="Let SLURM requeue preempted tasks (#SBATCH --requeue).")
@click.option("--setup", multiple=True, help="A shell line run before the command (module load, a venv; repeatable).")
@click.argument("process_args", nargs=-1, type=click.UNPROCESSED)
def slurm_template(input_: str, process_args: tuple[str, ...], time_: str, **opts: Any) -> None:
    """Print a ready sbatch array script; arguments after `--` go to `atlaspatch process` inside it."""
    from ..sources.slurm import DEFAULT_PROCESS_ARGS, TemplateOptions, sbatch_script

    args = process_args or DEFAULT_PROCESS_ARGS
    _check_process_args(click.get_current_context(), args)
    try:
        template = TemplateOptions(input=input_, time=time_, process_args=tuple(args),
                                   stage_dir=opts.pop("stage_dir") or None, setup=tuple(opts.pop("setup")), **opts)
    except ValueError as exc:
        raise BadFlag(str(exc)) from None
    click.echo(sbatch_script(template), nl=False)


def _check_process_args(ctx: click.Context, args: tuple[str, ...]) -> None:
    """The command inside the script must parse: unknown or missing `process` flags fail here, not on the cluster."""
    assert ctx.parent is not None
    group = ctx.parent.command
    assert isinstance(group, click.Group)
    command = group.get_command(ctx.parent, "process")
    assert command is not None
    try:
        command.make_context("process", [".", "-o", "out", *args], parent=ctx.parent)
    except click.ClickException as exc:
        raise BadFlag(f"the process arguments after --: {exc.format_message()}") from None
