"""The claim protocol (sources/claims.py): atomic publish, staleness, takeover, heartbeat and release, with real
processes where the property is about processes."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atlaspatch_stream import outputs
from atlaspatch_stream.errors import OutputError
from atlaspatch_stream.outputs import claims

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (so no process has it, barring reuse)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float) -> None:
    """Make `path` look `seconds` old (its mtime in the past)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _payload(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# -- publish --------------------------------------------------------------------------------------------------------


def test_claim_publishes_full_payload_and_is_exclusive(tmp_path: Path) -> None:
    """try_claim writes one JSON line naming host, boot id, pid, start time, slide and purpose; a second try by a
    live holder (us) gets None; release removes it; release is idempotent; no temporary file is ever left."""
    path = outputs.lock_path(tmp_path, "s")
    claim = claims.try_claim(path, slide="/data/s.svs", purpose="features")
    assert claim is not None and claim.held
    fields = _payload(path)
    assert fields["host"] == claims.HOST and fields["pid"] == os.getpid()
    assert fields["slide"] == "/data/s.svs" and fields["purpose"] == "features"
    assert fields["start"] == claims.process_start(os.getpid()) and "claim_id" in fields
    assert abs(float(fields["time"]) - time.time()) < 60  # type: ignore[arg-type]
    assert claims.try_claim(path, slide="/data/s.svs") is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.lock"]
    claim.release()
    claim.release()
    assert list(path.parent.iterdir()) == []
    again = claims.try_claim(path)
    assert again is not None
    again.release()


RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from atlaspatch_stream.outputs import claims
    lock, go, stop = (Path(a) for a in sys.argv[1:4])
    while not go.exists():
        time.sleep(0.001)
    claim = claims.try_claim(lock, slide="race")
    print("WON" if claim else "LOST", flush=True)
    while claim and not stop.exists():
        time.sleep(0.01)
    if claim:
        claim.release()
""")


@pytest.mark.parametrize("start", ["free", "stale"])
def test_many_processes_race_and_exactly_one_wins(tmp_path: Path, start: str) -> None:
    """Eight processes wait for a start signal and claim one lock at the same moment, the lock either absent or
    left by a dead process (so all race through the takeover rename): exactly one wins, the lock holds its payload,
    and no publish or takeover file is left behind."""
    lock = tmp_path / "s.lock"
    if start == "stale":
        lock.write_text(f"pid={_dead_pid()},time=1,slide=x,host={claims.HOST}", encoding="utf-8")
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(lock), str(go), str(stop)], env=_env(),
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        time.sleep(1.5)  # let every racer import and reach its polling loop
        go.touch()
        answers = []
        for proc in procs:
            assert proc.stdout is not None
            answers.append(proc.stdout.readline().strip())
        assert sorted(answers) == ["LOST"] * 7 + ["WON"]
        winner = procs[answers.index("WON")]
        assert _payload(lock)["pid"] == winner.pid
        assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "s.lock"]
    finally:
        stop.touch()
        for proc in procs:
            proc.wait(timeout=30)
    assert not lock.exists()  # the winner released it


def test_fallback_without_hard_links_still_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem whose link() answers EPERM (as some SMB mounts do), the claim falls back to an exclusive
    create: still exclusive, still carrying the full payload, no temporary file left."""
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(claims.os, "link", no_links)
    monkeypatch.setattr(claims, "_NO_LINK_DEVS", set())
    path = tmp_path / "s.lock"
    claim = claims.try_claim(path, slide="/x/s.svs")
    assert claim is not None
    assert _payload(path)["pid"] == os.getpid()
    assert claims.try_claim(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["s.lock"]
    claim.release()
    assert not path.exists()


def test_nfs_lost_link_reply_counts_as_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NFS may perform a LINK and then answer EEXIST to the retransmission: the temporary file then has two links,
    which the publisher takes as success."""
    real_link = os.link

    def link_then_eexist(src: str, dst: str) -> None:
        real_link(src, dst)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(claims.os, "link", link_then_eexist)
    claim = claims.try_claim(tmp_path / "s.lock")
    assert claim is not None and _payload(tmp_path / "s.lock")["pid"] == os.getpid()
    claim.release()


def test_full_disk_while_publishing_leaves_no_lock(tmp_path: Path) -> None:
    """On a full filesystem (a real 256 KiB tmpfs, filled) the payload cannot be written: try_claim raises
    OutputError(disk_full) and leaves neither a lock nor a temporary file, so no empty lock can block the slide."""
    mnt = _mount_tmpfs(tmp_path / "mnt", "256k")
    try:
        (mnt / "patches").mkdir()
        _fill(mnt / "filler")
        with pytest.raises(OutputError) as info:
            claims.try_claim(mnt / "patches" / "s.lock", slide="s")
        assert info.value.kind == "disk_full" and info.value.systemic
        assert "output disk full" in info.value.one_line()
        assert list((mnt / "patches").iterdir()) == []
    finally:
        _umount(mnt)


def _mount_tmpfs(where: Path, size: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return where


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True)


def _fill(path: Path) -> None:
    """Write zeros to `path` until its filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


# -- staleness ------------------------------------------------------------------------------------------------------


def test_lock_of_dead_pid_on_this_host_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock (older text payload) left by a reaped child on this host is stale at once: the claim replaces it and
    logs a warning naming the previous holder."""
    path = tmp_path / "s.lock"
    dead = _dead_pid()
    path.write_text(f"pid={dead},time=1700000000,slide=/x/s.svs,host={claims.HOST}", encoding="utf-8")
    assert claims.judge(path).state == "stale"
    with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
        claim = claims.try_claim(path, slide="/x/s.svs")
    assert claim is not None and _payload(path)["pid"] == os.getpid()
    assert any(f"pid {dead} on {claims.HOST}" in r.getMessage() and "no longer runs" in r.getMessage()
               for r in caplog.records)
    claim.release()


def test_live_holder_on_this_host_is_respected(tmp_path: Path) -> None:
    """A lock whose pid runs here with the recorded start time (a sleeping child) is held, however old."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "s.lock"
        holder = claims.Holder(host=claims.HOST, boot_id=claims.me().boot_id, pidns=claims.me().pidns,
                               pid=child.pid, start=claims.process_start(child.pid))
        path.write_bytes(holder.to_bytes())
        _age(path, 10 * claims.DEFAULT_LEASE)
        assert claims.judge(path).state == "held"
        assert claims.try_claim(path) is None
        assert _payload(path)["pid"] == child.pid
    finally:
        child.kill()
        child.wait()
    assert claims.judge(path).state == "stale"  # killed: stale at once


def test_reused_pid_and_reboot_make_a_lock_stale(tmp_path: Path) -> None:
    """Same host: a live pid with another start time (the pid was reused), or a lock from before a reboot (another
    boot id), is stale."""
    path = tmp_path / "s.lock"
    mine = claims.me()
    path.write_bytes(claims.Holder(host=mine.host, boot_id=mine.boot_id, pidns=mine.pidns, pid=os.getpid(),
                                   start="1").to_bytes())
    assert claims.judge(path).state == "stale" and "another process" in claims.judge(path).reason
    if mine.boot_id is None:
        pytest.skip("no boot id on this system")
    path.write_bytes(claims.Holder(host=mine.host, boot_id="0" * 36, pid=os.getpid(), start=mine.start).to_bytes())
    assert claims.judge(path).state == "stale" and "rebooted" in claims.judge(path).reason


def test_unreadable_lock_is_stale_only_after_the_grace_period(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An empty lock (a crash or a full disk mid-write, older versions) and a garbage one are respected while young,
    then taken over with a warning once older than the grace period (60 s by default): never locked for ever."""
    for content in (b"", b"garbage", b'{"pid": 12'):
        path = tmp_path / "s.lock"
        path.write_bytes(content)
        assert claims.try_claim(path) is None
        _age(path, claims.DEFAULT_GRACE + 5)
        with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
            claim = claims.try_claim(path)
        assert claim is not None, content
        assert any("unreadable lock" in r.getMessage() for r in caplog.records)
        claim.release()


def test_other_hosts_lock_is_judged_by_lease_on_the_server_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock from another host (or upstream's host-less one) is held while its mtime is within the lease, measured
    against a probe file's mtime, so a client clock an hour fast changes nothing; past the lease it is taken over."""
    path = tmp_path / "s.lock"
    real_time = time.time
    for text in (f"pid={_dead_pid()},time=1,slide=/x/s.svs,host=elsewhere",
                 f"pid={_dead_pid()},time=1,slide=/x/s.svs"):
        path.write_text(text, encoding="utf-8")
        monkeypatch.setattr(claims.time, "time", lambda: real_time() + 3600)
        assert claims.judge(path, lease=60).state == "held"
        monkeypatch.undo()
        assert claims.try_claim(path, lease=60) is None
        _age(path, 61)
        claim = claims.try_claim(path, lease=60)
        assert claim is not None
        claim.release()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from atlaspatch_stream.outputs import claims
    claims.HOST = "another-host"  # judged as a remote holder: only its heartbeat keeps the claim
    lock, stop_beating, check, lease = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    claim = claims.try_claim(lock, slide="s", lease=lease)
    print("HELD" if claim else "NOT", flush=True)
    while not stop_beating.exists():
        claim.heartbeat()
        time.sleep(lease / 3)
    print("STOPPED", flush=True)
    while not check.exists():  # alive, but no longer beating
        time.sleep(0.01)
    print("LOST" if claim.heartbeat() is False else "STILL", flush=True)
""")


def test_heartbeat_keeps_a_claim_against_a_contender_until_it_stops(tmp_path: Path) -> None:
    """A holder "on another host" heartbeats every lease/3 (lease 3 s): a contender trying for 4 s never gets the
    lock. Once the holder stops beating (still alive), the contender takes over after the lease, and the holder's
    next heartbeat reports the claim lost."""
    lock, stop, check = tmp_path / "s.lock", tmp_path / "stop", tmp_path / "check"
    lease = 3.0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(stop), str(check), str(lease)],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert claims.try_claim(lock, lease=lease) is None
            time.sleep(0.1)
        stop.touch()
        assert holder.stdout.readline().strip() == "STOPPED"
        claim = None
        deadline = time.monotonic() + 10
        while claim is None and time.monotonic() < deadline:
            claim = claims.try_claim(lock, lease=lease)
            time.sleep(0.1)
        assert claim is not None and _payload(lock)["pid"] == os.getpid()
        check.touch()
        assert holder.stdout.readline().strip() == "LOST"
        assert holder.wait(timeout=30) == 0
        assert claim.heartbeat()
        claim.release()
    finally:
        holder.kill()
        holder.wait()


def test_release_never_removes_someone_elses_lock(tmp_path: Path) -> None:
    """Our lock is removed behind our back and another holder takes the name (possibly with our old inode number):
    heartbeat reports ours lost, and release leaves the new holder's lock untouched."""
    path = tmp_path / "s.lock"
    ours = claims.try_claim(path, slide="a")
    assert ours is not None
    path.unlink()
    theirs = claims.try_claim(path, slide="b")
    assert theirs is not None
    assert ours.heartbeat() is False and ours.lost
    ours.release()
    assert _payload(path)["slide"] == "b"
    assert theirs.held and not ours.held
    theirs.release()
    assert not path.exists()


def test_heartbeat_refreshes_the_lock_to_the_servers_now(tmp_path: Path) -> None:
    """A heartbeat moves an aged claim's mtime to the file server's now; the claim stays held."""
    claim = claims.try_claim(tmp_path / "s.lock")
    assert claim is not None
    _age(claim.path, 300)
    assert claim.heartbeat() and claim.held
    assert time.time() - claim.path.stat().st_mtime < 60
    claim.release()
    assert not claim.path.exists()


def test_a_contender_with_an_outdated_verdict_never_moves_the_fresh_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B judges a dead holder's lock stale; before B acts, A takes it over and publishes its own lock. B's takeover
    then fails without ever renaming A's lock (a bare rename-then-compare would leave the name empty for a moment,
    in which a third process could claim it too), and A's lock stays intact."""
    path = tmp_path / "s.lock"
    path.write_text(f"pid={_dead_pid()},time=1,slide=x,host={claims.HOST}", encoding="utf-8")
    outdated = claims.judge(path)
    assert outdated.state == "stale"
    a = claims.try_claim(path, slide="a")
    assert a is not None
    renamed: list[str] = []
    real_rename = os.rename

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append(os.fspath(src))
        real_rename(src, dst)

    monkeypatch.setattr(claims.os, "rename", spy)
    assert claims._take_over(path, outdated, claims.DEFAULT_GRACE) is False
    assert str(path) not in renamed
    assert _payload(path)["slide"] == "a" and a.heartbeat()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.lock"]
    a.release()
