"""`atlaspatch process --shard` as SLURM array tasks use it: shards, duplicates and thieves on one shared output,
each slide processed exactly once; SLURM variables read; a `kill -9`ed shard's claims taken over."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.outputs.claims import DEFAULT_LEASE, Holder
from atlaspatch_stream.sources.shards import shard_of
from tests.distributed.common import CLI, COUNT, ENV, PROCESS, assert_same_outputs, events, slide_events
from tests.helpers import leftovers


def _start(slides: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "process", str(slides), "-o", str(out), *PROCESS, *extra], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stems(slides: Path, shard: int, count: int) -> set[str]:
    return {p.stem for p in slides.glob("*.svs") if shard_of(p.stem, count) == shard}


def test_shards_and_a_duplicate_task_process_every_slide_exactly_once(slides: Path, reference: Path,
                                                                      tmp_path: Path) -> None:
    """Shards 0/3 and 1/3, and shard 2/3 started twice (a resubmitted array task), all at once on one output: every
    slide is `done` exactly once over the four runs, the duplicate finds each of its slides locked or done, and the
    H5s equal the single-process run's (coordinates and features)."""
    out = tmp_path / "out"
    procs = [_start(slides, out, "--shard", shard) for shard in ("0/3", "1/3", "2/3", "2/3")]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    done = Counter(Path(e["slide"]).stem for e in slide_events(out) if e["status"] == "done")
    assert sorted(done) == sorted(p.stem for p in slides.glob("*.svs")) and set(done.values()) == {1}
    runs = {e["run"] for e in events(out) if e["event"] == "run_start"}
    assert len(runs) == 4
    by_run = Counter(e["run"] for e in slide_events(out))
    assert sorted(by_run.values()) == sorted([len(_stems(slides, i, 3)) for i in (0, 1, 2, 2)])
    duplicates = [e for e in slide_events(out) if Path(e["slide"]).stem in _stems(slides, 2, 3)]
    assert Counter(e["status"] for e in duplicates)["done"] == len(_stems(slides, 2, 3))
    assert {e["status"] for e in duplicates} <= {"done", "locked", "skipped"}
    assert_same_outputs(out, reference)
    assert leftovers(out) == []


def test_the_slurm_array_variables_pick_the_shard_and_the_flag_wins(slides: Path, tmp_path: Path) -> None:
    """In array task 1 of 3 (SLURM's variables), `process` without `--shard` takes exactly shard 1/3 and says where
    the shard came from; with `--shard 0/1` as well, it takes every slide."""
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_ARRAY_TASK_MAX": "2"}
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["process", str(slides), "-o", str(out), *PROCESS], env=env)
    assert result.exit_code == 0, result.output
    assert "Shard 1/3 from SLURM_ARRAY_TASK_ID=1" in result.stderr
    assert {p.stem for p in (out / "patches").glob("*.h5")} == _stems(slides, 1, 3)
    every = tmp_path / "every"
    result = CliRunner().invoke(cli, ["process", str(slides), "-o", str(every), *PROCESS, "--shard", "0/1"], env=env)
    assert result.exit_code == 0 and len(list((every / "patches").glob("*.h5"))) == COUNT


def _wait_for_claims(proc: subprocess.Popen[str], out: Path, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while not list((out / "patches").glob("*.lock")) if (out / "patches").exists() else True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the shard process took no claim in time"
        time.sleep(0.005)


def test_a_killed_shard_s_claims_are_taken_over_by_a_thief(slides: Path, reference: Path, tmp_path: Path) -> None:
    """Shard 0/2 is killed with `kill -9` while it holds claims; shard 1/2 with `--steal` then does its own slides
    and every slide shard 0 left (taking over the dead claims: their process no longer runs on this host), so the
    output is complete, equals the single-process run's, and holds no claim or temporary file."""
    out = tmp_path / "out"
    victim = _start(slides, out, "--shard", "0/2", "--max-open-slides", "2")
    _wait_for_claims(victim, out)
    victim.kill()
    victim.communicate()
    left = {p.stem for p in (out / "patches").glob("*.lock")}
    assert left and left <= _stems(slides, 0, 2)
    finished_by_victim = {p.stem for p in (out / "patches").glob("*.h5")}
    result = CliRunner().invoke(cli, ["process", str(slides), "-o", str(out), *PROCESS, "--shard", "1/2", "--steal"])
    assert result.exit_code == 0, result.output
    stolen = _stems(slides, 0, 2) - finished_by_victim
    assert f"Took {len(stolen)} slide(s) of other shards" in result.stdout
    assert_same_outputs(out, reference)
    assert leftovers(out) == []


def test_another_node_s_claim_is_respected_until_its_heartbeat_expires(slides: Path, reference: Path,
                                                                       tmp_path: Path) -> None:
    """A claim of a holder on another node (as its shard process leaves it): while its heartbeat is fresh, a thief
    leaves that slide alone and finishes the rest; once the claim is older than the lease (judged on the file
    server's clock), the next thief takes it over and the output is complete."""
    out = tmp_path / "out"
    target = sorted(_stems(slides, 0, 2))[0]
    lock = out / "patches" / f"{target}.lock"
    lock.parent.mkdir(parents=True)
    holder = Holder(host="node-b", boot_id="b00t", pidns="pid:[1]", pid=4242, start="77",
                    slide=str(slides / f"{target}.svs"), purpose="process", time=time.time())
    lock.write_bytes(holder.to_bytes())
    args = ["process", str(slides), "-o", str(out), *PROCESS, "--shard", "1/2", "--steal"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert {p.stem for p in (out / "patches").glob("*.h5")} == {p.stem for p in slides.glob("*.svs")} - {target}
    assert lock.exists()
    expired = time.time() - DEFAULT_LEASE - 60
    os.utime(lock, (expired, expired))
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "Took 1 slide(s) of other shards" in second.stdout and "1 stale lock" in second.stderr
    assert_same_outputs(out, reference)
    assert leftovers(out) == []
