"""`atlaspatch watch` end to end, as an operator meets it: the real pipeline (otsu, color_stats) over real and
synthetic slides, in a subprocess, killed, stopped, doubled, starved of disk, watched over sockets."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import orjson
import pytest

from atlaspatch_stream.config import WatchConfig
from atlaspatch_stream.daemon.ledger.status import read_status
from atlaspatch_stream.daemon.ledger.store import LEDGER_FILE, LedgerError
from atlaspatch_stream.testing.synthetic import write_synthetic_slide
from tests.conftest import SHARED_SLIDES
from tests.helpers import leftovers, mounted_tmpfs

CLI = [sys.executable, "-c", "from atlaspatch_stream.cli import main; main()"]
FAST = {"HF_HUB_OFFLINE": "1", "ATLASPATCH_WATCH__BACKOFF_BASE_S": "0.2", "ATLASPATCH_WATCH__BACKOFF_MAX_S": "0.5",
        "ATLASPATCH_WATCH__PROBE_S": "0.3", "ATLASPATCH_WATCH__STATUS_INTERVAL_S": "0.2"}


def _flags(out: Path, *extra: str, state: Path | None = None) -> list[str]:
    return ["-o", str(out), "--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
            "--feature-extractors", "color_stats", "--settle-s", "0.3", "--rescan-s", "0.5", "--watch-mode", "poll",
            "--allow-root", *(["--state", str(state)] if state else []), *extra]


def _env(**more: str) -> dict[str, str]:
    return {**os.environ, **FAST, **more}


def _start(folder: Path, out: Path, *extra: str, state: Path | None = None, env: dict[str, str] | None = None,
           stderr: int | None = subprocess.PIPE, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "watch", str(folder), *_flags(out, *extra, state=state)], env=env or _env(),
                            stdout=subprocess.PIPE, stderr=stderr, text=True, **popen)


def _once(folder: Path, out: Path, *extra: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "watch", str(folder), *_flags(out, "--once", *extra, state=state)], env=_env(),
                          capture_output=True, text=True, timeout=300)


def _state(out: Path) -> Path:
    """The default state folder of a daemon writing to `out` (under the test's $XDG_STATE_HOME)."""
    return WatchConfig().state_path(out)


def _counts(out: Path, state: Path | None = None) -> dict[str, int]:
    """Slides per state, read-only ({} while the daemon is still creating its ledger)."""
    ledger = (state or _state(out)) / LEDGER_FILE
    try:
        return read_status(ledger).counts
    except LedgerError:
        return {}


def _wait(condition: Callable[[], bool], timeout: float, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited early ({proc.returncode}): {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _started(out: Path) -> bool:
    """Whether a slide has started in the pipeline: its lock (taken once the slide is admitted) or its H5 is there.

    A `running` row in the ledger is not enough: the watcher marks a slide `running` when it hands it over, and a
    slide handed over but not yet admitted rightly goes back to `ready` on SIGTERM."""
    patches = out / "patches"
    return patches.exists() and any(p.suffix in (".lock", ".h5") for p in patches.iterdir())


def _complete(out: Path) -> dict[str, int]:
    found = {}
    for path in sorted((out / "patches").glob("*.h5")):
        with h5py.File(path, "r") as f:
            n = int(f.attrs["num_patches"])
            assert f["coords"].shape == (n, 5) and f["features/color_stats"].shape == (n, 90), path
        found[path.stem] = n
    return found


def _max_attempts(state: Path) -> int:
    """The most attempts charged to any slide in the ledger."""
    with contextlib.closing(sqlite3.connect(f"file:{state / LEDGER_FILE}?mode=ro", uri=True)) as db:
        return int(db.execute("select max(attempts) from slides").fetchone()[0])


def _report(out: Path) -> list[dict]:
    path = out / "atlaspatch-report.jsonl"
    if not path.exists():
        return []
    complete = path.read_bytes().split(b"\n")[:-1]  # a line still being written (the run goes on) has no newline yet
    return [orjson.loads(line) for line in complete if line.strip()]


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    for i in range(6):
        write_synthetic_slide(folder / f"s{i}.svs", width=2048, height=1536, seed=i)
    return folder


def test_kill_9_at_random_moments_loses_nothing_and_charges_nothing(tmp_path: Path) -> None:
    """Real slides (Aperio SVS, NDPI, a DICOM series) and synthetic ones; the daemon is killed with SIGKILL at 10
    random moments, then run to the end: no H5 looks complete but isn't, the next start sweeps every orphan temp
    file, and every slide ends `done` with no attempt charged for the kills."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip("../shared/slides not available")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        shutil.copy(SHARED_SLIDES / "aperio" / "CMU-1-Small-Region.svs", folder / f"cmu{i}.svs")
    shutil.copy(SHARED_SLIDES / "hamamatsu" / "test3-DAPI-2-387.ndpi", folder / "ndpi.ndpi")
    shutil.copytree(SHARED_SLIDES / "dicom" / "boxes", folder / "dicom_series")
    for i in range(4):
        write_synthetic_slide(folder / f"syn{i}.svs", width=3072, height=2048, seed=i)
    out = tmp_path / "out"
    rng = random.Random(7)
    for _ in range(10):
        proc = _start(folder, out, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))
        proc.kill()
        proc.wait()
        for name in _complete(out):  # whatever exists is complete
            assert name
    done = _once(folder, out)
    assert done.returncode == 0, done.stderr[-2000:]
    status = read_status(_state(out) / LEDGER_FILE)
    assert status.counts["done"] == 9 and sum(status.counts.values()) == 9
    assert all(r["attempts"] == 0 for r in status.to_json()["in_flight"] + status.to_json()["quarantined"])
    assert len(_complete(out)) == 9 and leftovers(out) == []
    assert _max_attempts(_state(out)) == 0


def test_two_daemons_share_the_work_and_take_over_a_dead_ones_claims(synthetic: Path, tmp_path: Path) -> None:
    """Two daemons on one input and one output (each with its own local ledger): every slide is processed exactly
    once (one `done` line in the shared run report per slide; the other daemon finds it locked, then done). Then
    one daemon is killed mid-slide: the other takes its stale claims over and finishes every slide."""
    out = tmp_path / "out"
    a = _start(synthetic, out, state=tmp_path / "state-a")
    b = _start(synthetic, out, state=tmp_path / "state-b")
    try:
        _wait(lambda: len(_complete(out)) == 6, 180, a)
        _wait(lambda: _counts(out, tmp_path / "state-a").get("done") == 6 ==
              _counts(out, tmp_path / "state-b").get("done"), 120, b)
    finally:
        for proc in (a, b):
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    done = [e["slide"] for e in _report(out) if e["event"] == "slide" and e["status"] == "done"]
    assert sorted(done) == sorted(str(p) for p in synthetic.iterdir())
    more = tmp_path / "more"
    for i in range(6):
        write_synthetic_slide(more / f"m{i}.svs", width=4096, height=3072, seed=10 + i)
    out2 = tmp_path / "out2"
    a = _start(more, out2, state=tmp_path / "state-c")
    _wait(lambda: (out2 / "patches").exists() and any(p.suffix == ".lock" for p in (out2 / "patches").iterdir()),
          120, a)
    a.kill()
    a.wait()
    assert leftovers(out2)  # the dead daemon's claims (and maybe temp files) are still there
    b = _start(more, out2, state=tmp_path / "state-d")
    try:
        _wait(lambda: len(_complete(out2)) == 6 and not leftovers(out2), 180, b)
    finally:
        b.send_signal(signal.SIGTERM)
        b.communicate(timeout=60)


def test_sigterm_drains_within_the_deadline_and_a_second_signal_cancels_at_once(tmp_path: Path) -> None:
    """First SIGTERM: intake stops, the slides in flight finish, exit 0 within the drain deadline, and the slides
    not started go back to `ready` (none charged). Second SIGTERM during a drain: exit 143 at once (well inside the
    60 s drain deadline; the bound allows for interpreter shutdown on a loaded machine), partial outputs removed."""
    folder = tmp_path / "in"
    for i in range(12):
        write_synthetic_slide(folder / f"s{i:02d}.svs", width=4096, height=3072, seed=i)
    out = tmp_path / "out"
    proc = _start(folder, out, "--max-open-slides", "2", "--drain-timeout", "60")
    _wait(lambda: _started(out), 120, proc)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.monotonic() - started < 60
    counts = _counts(out)
    assert counts["running"] == 0 and counts["done"] >= 1 and sum(counts.values()) == 12
    assert counts["failed"] == counts["quarantined"] == 0 and leftovers(out) == []
    assert _max_attempts(_state(out)) == 0
    # A large slide, so the drain the first signal starts is still going when the second lands (with the small
    # slides left over it could end within the 0.2 s, and then a late signal rightly changes nothing: exit 0).
    large = tmp_path / "large"
    write_synthetic_slide(large / "large.svs", width=12000, height=9000, seed=1, levels=(1, 4, 16))
    out = tmp_path / "out-large"
    proc = _start(large, out, "--max-open-slides", "2", "--drain-timeout", "60")
    _wait(lambda: _started(out), 120, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - started < 10
    assert leftovers(out) == [] and _counts(out)["running"] == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "3m") as where:
        yield where


def test_disk_full_defers_pauses_and_resumes(synthetic: Path, tmpfs: Path, tmp_path: Path) -> None:
    """Output on a full tmpfs: slides are `deferred` (never quarantined, no attempt charged), intake pauses (the
    status file says why); once space is freed the daemon's write probe resumes intake and every slide completes."""
    out = tmpfs / "out"
    state = tmp_path / "state"
    proc = _start(synthetic, out, "--max-attempts", "1", state=state)
    try:
        _wait(lambda: _counts(out, state).get("deferred", 0) >= 1, 120, proc)
        status = orjson.loads((state / "status.json").read_bytes())
        _wait(lambda: orjson.loads((state / "status.json").read_bytes())["paused_because"] is not None, 30, proc)
        assert _counts(out, state)["quarantined"] == 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
        _wait(lambda: _counts(out, state).get("done") == 6, 180, proc)
        status = orjson.loads((state / "status.json").read_bytes())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert len(_complete(out)) == 6 and status is not None
    assert _max_attempts(state) == 0


def test_a_corrupt_slide_ends_quarantined_with_its_error_in_status(synthetic: Path, tmp_path: Path) -> None:
    """A corrupt slide fails every attempt: after --max-attempts it is `quarantined` and `atlaspatch status` shows
    it with its error; the other slides are done. `status --requeue` gives it new attempts."""
    # a TIFF header whose first IFD claims 65535 tags: broken for good (random bytes there may instead look like a
    # directory still being written, and such a file waits to grow instead of failing)
    (synthetic / "corrupt.svs").write_bytes(b"II*\x00\x08\x00\x00\x00\xff\xff" + random.Random(0).randbytes(4094))
    out = tmp_path / "out"
    proc = _start(synthetic, out, "--max-attempts", "2")
    try:
        _wait(lambda: _counts(out).get("quarantined") == 1 and _counts(out).get("done") == 6, 180, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    text = subprocess.run([*CLI, "status", str(out)], capture_output=True, text=True, env=_env(), timeout=60)
    assert text.returncode == 0 and "1 quarantined" in text.stdout and "corrupt.svs (2 attempts)" in text.stdout
    data = orjson.loads(subprocess.run([*CLI, "status", str(out), "--json"], capture_output=True, text=True,
                                       env=_env(), timeout=60).stdout)
    assert [r["slide"] for r in data["quarantined"]] == ["corrupt.svs"] and data["quarantined"][0]["error"]
    again = subprocess.run([*CLI, "status", str(out), "--requeue", "corrupt.svs"], capture_output=True, text=True,
                           env=_env(), timeout=60)
    assert again.returncode == 0 and _counts(out)["quarantined"] == 0


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                if table.endswith("unix"):
                    if parts[5] == "01" and parts[3] == "00010000":  # SS_UNCONNECTED listening unix socket
                        inodes.add(parts[6])
                elif parts[3] == "0A":  # TCP_LISTEN
                    inodes.add(parts[9])
    return inodes


def _sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _get_metrics(sock: Path) -> bytes:
    """The daemon's raw HTTP answer to GET /metrics over its unix socket."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(sock))
    client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    client.close()
    return data


def _families(answer: bytes) -> dict[str, Any]:
    """The Prometheus families in an answer of `_get_metrics`."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(answer.partition(b"\r\n\r\n")[2].decode())}


def test_no_socket_without_metrics_and_loopback_or_unix_with_it(synthetic: Path, tmp_path: Path) -> None:
    """Without --metrics the daemon listens on nothing; with `--metrics unix:PATH` (or 127.0.0.1:PORT) it serves
    Prometheus text that parses, on that socket only; any other address is refused with one line."""
    out = tmp_path / "out"
    proc = _start(synthetic, out)
    try:
        _wait(lambda: _counts(out).get("done") == 6, 180, proc)
        assert not (_sockets_of(proc.pid) & _listening_inodes())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    sock = tmp_path / "metrics.sock"
    proc = _start(synthetic, tmp_path / "out2", "--metrics", f"unix:{sock}")
    try:
        _wait(lambda: sock.exists() and _counts(tmp_path / "out2").get("done") == 6, 180, proc)
        listening = _sockets_of(proc.pid) & _listening_inodes()
        assert len(listening) == 1
        data = _get_metrics(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    families = _families(data)
    assert "atlaspatch_slides_in_state" in families and "atlaspatch_build_info" in families
    assert str(synthetic) not in body.decode()
    refused = subprocess.run([*CLI, "watch", str(synthetic), *_flags(tmp_path / "out3", "--metrics", "0.0.0.0:9464")],
                             capture_output=True, text=True, env=_env(), timeout=60)
    assert refused.returncode == 2 and "0.0.0.0" in refused.stderr


def test_sd_notify_messages_arrive_in_order(synthetic: Path, tmp_path: Path) -> None:
    """Under systemd (NOTIFY_SOCKET): READY=1 once models are loaded and the first scan is done, STATUS= lines,
    WATCHDOG=1 at half of WATCHDOG_USEC, and STOPPING=1 on SIGTERM — in that order."""
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.settimeout(0.2)
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "watch", str(synthetic), *_flags(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(NOTIFY_SOCKET=str(address), WATCHDOG_USEC="400000"))
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while _counts(out).get("done") != 6 and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(listener.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any("STOPPING=1" in m for m in messages) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(listener.recv(4096).decode())
    finally:
        proc.communicate(timeout=60)
        listener.close()
    kinds = [m.splitlines()[0].split("=")[0] for m in messages]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING"
    assert "WATCHDOG" in kinds and "STATUS" in kinds and kinds.count("READY") == 1
    assert proc.returncode == 0


def test_filesystem_events_are_counted_in_the_metrics(tmp_path: Path) -> None:
    """In events mode, a slide copied in after start reaches the daemon as filesystem events, and
    atlaspatch_watch_events counts them (it stayed 0 while nothing copied the watcher's count to the board)."""
    folder, out, sock = tmp_path / "in", tmp_path / "out", tmp_path / "metrics.sock"
    folder.mkdir()
    proc = _start(folder, out, "--watch-mode", "events", "--metrics", f"unix:{sock}")
    try:
        _wait(sock.exists, 60, proc)
        write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536, seed=1)
        shutil.move(tmp_path / "s.svs", folder / "s.svs")
        _wait(lambda: _counts(out).get("done") == 1, 120, proc)
        _wait(lambda: _families(_get_metrics(sock))["atlaspatch_watch_events"].samples[0].value > 0, 30, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_pseudonymize_keeps_paths_out_of_outputs_logs_and_metrics(tmp_path: Path) -> None:
    """--pseudonymize: no slide path or file name in the H5s (attributes, passports), the run report, the logs or
    the metrics; the H5s are named by the keyed hash, created without group/other write permission."""
    folder = tmp_path / "in"
    slides = [write_synthetic_slide(folder / f"ACC-999{i}-PATIENT.svs", width=2048, height=1536, seed=i)
              for i in range(2)]
    out = tmp_path / "out"
    sock = tmp_path / "m.sock"
    proc = _start(folder, out, "--pseudonymize", "--metrics", f"unix:{sock}", "--log-format", "json",
                  preexec_fn=lambda: os.umask(0))  # even a permissive umask makes nothing group/other-writable
    try:
        _wait(lambda: _counts(out).get("done") == 2 and sock.exists(), 180, proc)
        metrics = _get_metrics(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, logs = proc.communicate(timeout=60)
    secrets = ("ACC-999", "PATIENT", *(str(p) for p in slides))  # the input folder itself is the operator's
    texts = {"logs": logs, "metrics": metrics.decode(), "report": (out / "atlaspatch-report.jsonl").read_text()}
    state = _state(out)
    for path in [*(out / "patches").glob("*.h5"), state / LEDGER_FILE, state / "status.json",
                 out / ".atlaspatch" / "pseudonym.key", out / "atlaspatch-report.jsonl"]:
        assert path.stat().st_mode & 0o022 == 0, path
    for path in (out / "patches").glob("*.h5"):
        assert all(s not in path.name for s in secrets)
        with h5py.File(path, "r") as f:
            texts[path.name] = repr(dict(f.attrs)) + repr(f["passports"][:5].tolist())
    assert len(list((out / "patches").glob("*.h5"))) == 2
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, (where, secret)


def test_default_state_is_local_per_output_and_a_held_one_is_refused(synthetic: Path, tmp_path: Path) -> None:
    """Without --state the ledger lives in a local folder per output ($XDG_STATE_HOME/atlaspatch/<hash>), never on
    the output; a second daemon on the same output with default settings is refused at once with one line naming
    the first one's host and pid (no shared ledger). Once the first has stopped, its state is taken again (nothing
    left to do)."""
    out = tmp_path / "out"
    first = _start(synthetic, out)
    try:
        _wait(lambda: _counts(out).get("done") == 6, 180, first)
        second = subprocess.run([*CLI, "watch", str(synthetic), *_flags(out, "--once")], capture_output=True,
                                text=True, env=_env(), timeout=120)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by a live daemon" in lines[0], second.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and str(_state(out)) in lines[0]
    assert _state(out).is_relative_to(tmp_path / "xdg-state" / "atlaspatch") and not (out / ".atlaspatch").exists()
    again = _once(synthetic, out)
    assert again.returncode == 0 and again.stdout.strip() == "watch --once: 0 done, 0 failed", again  # all done
    assert _counts(out)["done"] == 6


def test_once_right_after_a_copy_takes_the_slides_once_they_settle(tmp_path: Path) -> None:
    """`watch --once` started right after a copy (settle 6 s, longer than the daemon takes to start): the slides
    present at start are processed once they are quiet; one still being written is left, and the summary says so
    and why. Exit 0: nothing failed."""
    folder = tmp_path / "in"
    for i in range(3):
        write_synthetic_slide(folder / f"s{i}.svs", width=2048, height=1536, seed=i)
    growing = write_synthetic_slide(folder / "growing.svs", width=2048, height=1536, seed=9)
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.wait(0.2):
            with growing.open("ab") as handle:
                handle.write(b"\0" * 4096)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        done = _once(folder, tmp_path / "out", "--settle-s", "6")
    finally:
        stop.set()
        writer.join()
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("watch --once: 3 done, 0 failed; left 1 slide(s) that did not settle within 6 s: "
                              "growing.svs (still changing"), summary
    assert sorted(_complete(tmp_path / "out")) == ["s0", "s1", "s2"]
    counts = _counts(tmp_path / "out")
    assert (counts["done"], counts["seen"], sum(counts.values())) == (3, 1, 4)


def _stop_holding_a_lock(proc: subprocess.Popen[str], out: Path, timeout: float = 120.0) -> None:
    """SIGSTOP `proc` at a moment it holds a slide's lock and that slide's H5 is not complete yet (a stopped process
    is still a live holder; a slide whose H5 is already in place, its lock not yet released, would be reused by
    another worker without a wait)."""
    from atlaspatch_stream.outputs.claims import judge

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for lock in (out / "patches").glob("*.lock"):
            os.kill(proc.pid, signal.SIGSTOP)
            verdict = judge(lock)
            mine = verdict.state == "held" and verdict.holder is not None and verdict.holder.pid == proc.pid
            if mine and not lock.with_suffix(".h5").exists():
                return
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError("the first daemon never held a slide's lock")


def _lines_until(stream: Any, text: str) -> tuple[list[str], threading.Event]:
    """Collect `stream`'s lines in a thread; the event is set once a line contains `text`, or the stream ends (then
    the last line collected is "(stream closed)")."""
    lines: list[str] = []
    seen = threading.Event()

    def collect() -> None:
        for line in stream:
            lines.append(line)
            if text in line:
                seen.set()
        lines.append("(stream closed)\n")
        seen.set()

    threading.Thread(target=collect, daemon=True).start()
    return lines, seen


def test_two_once_daemons_on_one_output_wait_for_each_other_and_both_exit_0(tmp_path: Path) -> None:
    """Two `--once` daemons, each with its own --state, on one input and one output: each slide is processed
    exactly once; a slide the other daemon holds is waited for and, once its complete H5 is there, counts as done
    by another worker (not a failure): both ledgers end with every slide done, and both exit 0. The first daemon is
    paused (SIGSTOP) while it holds a slide's lock until the second says it waits for that slide, so the wait
    happens whatever the machine's load."""
    folder = tmp_path / "in"
    for i in range(6):
        write_synthetic_slide(folder / f"s{i}.svs", width=4096, height=3072, seed=i)
    out = tmp_path / "out"
    first = _start(folder, out, "--once", state=tmp_path / "state-a")
    try:
        _stop_holding_a_lock(first, out)  # maybe not the only lock it holds: the second waits for the first it meets
        second = _start(folder, out, "--once", state=tmp_path / "state-b")
        errors, waiting = _lines_until(second.stderr, ": locked by another live worker; waiting for it")
        assert waiting.wait(200) and errors[-1] != "(stream closed)\n", "".join(errors)[-2000:]
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_out, first_err = first.communicate(timeout=300)
    second_out = second.stdout.read() if second.stdout else ""
    assert first.returncode == 0, first_err[-2000:]
    assert second.wait(timeout=300) == 0, "".join(errors)[-2000:]
    for stdout in (first_out, second_out):
        assert stdout.strip().splitlines()[-1].startswith("watch --once: 6 done"), stdout
    assert " by another worker)" in second_out, second_out  # every slide the first held when it was paused
    for name in ("state-a", "state-b"):
        counts = _counts(out, tmp_path / name)
        assert counts["done"] == 6 and sum(counts.values()) == 6, counts
    done = [e["slide"] for e in _report(out) if e["event"] == "slide" and e["status"] == "done"]
    assert sorted(done) == sorted(str(p) for p in folder.iterdir())
    assert len(_complete(out)) == 6 and leftovers(out) == []
