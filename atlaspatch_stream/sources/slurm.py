"""SLURM job arrays: the shard a task takes from its environment, and the `sbatch` script `slurm-template` prints.

SLURM sets `SLURM_ARRAY_TASK_ID` in every array task, with `SLURM_ARRAY_TASK_COUNT`, `_MIN`, `_MAX` and `_STEP`
describing the whole array (`--array=0-63%16`: ids 0..63, count 64). The shard is the task's rank among the array's
ids, so an array numbered from 1, or stepped (`1-31:2`), still covers every shard exactly once. A list with gaps
(`--array=1,4,9`) has no such rank: pass `--shard` explicitly there.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .shards import Shard

TASK_ID = "SLURM_ARRAY_TASK_ID"
TASK_COUNT = "SLURM_ARRAY_TASK_COUNT"
TASK_MIN = "SLURM_ARRAY_TASK_MIN"
TASK_MAX = "SLURM_ARRAY_TASK_MAX"
TASK_STEP = "SLURM_ARRAY_TASK_STEP"
DEFAULT_PROCESS_ARGS = ("--patch-size", "256", "--target-mag", "20", "--feature-extractors", "uni_v1")


def _int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{name}={text!r} is not a whole number")
    return int(text)


def shard_from_env(env: Mapping[str, str]) -> Shard | None:
    """The shard of this SLURM array task, or None outside an array.

    Raises:
        ValueError: the variables contradict each other, or describe a list with gaps (one line saying so).
    """
    task = _int(env, TASK_ID)
    if task is None:
        return None
    count, low, high, step = (_int(env, n) for n in (TASK_COUNT, TASK_MIN, TASK_MAX, TASK_STEP))
    if low is None or high is None:
        if count is None:
            raise ValueError(f"{TASK_ID} is set without {TASK_COUNT} or {TASK_MIN}/{TASK_MAX}: pass --shard I/N")
        return _shard(task, count, f"{TASK_ID}={task} with {TASK_COUNT}={count}")
    step = step or 1
    span = (high - low) // step + 1
    if count is not None and count != span:
        raise ValueError(f"the array ids {low}-{high}:{step} are not contiguous ({TASK_COUNT}={count}, not {span}): "
                         f"pass --shard I/N")
    if (task - low) % step:
        raise ValueError(f"{TASK_ID}={task} is not on the array's step {step} from {low}: pass --shard I/N")
    return _shard((task - low) // step, span, f"{TASK_ID}={task} in {low}-{high}")


def _shard(index: int, count: int, source: str) -> Shard:
    try:
        return Shard(index, count)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def resolve_shard(flag: str | None, env: Mapping[str, str]) -> tuple[Shard | None, str]:
    """The shard to take and where it came from: `--shard` when given (it wins), else the SLURM array variables.

    Raises:
        ValueError: a malformed or out-of-range value (one line).
    """
    if flag is not None:
        return Shard.parse(flag), "--shard"
    shard = shard_from_env(env)
    return shard, (f"{TASK_ID}={env.get(TASK_ID)}" if shard is not None else "")


@dataclass(frozen=True)
class TemplateOptions:
    """What `atlaspatch slurm-template` puts in the script."""

    input: str
    output: str
    tasks: int = 16
    max_running: int | None = None  # the `%N` of --array: how many tasks run at once
    gpus: int = 1
    cpus: int = 8
    mem: str = "32G"
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "atlaspatch"
    steal: bool = True
    stage_dir: str | None = "${TMPDIR:-/tmp}"
    stage_max_gb: float | None = None
    requeue: bool = False
    setup: Sequence[str] = ()  # lines run before the command (module load, source a venv)
    process_args: Sequence[str] = DEFAULT_PROCESS_ARGS

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.gpus < 0 or self.cpus < 1:
            raise ValueError("--tasks and --cpus must be at least 1, --gpus at least 0")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError("--max-running must be at least 1")


def sbatch_script(opts: TemplateOptions) -> str:
    """A ready `sbatch` array script: one array task per shard, each running `atlaspatch process --shard`."""
    array = f"0-{opts.tasks - 1}" + (f"%{opts.max_running}" if opts.max_running else "")
    lines = ["#!/bin/bash", "# atlaspatch-stream over a SLURM job array: every task takes one shard of the slides",
             "# (a stable hash of each output name), claims each slide before opening it, and with --steal takes",
             "# other shards' unclaimed slides once its own are done. Resubmitting the array is safe: finished slides",
             "# are skipped and claims of dead tasks are taken over. Submit with: sbatch <this file>",
             f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --array={array}", f"#SBATCH --cpus-per-task={opts.cpus}",
             f"#SBATCH --mem={opts.mem}", f"#SBATCH --time={opts.time}",
             f"#SBATCH --output={opts.job_name}-%A_%a.log"]
    optional = {f"--gres=gpu:{opts.gpus}": opts.gpus, f"--partition={opts.partition}": opts.partition,
                f"--account={opts.account}": opts.account, "--requeue": opts.requeue}
    lines += [f"#SBATCH {flag}" for flag, wanted in optional.items() if wanted]
    lines += ["", "set -euo pipefail", "# HDF5's own file locks are unreliable on NFS/Lustre; outputs are written to a",
              "# temporary name and renamed, and slides are claimed through lock files, so they are not needed.",
              "export HDF5_USE_FILE_LOCKING=FALSE", *opts.setup, ""]
    lines += ["atlaspatch process " + " \\\n    ".join(_command_args(opts))]
    return "\n".join(lines) + "\n"


def _command_args(opts: TemplateOptions) -> list[str]:
    """The arguments of the command inside the script, one group per line."""
    args = [f"{shlex.quote(opts.input)} -o {shlex.quote(opts.output)}",
            '--shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"']
    args += ["--steal"] if opts.steal else []
    if opts.stage_dir:
        stage = f'--stage-dir "{opts.stage_dir}"'  # double quotes: the shell expands $TMPDIR on the node
        args.append(stage + (f" --stage-max-gb {opts.stage_max_gb:g}" if opts.stage_max_gb else ""))
    args += [" ".join(shlex.quote(a) for a in opts.process_args)] if opts.process_args else []
    if "--device" not in opts.process_args:
        args.append(f"--device {'cuda' if opts.gpus else 'cpu'}")
    return args
