"""Run control as a user meets it: interrupts, exit statuses, output-name collisions, reuse of someone else's file,
broken pipes, progress without a terminal, quiet third-party logs, and runs that fail before they start."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import h5py
import orjson
import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli, runner
from atlaspatch_stream.testing.synthetic import write_synthetic_slide
from tests.helpers import leftovers

PROCESS = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
           "--feature-extractors", "color_stats"]
CLI = [sys.executable, "-c", "from atlaspatch_stream.cli import main; main()"]


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small synthetic slides (a run of them takes seconds, long enough to interrupt)."""
    folder = tmp_path_factory.mktemp("forty")
    for i in range(40):
        write_synthetic_slide(folder / f"s{i:02d}.svs", width=2048, height=1536, seed=i)
    return folder


def _events(out: Path) -> list[dict]:
    path = out / "atlaspatch-report.jsonl"
    if not path.exists():
        return []
    complete = path.read_bytes().split(b"\n")[:-1]  # a line still being written has no newline yet
    return [orjson.loads(line) for line in complete if line.strip()]


def _start(folder: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*CLI, "process", str(folder), "-o", str(out), *PROCESS, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_first_slide(proc: subprocess.Popen[bytes], out: Path, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while not any(e["event"] == "slide" for e in _events(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no slide finished in time"
        time.sleep(0.05)


def _complete_h5s(out: Path) -> list[str]:
    """Names of H5s under out/patches, each checked to be complete (every row of its feature set)."""
    names = []
    for path in sorted((out / "patches").glob("*.h5")):
        with h5py.File(path, "r") as f:
            assert f["features"]["color_stats"].shape[0] == f["coords"].shape[0] == f.attrs["num_patches"]
        names.append(path.stem)
    return names


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_stops_intake_and_drains(forty: Path, tmp_path: Path, sig: signal.Signals, code: int) -> None:
    """40 slides, two open at a time; one signal once the first slide is done: no new slide starts, the ones in
    flight finish, the rest are reported `cancelled` (summary line and run report), and the exit status is 130 for
    SIGINT, 143 for SIGTERM — never 0."""
    out = tmp_path / "out"
    proc = _start(forty, out, "--max-open-slides", "2")
    _wait_for_first_slide(proc, out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr.decode()
    slides = [e for e in _events(out) if e["event"] == "slide"]
    statuses = [e["status"] for e in slides]
    assert len(slides) == 40 and set(statuses) <= {"done", "cancelled"}
    assert 1 <= statuses.count("done") < 40
    assert all(e["message"].startswith(("not started: interrupted by", "interrupted before"))
               for e in slides if e["status"] == "cancelled")
    run_end = [e for e in _events(out) if e["event"] == "run_end"][-1]
    assert run_end["status"] == "interrupted" and run_end["reason"] == f"interrupted by {sig.name}"
    assert run_end["by_status"]["cancelled"] == statuses.count("cancelled")
    text = stdout.decode()
    assert f"Completed {statuses.count('done')} slide(s)" in text
    assert f"{statuses.count('cancelled')} slide(s) cancelled" in text
    assert leftovers(out) == [] and len(_complete_h5s(out)) == statuses.count("done")


def test_second_signal_cancels_at_once(forty: Path, tmp_path: Path) -> None:
    """Two SIGINTs: the run stops within seconds with 130, partial outputs removed, locks released, and every H5
    left behind complete."""
    out = tmp_path / "out"
    proc = _start(forty, out, "--max-open-slides", "4")
    _wait_for_first_slide(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - started < 20
    assert leftovers(out) == []
    _complete_h5s(out)
    assert [e for e in _events(out) if e["event"] == "run_end"][-1]["status"] == "interrupted"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_drain_changes_nothing(forty: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """One signal stops the run; a second lands just after the drain has finished (run_end written, the summary
    about to be printed): the process still exits 130 (143 for SIGTERM) with its summary line, never by the
    signal. (Before, the second signal met no handler and killed it in most tries.)"""
    out = tmp_path / "out"
    proc = _start(forty, out, "--max-open-slides", "2")
    _wait_for_first_slide(proc, out)
    proc.send_signal(sig)
    end = time.monotonic() + 60
    while not any(e["event"] == "run_end" for e in _events(out)) and time.monotonic() < end:
        time.sleep(0.002)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    assert b"Stopped early (interrupted by" in stdout


def test_output_name_collision_fails_the_second_slide(tmp_path: Path) -> None:
    """a/x.svs and b/x.tif would both write patches/x.h5: the first keeps the name, the second gets one [FAIL] line
    naming both paths and suggesting separate --output folders; exit 1."""
    folder = tmp_path / "in"
    write_synthetic_slide(folder / "a" / "x.svs", width=1024, height=768, seed=1)
    write_synthetic_slide(folder / "b" / "x.tif", width=1024, height=768, seed=2)
    result = CliRunner().invoke(cli, ["process", str(folder), "-o", str(tmp_path / "out"), "--recursive", *PROCESS])
    assert result.exit_code == 1
    fails = [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")]
    assert len(fails) == 1
    assert str(folder / "b" / "x.tif") in fails[0] and str(folder / "a" / "x.svs") in fails[0]
    assert "--output" in fails[0]
    assert "Completed 1 slide(s), failures: 1" in result.stdout


def test_reuse_refuses_an_output_made_from_another_slide(tmp_path: Path) -> None:
    """An existing patches/<stem>.h5 is skipped or extended only when it was made from this slide: a slide of another
    size under the same name, or another file name with the same stem, fails with a clear line (never a silent
    skip), and the existing file is left as it was."""
    out = tmp_path / "out"
    slide = write_synthetic_slide(tmp_path / "in" / "x.svs", width=1024, height=768, seed=1)
    assert CliRunner().invoke(cli, ["process", str(slide), "-o", str(out), *PROCESS]).exit_code == 0
    h5 = out / "patches" / "x.h5"
    before = h5.stat().st_mtime_ns
    write_synthetic_slide(slide, width=1536, height=768, seed=1)
    result = CliRunner().invoke(cli, ["process", str(slide), "-o", str(out), *PROCESS])
    assert result.exit_code == 1
    assert "was not made from this slide" in result.stderr and "1024x768" in result.stderr
    assert "--force" in result.stderr
    other = write_synthetic_slide(tmp_path / "in2" / "x.tif", width=1024, height=768, seed=1)
    result = CliRunner().invoke(cli, ["process", str(other), "-o", str(out), *PROCESS])
    assert result.exit_code == 1 and "made from 'x.svs'" in result.stderr
    assert h5.stat().st_mtime_ns == before


def test_closed_pipes_never_fail_a_slide(tmp_path: Path) -> None:
    """`atlaspatch process … -v | head` with both stdout and stderr closed by the reader: every slide is done, the
    run exits 0, and no slide is failed by a BrokenPipeError."""
    folder = tmp_path / "in"
    for i in range(3):
        write_synthetic_slide(folder / f"s{i}.svs", width=1024, height=768, seed=i)
    out = tmp_path / "out"
    read_out, write_out = os.pipe()
    os.close(read_out)  # the reader is gone before the first line
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*CLI, "process", str(folder), "-o", str(out), *PROCESS, "-v"], env=env,
                          stdout=write_out, stderr=write_out, timeout=300)
    os.close(write_out)
    assert proc.returncode == 0
    slides = [e for e in _events(out) if e["event"] == "slide"]
    assert [e["status"] for e in slides] == ["done"] * 3
    assert _complete_h5s(out) == ["s0", "s1", "s2"]


def test_progress_without_a_terminal_is_plain_and_sparse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr not a terminal: no bar; at most one plain line per interval (done/total, patches/s, failures), then
    the summary. With the interval at 0 every slide prints its line; at 10 s a short run prints none."""
    folder = tmp_path / "in"
    for i in range(2):
        write_synthetic_slide(folder / f"s{i}.svs", width=1024, height=768, seed=i)
    result = CliRunner().invoke(cli, ["process", str(folder), "-o", str(tmp_path / "a"), *PROCESS])
    assert result.exit_code == 0
    assert "slides," not in result.stderr and "\r" not in result.stderr
    monkeypatch.setattr(runner, "PLAIN_PROGRESS_EVERY_S", 0.0)
    result = CliRunner().invoke(cli, ["process", str(folder), "-o", str(tmp_path / "b"), *PROCESS])
    lines = [line for line in result.stderr.splitlines() if line.startswith("Processing slides:")]
    assert [line.split(":")[1].split(",")[0].strip() for line in lines] == ["1/2 slides", "2/2 slides"]
    assert all("patches/s" in line and line.endswith("0 failed") for line in lines)


def test_fail_line_on_a_terminal_starts_its_own_line(tmp_path: Path) -> None:
    """On a terminal (a pty), the [FAIL] line of a broken slide is written above the progress bar, never glued to
    it."""
    folder = tmp_path / "in"
    write_synthetic_slide(folder / "good.svs", width=1024, height=768, seed=1)
    broken = folder / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*CLI, "process", str(folder), "-o", str(tmp_path / "out"), *PROCESS], env=env,
                            stdout=subprocess.DEVNULL, stderr=secondary)
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(primary)
    at = seen.find(b"[FAIL]")
    assert at > 0 and b"broken.svs" in seen[at:]
    assert seen[at - 1:at] in (b"\r", b"\n")
    assert b"Processing slides" in seen  # the bar was drawn


def test_verbose_shows_our_debug_lines_not_third_party_noise() -> None:
    """-v turns on DEBUG for atlaspatch_stream only (tifffile, numcodecs, zarr: warnings at most); without -v our
    warnings show and third-party libraries only report errors (a broken slide has its own [FAIL] line)."""
    progress = runner.Progress(1, "x")
    try:
        runner.setup_logging(True, progress)
        assert logging.getLogger("atlaspatch_stream.backends.readers").isEnabledFor(logging.DEBUG)
        for name in ("tifffile", "numcodecs", "zarr", "PIL", "h5py"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        runner.setup_logging(False, progress)
        assert not logging.getLogger("atlaspatch_stream").isEnabledFor(logging.INFO)
        assert logging.getLogger("atlaspatch_stream").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("tifffile").isEnabledFor(logging.WARNING)
    finally:
        progress.close()
        logging.getLogger().handlers.clear()


@pytest.mark.parametrize("case", ["unknown encoder", "no slides", "missing weights"])
def test_a_run_failing_before_it_starts_creates_nothing(tmp_path: Path, case: str) -> None:
    """Unknown encoder, no slides, missing weights: a one-line error, exit 1 or 2, and neither the output folder nor
    a run report is created."""
    folder = tmp_path / "in"
    folder.mkdir()
    if case != "no slides":
        write_synthetic_slide(folder / "s.svs", width=1024, height=768)
    encoder = {"unknown encoder": "no_such_encoder", "missing weights": "resnet50"}.get(case, "color_stats")
    args = [a if a != "color_stats" else encoder for a in PROCESS]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["process", str(folder), "-o", str(out), *args])
    assert result.exit_code in (1, 2)
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3, result.output
    assert not out.exists()


def test_encoders_check_lists_missing_extras_as_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a core install (the 'hf' extra's packages absent), `encoders --check` lists those names as
    `skip (needs extra 'hf')` and exits 0; `--strict` makes that an error."""
    from atlaspatch_stream.backends.encoders import registry

    modules, how = registry.EXTRAS["hf"]
    monkeypatch.setitem(registry.EXTRAS, "hf", (("package_that_is_not_installed",), how))
    names = ["resnet18", "phikon_v1"]
    assert registry.get_spec("phikon_v1").extra == "hf"
    result = CliRunner().invoke(cli, ["encoders", "--check", *names])
    assert result.exit_code == 0, result.output
    assert "skip phikon_v1" in result.output and "(needs extra 'hf')" in result.output
    assert any(line.startswith("ok   resnet18") for line in result.output.splitlines())
    assert CliRunner().invoke(cli, ["encoders", "--check", "--strict", *names]).exit_code == 1


def test_unknown_magnification_points_at_mpp_csv(tmp_path: Path) -> None:
    """A slide with neither objective power nor mpp fails with a line that names --mpp-csv."""
    slide = write_synthetic_slide(tmp_path / "nomag.svs", width=1024, height=768, mpp=None, objective_power=None)
    result = CliRunner().invoke(cli, ["process", str(slide), "-o", str(tmp_path / "out"), *PROCESS])
    assert result.exit_code == 1
    [fail] = [line for line in result.stderr.splitlines() if line.startswith("[FAIL]")]
    assert "nomag.svs" in fail and "--mpp-csv" in fail


def test_kill_9_leftovers_are_swept_by_the_next_run(forty: Path, tmp_path: Path) -> None:
    """`kill -9` while slides are being written leaves temporary H5s and lock files behind; the next run sweeps
    them at start (their process no longer exists) and completes every slide."""
    out = tmp_path / "out"
    proc = _start(forty, out, "--max-open-slides", "4")
    deadline = time.monotonic() + 120
    while not any(".tmp." in p.name for p in (out / "patches").glob(".*")) if (out / "patches").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert leftovers(out)
    again = subprocess.run([*CLI, "process", str(forty), "-o", str(out), *PROCESS], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert leftovers(out) == [] and len(_complete_h5s(out)) == 40


@pytest.mark.parametrize("error", [RuntimeError("CUDA driver too old"), ValueError("bad value")])
def test_an_engine_error_comes_out_alone(error: Exception, tmp_path: Path) -> None:
    """An engine that fails to open: its error leaves `run_with_signals` as itself (so it becomes one `Error:`
    line), never as an ExceptionGroup, and no report is written."""
    import signal
    from contextlib import asynccontextmanager

    import anyio

    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.report import RunReport
    from atlaspatch_stream.sources.job_list import JobList

    @asynccontextmanager
    async def failing_engine():  # type: ignore[no-untyped-def]
        raise error
        yield

    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with open(os.devnull, "w") as sink:
        progress = runner.Progress(0, "test", stream=sink)
        try:
            with pytest.raises(type(error)) as raised:
                anyio.run(runner.run_with_signals, load_config({}, environ={}), JobList([]), failing_engine(),
                          RunReport(tmp_path / "out", "test"), progress, runner.Signals())
        finally:
            progress.close()
            for sig, handler in kept.items():
                signal.signal(sig, handler)
    assert raised.value is error and not (tmp_path / "out").exists()
    with pytest.raises(Exception, match=r"the run stopped: .*(CUDA driver too old|bad value)"), \
            runner.one_line_errors("the run stopped"):
        raise raised.value
