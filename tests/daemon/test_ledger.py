"""The SQLite ledger for real: WAL file, writer thread, transactions, crash recovery, status and admin commands."""

from __future__ import annotations

import errno
import os
import random
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from atlaspatch_stream.daemon.ledger.facade import Ledger
from atlaspatch_stream.daemon.ledger.states import Observation, RetryPolicy, Settings, SlideRecord
from atlaspatch_stream.daemon.ledger.status import read_status, requeue_slides
from atlaspatch_stream.daemon.ledger.store import LedgerError
from atlaspatch_stream.items import Failure
from tests.daemon.manual_clock import ManualClock

pytestmark = pytest.mark.anyio
SETTINGS = Settings("geo", ("resnet50",))
SLIDE = Failure("read", "unreadable", "slide")
DISK_FULL = Failure("write", "disk_full", "system", errno.ENOSPC)
ROOT = Path(__file__).resolve().parents[2]


def _obs(slide_id: str, size: int = 10, stem: str | None = None) -> Observation:
    return Observation(slide_id, slide_id, "file", size, 1, stem or Path(slide_id).stem)


async def _take(ledger: Ledger) -> SlideRecord | None:
    """take_next, as the record it leaves running."""
    change = await ledger.take_next()
    return change.after if change is not None else None


async def _ready(ledger: Ledger, *slide_ids: str, clock: ManualClock | None = None) -> None:
    await ledger.reconcile({s: _obs(s) for s in slide_ids})
    for slide_id in slide_ids:
        await ledger.mark_ready(slide_id, 10, 1, "qf1:x")
        if clock is not None:
            clock.advance(1)


async def test_files_are_private_and_wal(tmp_path: Path) -> None:
    """The state folder is 0750 at most and the ledger, its -wal and -shm carry no group/other write and no world
    access; the journal is WAL and the schema version is set."""
    path = tmp_path / "state" / "ledger.sqlite3"
    with anyio.fail_after(10):
        async with Ledger.open(path) as ledger:
            await ledger.reconcile({"a.svs": _obs("a.svs")})
            for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                mode = stat.S_IMODE(file.stat().st_mode)
                assert mode & 0o027 == 0, (file.name, oct(mode))
            assert stat.S_IMODE(path.parent.stat().st_mode) & 0o027 == 0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


async def test_lifecycle_fifo_done_and_audit(tmp_path: Path) -> None:
    """Three slides become ready one second apart; take_next hands them out oldest first and marks them running;
    done records the output and settings; the events table holds every transition in order."""
    clock = ManualClock()
    with anyio.fail_after(10):
        async with Ledger.open(tmp_path / "l.db", clock=clock) as ledger:
            await _ready(ledger, "b.svs", "a.svs", "c.svs", clock=clock)
            taken = [await _take(ledger) for _ in range(3)]
            assert [r.slide_id for r in taken if r] == ["b.svs", "a.svs", "c.svs"]
            assert await _take(ledger) is None
            record = taken[0]
            assert record is not None and record.state == "running"
            await ledger.finish_done("b.svs", record.version, "/out/patches/b.h5", SETTINGS)
            done = await ledger.get("b.svs")
            assert done is not None and done.output_h5 == "/out/patches/b.h5"
            assert done.settings_fp == SETTINGS.fingerprint and done.encoders == ("resnet50",)
            trail = [(e["from_state"], e["to_state"]) for e in await ledger.events("b.svs")]
            assert trail == [(None, "seen"), ("seen", "ready"), ("ready", "running"), ("running", "done")]
            assert (await ledger.counts())["running"] == 2


async def test_result_for_an_older_version_is_ignored(tmp_path: Path) -> None:
    """The file changed while it was running: the old run's result does not mark the new version done."""
    with anyio.fail_after(10):
        async with Ledger.open(tmp_path / "l.db") as ledger:
            await _ready(ledger, "a.svs")
            running = await _take(ledger)
            assert running is not None
            await ledger.reconcile({"a.svs": _obs("a.svs", size=99)})
            assert await ledger.finish_done("a.svs", running.version, "/o/a.h5", SETTINGS) is None
            record = await ledger.get("a.svs")
            assert record is not None and (record.state, record.version) == ("seen", 2)


async def test_quarantine_status_and_operator_retry(tmp_path: Path) -> None:
    """A slide failing 3 times (each retry promoted when its backoff is due, re-checked, taken again) is
    quarantined; the read-only status (a second connection beside the open ledger) shows its error in the last
    failures and the quarantine list; retry-quarantined brings it back to `seen` with no attempts."""
    path = tmp_path / "l.db"
    clock = ManualClock()
    with anyio.fail_after(10):
        async with Ledger.open(path, clock=clock, policy=RetryPolicy(max_attempts=3), rng=random.Random(0)) as ledger:
            await _ready(ledger, "bad.svs")
            for _attempt in range(3):
                record = await _take(ledger)
                assert record is not None and record.slide_id == "bad.svs"
                await ledger.finish_error("bad.svs", record.version, SLIDE, "bad.svs: Bogus marker length")
                due_at = await ledger.next_due()
                if due_at is not None:
                    clock.advance(due_at - clock.now())
                    assert [c.after.state for c in await ledger.promote_due()] == ["seen"]
                    await ledger.mark_ready("bad.svs", 10, 1, "qf1:x")
            status = read_status(path)
            assert status.counts["quarantined"] == 1
            assert status.quarantined[0].error_msg == "bad.svs: Bogus marker length"
            assert [f.state for f in status.failures] == ["quarantined", "failed", "failed"]
            assert status.failures[0].message == "bad.svs: Bogus marker length"
            assert status.to_json()["counts"]["quarantined"] == 1
            changes = await ledger.retry_quarantined()
            assert [c.after.state for c in changes] == ["seen"]
            again = await ledger.get("bad.svs")
            assert again is not None and (again.state, again.attempts) == ("seen", 0)


async def test_admin_requeue_beside_a_running_daemon(tmp_path: Path) -> None:
    """`atlaspatch status --requeue` writes through its own connection while the daemon's ledger is open; the
    daemon sees the change; unknown and running slides are refused and nothing changes."""
    path = tmp_path / "l.db"
    with anyio.fail_after(10):
        async with Ledger.open(path) as ledger:
            await _ready(ledger, "a.svs", "b.svs")
            running = await _take(ledger)
            assert running is not None and running.slide_id == "a.svs"
            await ledger.finish_done("a.svs", running.version, "/o/a.h5", SETTINGS)
            changes = requeue_slides(path, ["a.svs"])
            assert changes[0].after.state == "seen"
            record = await ledger.get("a.svs")
            assert record is not None and record.state == "seen"
            await _take(ledger)  # b.svs now running
            with pytest.raises(ValueError, match="running"):
                requeue_slides(path, ["a.svs", "b.svs"])
            with pytest.raises(ValueError, match="no such slide"):
                requeue_slides(path, ["zzz.svs"])
            assert (await ledger.get("a.svs")).state == "seen"  # type: ignore[union-attr]


async def test_many_concurrent_callers_share_one_writer(tmp_path: Path) -> None:
    """200 tasks observe 200 slides at once: every write lands, none fails with "database is locked"."""
    with anyio.fail_after(30):
        async with Ledger.open(tmp_path / "l.db") as ledger, anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(ledger.observe, _obs(f"s{i:03d}.svs"))
        async with Ledger.open(tmp_path / "l.db") as ledger:
            assert (await ledger.counts())["seen"] == 200


async def test_output_stems_are_unique_and_kept_while_missing(tmp_path: Path) -> None:
    """`a/x.svs`, `b/x.svs`, `x.ndpi`: upstream's `x` for the first, hashed names for the others; after a/x.svs is
    deleted its stem stays reserved (its H5 is kept), so a new `c/x.svs` does not take it."""
    path = tmp_path / "l.db"
    with anyio.fail_after(10):
        async with Ledger.open(path) as ledger:
            await ledger.reconcile({s: _obs(s, stem="x") for s in ("a/x.svs", "b/x.svs", "x.ndpi")})
            stems = {s: (await ledger.get(s)).output_stem for s in ("a/x.svs", "b/x.svs", "x.ndpi")}  # type: ignore[union-attr]
            assert stems["a/x.svs"] == "x" and len(set(stems.values())) == 3
            await ledger.reconcile({s: _obs(s, stem="x") for s in ("b/x.svs", "x.ndpi", "c/x.svs")})
            assert (await ledger.get("a/x.svs")).state == "missing"  # type: ignore[union-attr]
            assert (await ledger.get("c/x.svs")).output_stem not in stems.values()  # type: ignore[union-attr]


async def test_newer_schema_and_closed_ledger_are_errors(tmp_path: Path) -> None:
    """A ledger from a newer schema refuses to open (LedgerError); a closed ledger refuses commands."""
    path = tmp_path / "l.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with anyio.fail_after(10):
        with pytest.raises(LedgerError, match="newer"):
            async with Ledger.open(path):
                pass
        async with Ledger.open(tmp_path / "ok.db") as ledger:
            pass
        with pytest.raises(LedgerError, match="closed"):
            await ledger.counts()
    with pytest.raises(LedgerError, match="no ledger"):
        read_status(tmp_path / "absent.db")


CRASH = """
import anyio, os, signal, sys
sys.path.insert(0, {root!r})
from atlaspatch_stream.daemon.ledger.facade import Ledger
from atlaspatch_stream.daemon.ledger.states import Observation
async def main():
    async with Ledger.open({path!r}) as ledger:
        await ledger.reconcile({{"a.svs": Observation("a.svs", "a.svs", "file", 10, 1, "a")}})
        await ledger.mark_ready("a.svs", 10, 1, "qf1:x")
        await ledger.take_next()
        os.kill(os.getpid(), signal.SIGKILL)
anyio.run(main)
"""


async def test_kill_9_while_running_is_requeued_without_an_attempt(tmp_path: Path) -> None:
    """A process takes a slide (running) and is killed with SIGKILL. The next start finds an intact database and
    puts the slide back to `ready` with no attempt charged, recording why."""
    path = tmp_path / "l.db"
    code = CRASH.format(root=str(ROOT), path=str(path))
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    )
    assert result.returncode == -9, result.stderr
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with anyio.fail_after(10):
        async with Ledger.open(path) as ledger:
            changes = await ledger.reconcile({"a.svs": _obs("a.svs")}, startup=True, settings=SETTINGS)
            assert [(c.from_state, c.after.state) for c in changes] == [("running", "ready")]
            assert "no attempt charged" in changes[0].reason
            record = await ledger.get("a.svs")
            assert record is not None and record.attempts == 0


async def test_release_running_and_resume_deferred(tmp_path: Path) -> None:
    """Shutdown puts running slides back to ready; a deferred slide (disk full) returns to ready on resume."""
    with anyio.fail_after(10):
        async with Ledger.open(tmp_path / "l.db") as ledger:
            await _ready(ledger, "a.svs", "b.svs")
            a, b = await _take(ledger), await _take(ledger)
            assert a is not None and b is not None
            await ledger.finish_error("b.svs", b.version, DISK_FULL, "No space left on device")
            assert [c.after.slide_id for c in await ledger.release_running()] == ["a.svs"]
            assert [c.after.state for c in await ledger.resume_deferred()] == ["ready"]
            counts = await ledger.counts()
            assert counts["ready"] == 2 and counts["deferred"] == 0 and counts["quarantined"] == 0


def test_status_json_is_read_only(tmp_path: Path) -> None:
    """read_status opens mode=ro: a status query never creates a database."""
    missing = tmp_path / "none.db"
    with pytest.raises(LedgerError):
        read_status(missing)
    assert not missing.exists()
    assert os.listdir(tmp_path) == []


async def test_a_held_ledger_is_refused_naming_its_holder(tmp_path: Path) -> None:
    """While one `Ledger` holds a state folder, opening it again is refused with one line naming the holder's host
    and pid; once closed (or its process gone) the next opener takes it."""
    path = tmp_path / "state" / "ledger.sqlite3"
    with anyio.fail_after(10):
        async with Ledger.open(path):
            with pytest.raises(LedgerError) as refused:
                async with Ledger.open(path):
                    pass
            message = str(refused.value)
            assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
            assert str(path.parent) in message
        async with Ledger.open(path) as ledger:
            assert (await ledger.counts())["done"] == 0
