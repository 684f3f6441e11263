"""The scaling flags as a user meets them: bad values fail at once with one line and touch nothing; the SLURM
template and the workflow examples call flags that exist."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from tests.distributed.common import PROCESS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "slurm"


def _one_line_error(args: list[str], slides: Path, tmp_path: Path, env: dict[str, str] | None = None,
                    code: int = 2) -> str:
    """Run `process` with `args`; assert the exit status, a single output line, and no output folder."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["process", str(slides), "-o", str(out), *PROCESS, *args], env=env)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["--shard", "3/2"], "--shard 3/2: the shard index must be between 0 and 1"),
    (["--shard", "0/0"], "--shard 0/0: the shard count must be at least 1"),
    (["--shard", "two/4"], "expected I/N"),
    (["--stage-max-gb", "5"], "--stage-max-gb needs --stage-dir"),
    (["--workers", "2"], "--workers needs --engine ray"),
    (["--ray-address", "local", "--max-attempts", "2"], "--ray-address, --max-attempts needs --engine ray"),
    (["--engine", "ray", "--steal"], "--steal is for independent shard processes"),
])
def test_bad_scaling_flags_fail_at_once_with_one_line(args: list[str], needle: str, slides: Path,
                                                      tmp_path: Path) -> None:
    """Each bad value or combination: exit status 2, one line naming it, no output folder created."""
    assert needle in _one_line_error(args, slides, tmp_path)


def test_a_bad_slurm_array_environment_fails_with_one_line(slides: Path, tmp_path: Path) -> None:
    """An array task id outside its array (inconsistent SLURM variables) is named in one line."""
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert "SLURM array: SLURM_ARRAY_TASK_ID=5" in _one_line_error([], slides, tmp_path, env)


def test_engine_ray_without_the_extra(slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ray package, `--engine ray` says which extra to install, in one line, exit 1."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    line = _one_line_error(["--engine", "ray", "--workers", "2"], slides, tmp_path, code=1)
    assert "pip install 'atlaspatch-stream[ray]'" in line


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_ray_address(slides: Path, tmp_path: Path) -> None:
    """A HOST:PORT where no cluster listens fails in seconds with one line (Ray itself would retry for minutes);
    a malformed address is a usage error."""
    pytest.importorskip("ray")
    port = _closed_port()
    line = _one_line_error(["--engine", "ray", "--ray-address", f"127.0.0.1:{port}"], slides, tmp_path, code=1)
    assert f"--ray-address 127.0.0.1:{port}: cannot reach the Ray cluster" in line
    assert "expected auto, local or HOST:PORT" in _one_line_error(["--engine", "ray", "--ray-address", "headnode"],
                                                                  slides, tmp_path)


def test_slurm_template_prints_a_checked_script(tmp_path: Path) -> None:
    """`slurm-template` prints valid bash with the requested resources and the command line after `--`; a flag
    that `process` does not know fails here, in one line, not later on the cluster."""
    result = CliRunner().invoke(cli, ["slurm-template", "--tasks", "4", "--gpus", "0", "--cpus", "4", "--mem",
                                      "16G", "--", "--patch-size", "224", "--target-mag", "20",
                                      "--feature-extractors", "color_stats"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --array=0-3" in result.output and "#SBATCH --mem=16G" in result.output
    assert "--feature-extractors color_stats" in result.output and "--device cpu" in result.output
    script = tmp_path / "job.sbatch"
    script.write_text(result.output)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    bad = CliRunner().invoke(cli, ["slurm-template", "--", "--patch-size", "224", "--target-mag", "20",
                                   "--feature-extractors", "color_stats", "--bogus"])
    assert bad.exit_code == 2 and "No such option '--bogus'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_the_sbatch_example_is_what_the_template_prints() -> None:
    """examples/slurm/atlaspatch-array.sbatch is `slurm-template`'s output for the arguments in its header."""
    text = (EXAMPLES / "atlaspatch-array.sbatch").read_text()
    header = text.splitlines()[1]
    assert header.startswith("# made by: atlaspatch slurm-template ")
    args = shlex.split(header.removeprefix("# made by: atlaspatch "))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = text.splitlines()
    assert [lines[0], *lines[2:]] == result.output.splitlines()


def _process_flags() -> set[str]:
    command = cli.commands["process"]
    return {name for param in command.params for name in getattr(param, "opts", []) if name.startswith("-")}


@pytest.mark.parametrize("name", ["main.nf", "Snakefile", "atlaspatch-array.sbatch"])
def test_workflow_examples_call_shard_and_only_known_flags(name: str) -> None:
    """Every example runs `atlaspatch process --shard ... --steal`, and every flag it passes exists."""
    text = (EXAMPLES / name).read_text()
    start = text.rindex("atlaspatch process ")  # the command itself (comments may mention it before)
    command = re.split(r'"""|\n\s*\n', text[start:])[0]  # to the end of the script block or statement
    flags = set(re.findall(r"(?<![\w$-])(--[a-z][a-z0-9-]*)", command))
    assert {"--shard", "--steal", "--stage-dir"} <= flags
    known = _process_flags()
    assert flags - known == set(), f"{name} passes flags `process` does not know"


def test_a_stage_dir_that_cannot_be_made_fails_with_one_line(slides: Path, tmp_path: Path) -> None:
    """`--stage-dir` under a plain file: one line naming the folder, exit 1, no output."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(["--stage-dir", str(blocker / "stage")], slides, tmp_path, code=1)
    assert f"--stage-dir {blocker / 'stage'}: cannot stage slides there" in line


def test_the_scaling_modules_import_neither_ray_nor_torch() -> None:
    """The CLI and every `distributed` module import without ray (it is imported when the Ray engine runs) and
    without torch, so `atlaspatch --help` and SLURM shards stay light."""
    code = ("import sys\n"
            "import atlaspatch_stream.cli, atlaspatch_stream.distributed.ray_engine, atlaspatch_stream.sources.shards\n"
            "import atlaspatch_stream.sources.slurm, atlaspatch_stream.sources.local_copy\n"
            "print(','.join(m for m in ('ray', 'torch', 'h5py') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == ""
