"""Pure planning: stable shards of the output stem, SLURM array variables, big-first order, the order to steal in,
the Ray driver's dispatch rules and statistics merge, and the sbatch template."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from atlaspatch_stream.distributed.ray_engine import Dispatch, absolute, merge_worker_statistics
from atlaspatch_stream.items import SlideJob
from atlaspatch_stream.sources.shards import Shard, big_first, shard_of, split_shard, steal_order
from atlaspatch_stream.sources.slurm import TemplateOptions, resolve_shard, sbatch_script, shard_from_env
from tests.distributed.common import config

STEMS = [f"case-{i:03d}_HE" for i in range(60)] + ["ümlaut slide", "a.b.c", "TCGA-XX-0001-01Z-00-DX1"]


def _jobs(stems: list[str]) -> list[SlideJob]:
    return [SlideJob(i, Path(f"/mnt/slides/{s}.svs"), s) for i, s in enumerate(stems)]


def test_shards_are_stable_across_processes_and_listing_orders() -> None:
    """A second interpreter with another hash seed assigns every stem the same shard, and shuffling the listing
    (another machine's order) gives each shard the same slides."""
    code = ("import sys; from atlaspatch_stream.sources.shards import shard_of\n"
            "print(','.join(str(shard_of(s, 7)) for s in sys.argv[1:]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code, *STEMS], capture_output=True, text=True, env=env,
                           check=True, timeout=60).stdout.strip()
    assert other == ",".join(str(shard_of(s, 7)) for s in STEMS)
    jobs = _jobs(STEMS)
    shuffled = jobs[:]
    random.Random(3).shuffle(shuffled)
    for index in range(7):
        mine = {j.stem for j in split_shard(jobs, Shard(index, 7), {}).own}
        theirs = {j.stem for j in split_shard(shuffled, Shard(index, 7), {}).own}
        assert mine == theirs


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_cover_every_slide_exactly_once(count: int) -> None:
    """For N shards, every slide is in exactly one shard's own list, and every shard's thief list holds exactly the
    slides of the other shards."""
    jobs = _jobs(STEMS)
    owned: list[str] = []
    for index in range(count):
        plan = split_shard(jobs, Shard(index, count), {})
        owned += [j.stem for j in plan.own]
        assert sorted(j.stem for j in plan.others) == sorted(set(STEMS) - {j.stem for j in plan.own})
    assert sorted(owned) == sorted(STEMS)
    if count > 1:
        assert all(0 < sum(shard_of(s, count) == i for s in STEMS) < len(STEMS) for i in range(count))


def test_big_slides_first_and_thieves_start_at_the_small_end() -> None:
    """Within a shard slides go biggest first (ties by name); a thief visits the other shards round robin starting
    with the next one, taking each victim's smallest slide first."""
    jobs = _jobs(STEMS)
    sizes = {j.slide_id: (j.slide_id * 7919) % 1000 for j in jobs}
    plan = split_shard(jobs, Shard(1, 3), sizes)
    assert [sizes[j.slide_id] for j in plan.own] == sorted((sizes[j.slide_id] for j in plan.own), reverse=True)
    assert big_first(jobs[:3], {0: 5, 1: 5, 2: 9})[0].slide_id == 2
    order = steal_order(jobs, Shard(1, 3), sizes)
    assert shard_of(order[0].stem, 3) == 2 and shard_of(order[1].stem, 3) == 0
    for victim in (0, 2):
        theirs = [sizes[j.slide_id] for j in order if shard_of(j.stem, 3) == victim]
        assert theirs == sorted(theirs)


@pytest.mark.parametrize(("text", "needle"), [("3/2", "between 0 and 1"), ("2/2", "between 0 and 1"),
                                              ("0/0", "at least 1"), ("x", "expected I/N"), ("1/", "expected I/N"),
                                              ("-1/4", "expected I/N"), ("1/2/3", "expected I/N")])
def test_bad_shard_values_say_why(text: str, needle: str) -> None:
    """Malformed or out-of-range `--shard` values raise one line naming the value."""
    with pytest.raises(ValueError, match=needle) as info:
        Shard.parse(text)
    assert "\n" not in str(info.value)


def test_slurm_array_variables_are_read() -> None:
    """0-based arrays use the task id; arrays numbered from 1 or stepped use the task's rank; a list with gaps, or
    an id without its array, is an error; outside an array there is no shard."""
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(3, 8)
    one_based = {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1",
                 "SLURM_ARRAY_TASK_MAX": "8"}
    assert shard_from_env(one_based) == Shard(7, 8)
    stepped = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
               "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_STEP": "2"}
    assert shard_from_env(stepped) == Shard(2, 4)
    gaps = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
            "SLURM_ARRAY_TASK_MAX": "9"}
    with pytest.raises(ValueError, match="not contiguous"):
        shard_from_env(gaps)
    with pytest.raises(ValueError, match="pass --shard"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "4"})
    with pytest.raises(ValueError, match="between 0 and 3"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_the_flag_wins_over_the_environment() -> None:
    """With both set, `--shard` decides and says so; without it the array task's shard is taken."""
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert resolve_shard("1/2", env) == (Shard(1, 2), "--shard")
    assert resolve_shard(None, env) == (Shard(3, 8), "SLURM_ARRAY_TASK_ID=3")
    assert resolve_shard(None, {}) == (None, "")


async def test_dispatch_retries_a_slide_first_and_on_another_worker() -> None:
    """Two workers, three slides: a slide whose worker died goes first again, to the other worker (the dead one's
    next pick skips it); after max_attempts failures it is not queued again; a stop hands back what was pending;
    a worker that is gone gets nothing."""
    jobs = _jobs(["a", "b", "c"])
    with anyio.fail_after(5):
        dispatch = Dispatch(jobs, max_attempts=2, workers=[0, 1])
        dispatch.close()
        first = await dispatch.take(0)
        assert first is not None and first.job.stem == "a"
        assert dispatch.retry(first, 0) is True
        again = await dispatch.take(0)
        assert again is not None and again.job.stem == "b"
        retried = await dispatch.take(1)
        assert retried is first and retried.tries == 1
        assert dispatch.retry(retried, 1) is False
        dispatch.worker_gone(1)
        assert await dispatch.take(1) is None
        assert [a.job.stem for a in dispatch.stop("interrupted")] == ["c"]
        assert await dispatch.take(0) is None


async def test_dispatch_waits_while_slides_are_out() -> None:
    """A slot with nothing pending waits while another slot's slide is out (it may come back), takes it when its
    worker dies, and ends once everything is done."""
    jobs = _jobs(["only"])
    with anyio.fail_after(5):
        dispatch = Dispatch(jobs, max_attempts=3, workers=[0, 1])
        dispatch.close()
        out = await dispatch.take(0)
        assert out is not None
        got: list[object] = []

        async def second_slot() -> None:
            got.append(await dispatch.take(1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second_slot)
            await anyio.sleep(0.05)
            assert got == []
            dispatch.retry(out, 0)
        assert got == [out]
        dispatch.done(out)
        assert await dispatch.take(0) is None


def test_worker_statistics_are_summed() -> None:
    """run_end's worker totals add the workers' counts and statuses."""
    merged = merge_worker_statistics({"worker-0": {"finished": 3, "submitted": 3, "patches": 10,
                                                   "by_status": {"done": 2, "failed": 1}},
                                      "worker-1": {"finished": 5, "submitted": 5, "patches": 7,
                                                   "by_status": {"done": 5}}})
    assert merged == {"finished": 8, "submitted": 8, "patches": 17, "by_status": {"done": 7, "failed": 1}}


def test_sbatch_template_is_a_valid_array_script(tmp_path: Path) -> None:
    """The template requests the array, GPUs, CPUs and memory, runs `atlaspatch process --shard` on the array
    task, and is valid bash."""
    text = sbatch_script(TemplateOptions(input="/data/my slides", output="/data/out", tasks=32, max_running=8,
                                         gpus=2, cpus=16, mem="64G", partition="gpu", requeue=True,
                                         setup=("source /opt/venv/bin/activate",)))
    for line in ("#SBATCH --array=0-31%8", "#SBATCH --gres=gpu:2", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --mem=64G", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "source /opt/venv/bin/activate"):
        assert line in text.splitlines()
    assert "atlaspatch process '/data/my slides' -o /data/out" in text
    assert '--shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"' in text and "--steal" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    cpu = sbatch_script(TemplateOptions(input="in", output="out", gpus=0))
    assert "--gres" not in cpu and "--device cpu" in cpu


def test_settings_sent_to_workers_carry_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers run in folders of their own: a relative output folder or weights file becomes absolute (against the
    driver's folder) before it is sent; everything else is unchanged."""
    monkeypatch.chdir(tmp_path)
    cfg = config(Path("out"))
    cfg = type(cfg)(**{**cfg.__dict__, "encode": type(cfg.encode)(**{**cfg.encode.__dict__, "weights": (
        ("resnet18", Path("w/resnet18.pth")),)})})
    sent = absolute(cfg)
    assert sent.write.output == tmp_path / "out"
    assert sent.encode.weights == (("resnet18", tmp_path / "w" / "resnet18.pth"),)
    assert sent.plan == cfg.plan and sent.encode.extractors == cfg.encode.extractors
