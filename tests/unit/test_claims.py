"""Lock files (upstream §2.7, plus stale-lock takeover)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlaspatch_stream import outputs
from atlaspatch_stream.sources import claims


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (so no process has it, barring reuse)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(path: Path, pid: int, host: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"pid={pid},time=1700000000,slide=/x/s.svs,host={host}", encoding="utf-8")



# -- locks ----------------------------------------------------------------------------------------------------------


def test_lock_is_exclusive_and_carries_payload(tmp_path: Path) -> None:
    """The first acquire creates the file with pid/time/slide/host; a second acquire (this live pid) gets None."""
    path = outputs.lock_path(tmp_path, "s")
    lock = claims.acquire_lock(path, "/data/s.svs", phase="features")
    assert lock is not None
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"pid={os.getpid()},time=")
    fields = dict(part.split("=", 1) for part in text.split(","))
    assert fields["slide"] == "/data/s.svs"
    assert fields["phase"] == "features"
    assert fields["host"] == claims.HOST
    assert abs(int(fields["time"]) - __import__("time").time()) < 60
    assert claims.acquire_lock(path, "/data/s.svs") is None
    lock.release()
    assert not path.exists()
    lock.release()  # idempotent
    again = claims.acquire_lock(path, "/data/s.svs")
    assert again is not None
    again.release()


def test_stale_lock_of_dead_pid_on_this_host_is_taken_over(tmp_path: Path) -> None:
    """A lock left by a reaped child on this host is stale: acquire replaces it with our own payload."""
    path = outputs.lock_path(tmp_path, "s")
    _write_lock(path, _dead_pid(), claims.HOST)
    assert claims.lock_is_stale(path)
    lock = claims.acquire_lock(path, "/x/s.svs")
    assert lock is not None
    assert path.read_text(encoding="utf-8").startswith(f"pid={os.getpid()},")
    lock.release()


def test_live_foreign_pid_is_respected(tmp_path: Path) -> None:
    """A lock held by a running process (a sleeping child) is not stale and is not taken."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = outputs.lock_path(tmp_path, "s")
        _write_lock(path, child.pid, claims.HOST)
        assert not claims.lock_is_stale(path)
        assert claims.acquire_lock(path, "/x/s.svs") is None
        assert f"pid={child.pid}," in path.read_text(encoding="utf-8")
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "payload",
    [
        "pid={dead},time=1,slide=/x/s.svs,host=some-other-host",  # dead here, but maybe alive there
        "pid={dead},time=1,slide=/x/s.svs",  # an upstream lock: no host, liveness unknowable
        "garbage",
    ],
)
def test_locks_we_cannot_judge_are_respected(tmp_path: Path, payload: str) -> None:
    """Other hosts' locks, upstream's host-less locks and unreadable payloads are never taken over."""
    path = outputs.lock_path(tmp_path, "s")
    path.parent.mkdir(parents=True)
    path.write_text(payload.format(dead=_dead_pid()), encoding="utf-8")
    assert not claims.lock_is_stale(path)
    assert claims.acquire_lock(path, "/x/s.svs") is None
