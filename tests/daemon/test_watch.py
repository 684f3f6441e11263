"""The folder source on real files: scanning rules, settling, rename into place, DICOM folders, poll mode,
reconciliation across a restart, backpressure, the system-error pause and retries. Each test under a deadline."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from atlaspatch_stream.config import WatchConfig
from atlaspatch_stream.daemon.ledger.facade import Ledger
from atlaspatch_stream.daemon.ledger.states import RetryPolicy, Settings
from atlaspatch_stream.daemon.ops.logs import Pseudonymizer
from atlaspatch_stream.daemon.ops.statusfile import StatusBoard, run_status_file
from atlaspatch_stream.daemon.watcher import (
    FolderWatcher,
    IgnoreRules,
    ReadySlide,
    WatcherOptions,
    choose_mode,
    group_of,
    scan_tree,
)
from atlaspatch_stream.errors import ConfigError
from atlaspatch_stream.items import Failure
from tests.conftest import real_slide
from tests.daemon.manual_clock import ManualClock

pytestmark = pytest.mark.anyio
SETTINGS = Settings("geo", ())
SVS = "aperio/CMU-1-Small-Region.svs"
SMALL = "aperio/small-16x16.svs"


@dataclass
class Run:
    """A running watcher, the slides it sent (with arrival times), and its ledger."""

    watcher: FolderWatcher
    ledger: Ledger
    received: list[tuple[float, ReadySlide]] = field(default_factory=list)

    async def wait_for(self, count: int, timeout: float) -> list[ReadySlide]:
        with anyio.fail_after(timeout):
            while len(self.received) < count:
                await anyio.sleep(0.02)
        return [slide for _, slide in self.received]


@asynccontextmanager
async def watching(
    root: Path, state: Path, *, mode: str = "poll", settle_s: float = 0.0, rescan_s: float = 0.5,
    events: Any = None, buffer: int = 64, consume: bool = True, done: bool = False, probe_dir: Path | None = None,
    mounts_text: str | None = None, clock: Any = None, pseudonym: Any = None, **watch: Any,
) -> AsyncIterator[Run]:
    """Open a ledger, start a watcher over `root`, collect what it sends (marking it done when `done`)."""
    config = WatchConfig(settle_s=settle_s, rescan_s=rescan_s, watch_mode=mode, settle_max_wait_s=max(60.0, settle_s + 1),  # type: ignore[arg-type]
                         **watch)
    policy = RetryPolicy.from_config(config)
    async with Ledger.open(state / "ledger.sqlite3", policy=policy) as ledger, anyio.create_task_group() as tg:
        send, receive = anyio.create_memory_object_stream[ReadySlide](buffer)
        options = WatcherOptions(root, config, probe_dir or state / "probe", (state,), events, pseudonym, mounts_text)
        watcher = FolderWatcher(options, ledger, SETTINGS, clock=clock)
        run = Run(watcher, ledger)

        async def consumer() -> None:
            async with receive:
                async for slide in receive:
                    run.received.append((time.monotonic(), slide))
                    if done:
                        out = state / "patches" / f"{slide.stem}.h5"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(b"h5")
                        await watcher.slide_done(slide, out)

        await tg.start(watcher.run, send)
        if consume:
            tg.start_soon(consumer)
        try:
            yield run
        finally:
            tg.cancel_scope.cancel()
            send.close()
            receive.close()


class MemoryEvents:
    """An event source fed by the test (as watchfiles' `MockRustNotify`): `await events.emit(path, ...)`."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[set[str]](64)

    def __call__(self, root: Path, limiter: anyio.CapacityLimiter) -> AsyncIterator[set[str]]:
        """The source, as the watcher calls it."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[set[str]]:
        async with self._receive:
            async for batch in self._receive:
                yield batch

    async def emit(self, *paths: Path | str) -> None:
        """Deliver one batch of changed paths."""
        await self._send.send({str(p) for p in paths})

    def close(self) -> None:
        """End the source (the watcher's event task then ends)."""
        self._send.close()


def _copy(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(real_slide(name), target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Pure-ish parts


def test_scan_takes_slide_groups_and_skips_everything_else(tmp_path: Path) -> None:
    """One scan of a messy drop folder: files, a DICOM series folder (one slide), an MRXS with its data folder (one
    slide), a nested case folder; hidden, temp, ignored, FIFO, links out of INPUT and the state folder are skipped;
    a link to a file inside INPUT is taken."""
    root = tmp_path / "in"
    _copy(SMALL, root / "a.svs")
    _copy(SMALL, root / "case" / "deep" / "b.tiff")
    _copy("dicom/boxes/boxes_0.dcm", root / "series" / "0.dcm")
    _copy("dicom/boxes/boxes_1.dcm", root / "series" / "1.dcm")
    (root / "m.mrxs").write_bytes(b"x")
    (root / "m").mkdir()
    (root / "m" / "Data0000.dat").write_bytes(b"x")
    for name in (".a.svs.XyZ12", "c.svs.part", "d.tmp", "e.partial", "~f.svs", "g.svs"):
        (root / name).write_bytes(b"x")
    (root / "notes.txt").write_text("not a slide")
    os.mkfifo(root / "pipe.svs")
    outside = _copy(SMALL, tmp_path / "elsewhere" / "o.svs")
    (root / "out-link.svs").symlink_to(outside)
    (root / "dir-link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "in-link.svs").symlink_to(root / "a.svs")
    _copy(SMALL, root / ".atlaspatch" / "x.svs")
    _copy(SMALL, root / "output" / "images" / "p.png")
    rules = IgnoreRules(("g.*",), (root / "output",))
    found = scan_tree(root, rules, max_depth=8)
    assert sorted(found) == ["a.svs", "case/deep/b.tiff", "in-link.svs", "m.mrxs", "series"]
    assert found["series"].kind == "dicom" and found["m.mrxs"].kind == "mrxs"
    assert found["m.mrxs"].size == 2 and found["series"].stem == "series"
    assert "case/deep/b.tiff" not in scan_tree(root, rules, max_depth=1)


def test_group_of_maps_event_paths_to_slides(tmp_path: Path) -> None:
    """An event on a .dcm names its folder's series; one under `m/` beside `m.mrxs` names the MRXS; temp names and
    hidden folders name nothing."""
    root = tmp_path
    (root / "m.mrxs").write_bytes(b"x")
    (root / "m").mkdir()
    rules = IgnoreRules()
    assert group_of(root, root / "s" / "1.dcm", rules) == (root / "s", "dicom")
    assert group_of(root, root / "m" / "Data0001.dat", rules) == (root / "m.mrxs", "mrxs")
    assert group_of(root, root / "a.svs", rules) == (root / "a.svs", "file")
    assert group_of(root, root / "a.svs.part", rules) is None
    assert group_of(root, root / ".hidden" / "a.svs", rules) is None
    assert group_of(root, tmp_path.parent / "x.svs", rules) is None


def test_auto_mode_polls_on_network_filesystems(tmp_path: Path) -> None:
    """The longest mount point containing the folder decides: NFS, CIFS and any FUSE mount poll; ext4 uses events;
    an explicit mode wins."""
    mounts = ("/dev/vda / ext4 rw 0 0\nserver:/x /mnt nfs4 rw 0 0\n//nas/drop /mnt/smb cifs rw 0 0\n"
              "sshfs#u@h: /mnt/fuse fuse.sshfs rw 0 0\n/dev/vdb /mnt/local\\040disk xfs rw 0 0\n")
    assert choose_mode("auto", Path("/mnt/scans"), mounts) == ("poll", "nfs4")
    assert choose_mode("auto", Path("/mnt/smb/in"), mounts) == ("poll", "cifs")
    assert choose_mode("auto", Path("/mnt/fuse/in"), mounts) == ("poll", "fuse.sshfs")
    assert choose_mode("auto", Path("/mnt/local disk/in"), mounts) == ("events", "xfs")
    assert choose_mode("auto", Path("/data"), mounts) == ("events", "ext4")
    assert choose_mode("events", Path("/mnt/x"), mounts)[0] == "events"


# ---------------------------------------------------------------------------------------------------------------
# The watcher


async def test_growing_file_waits_for_writer_stop_plus_settle(tmp_path: Path) -> None:
    """A writer appends 1 MiB every 200 ms (the slide's bytes, then more) for about 2.4 s, with real filesystem
    events. No job and no failure appear while it writes; exactly one job appears no sooner than its last write
    plus settle_s."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    data = real_slide(SVS).read_bytes() + os.urandom(10 << 20)
    settle = 1.0
    async with watching(root, state, mode="events", settle_s=settle, rescan_s=5.0) as run:
        target = root / "slow.svs"
        for offset in range(0, 12 << 20, 1 << 20):
            with open(target, "ab") as handle:
                handle.write(data[offset : offset + (1 << 20)])
            stopped = time.monotonic()
            await anyio.sleep(0.2)
            assert run.received == []
        slides = await run.wait_for(1, timeout=settle + 10)
        await anyio.sleep(settle)
        assert len(run.received) == 1 and slides[0].slide_id == "slow.svs"
        assert run.received[0][0] >= stopped + settle
        counts = await run.ledger.counts()
        assert counts["failed"] == counts["quarantined"] == 0
        assert all(e["to_state"] in ("seen", "ready", "running") for e in await run.ledger.events("slow.svs"))


async def test_presized_copy_is_never_sent_before_its_tiles_are_there(tmp_path: Path) -> None:
    """A copy pre-sized with truncate and filled in 40 chunks, with its mtime set back after every write (as
    CopyFile does), and settle_s = 0 so only the completeness check stands guard: no job until the last chunk."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    data = real_slide(SVS).read_bytes()
    async with watching(root, state, mode="poll", rescan_s=0.2) as run:
        target = root / "copy.svs"
        with open(target, "wb") as handle:
            handle.truncate(len(data))
        stamp = target.stat().st_mtime_ns
        chunk = len(data) // 40 + 1
        for offset in range(0, len(data), chunk):
            assert run.received == [], f"sent with {offset} of {len(data)} bytes written"
            with open(target, "r+b") as handle:
                handle.seek(offset)
                handle.write(data[offset : offset + chunk])
            os.utime(target, ns=(stamp, stamp))
            last_write = time.monotonic()
            await anyio.sleep(0.06)
        await run.wait_for(1, timeout=10)
        assert run.received[0][0] >= last_write


async def test_rename_into_place_is_one_job(tmp_path: Path) -> None:
    """Slides written as `x.svs.part` and as rsync's hidden `.y.svs.AbC123`, then renamed into place, give one job
    each, for the final names only; the ledger never heard of the temporary names."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    async with watching(root, state, mode="events", settle_s=0.5, rescan_s=5.0) as run:
        _copy(SVS, root / "x.svs.part")
        _copy(SMALL, root / ".y.svs.AbC123")
        await anyio.sleep(0.8)
        os.rename(root / "x.svs.part", root / "x.svs")
        os.rename(root / ".y.svs.AbC123", root / "y.svs")
        slides = await run.wait_for(2, timeout=10)
        await anyio.sleep(1.0)
        assert sorted(s.slide_id for s in slides) == ["x.svs", "y.svs"]
        assert len(run.received) == 2
        counts = await run.ledger.counts()
        assert sum(counts.values()) == 2


async def test_dicom_folder_copied_file_by_file_is_one_job(tmp_path: Path) -> None:
    """A DICOM series arrives one instance every 0.4 s into its folder: exactly one job, for the folder, after the
    last instance plus settle_s."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    settle = 1.0
    async with watching(root, state, mode="events", settle_s=settle, rescan_s=5.0) as run:
        names = ["dicom/boxes/boxes_0.dcm", "dicom/boxes/boxes_1.dcm"]
        for i, name in enumerate(names):
            _copy(name, root / "case-7" / f"{i}.dcm")
            await anyio.sleep(0.4)
        last = time.monotonic() - 0.4
        slides = await run.wait_for(1, timeout=10)
        await anyio.sleep(settle)
        assert len(run.received) == 1
        assert (slides[0].slide_id, slides[0].kind, slides[0].path) == ("case-7", "dicom", root / "case-7")
        assert run.received[0][0] >= last + settle - 0.05


async def test_poll_mode_finds_every_slide_within_one_rescan(tmp_path: Path) -> None:
    """Poll mode on a folder that delivers no events (a network share as auto mode sees it): three slides dropped
    after start are all sent within one rescan period (plus a small margin)."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    rescan = 1.0
    config_mounts = f"server:/share {root} nfs4 rw 0 0\n"
    async with watching(root, state, mode="auto", rescan_s=rescan, mounts_text=config_mounts) as run:
        assert run.watcher.statistics().mode == "poll"
        dropped = time.monotonic()
        for name in ("p1.svs", "p2.svs", "p3.svs"):
            _copy(SMALL, root / name)
        await run.wait_for(3, timeout=rescan + 2)
        assert max(t for t, _ in run.received) - dropped <= rescan + 1.0


async def test_events_are_hints_not_the_truth(tmp_path: Path) -> None:
    """With an event source that never reports anything (a mock), the periodic rescan still finds the slide; an
    event for it makes discovery immediate."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    events = MemoryEvents()
    async with watching(root, state, mode="events", rescan_s=1.0, events=events) as run:
        _copy(SMALL, root / "silent.svs")
        await run.wait_for(1, timeout=3)
        _copy(SMALL, root / "hinted.svs")
        hinted = time.monotonic()
        await events.emit(root / "hinted.svs")
        await run.wait_for(2, timeout=3)
        assert run.received[1][0] - hinted < 0.5
        events.close()


async def test_reconciliation_across_a_restart(tmp_path: Path) -> None:
    """First run: three slides done. While stopped: three added, one modified, one deleted. Second run sends
    exactly four jobs (the three new ones and the new version of the modified one); the deleted slide is `missing`
    with its H5 kept; the untouched one stays done and is not sent."""
    root, state = tmp_path / "in", tmp_path / "state"
    for name in ("keep.svs", "mod.svs", "del.svs"):
        _copy(SMALL, root / name)
    async with watching(root, state, done=True) as run:
        await run.wait_for(3, timeout=10)
        with anyio.fail_after(5):
            while (await run.ledger.counts())["done"] < 3:
                await anyio.sleep(0.05)
    for name in ("new1.svs", "new2.svs", "new3.svs"):
        _copy(SMALL, root / name)
    _copy(SVS, root / "mod.svs")
    (root / "del.svs").unlink()
    async with watching(root, state, done=True) as run:
        slides = await run.wait_for(4, timeout=10)
        await anyio.sleep(0.6)
        assert len(run.received) == 4
        assert sorted((s.slide_id, s.version) for s in slides) == [
            ("mod.svs", 2), ("new1.svs", 1), ("new2.svs", 1), ("new3.svs", 1)]
        deleted = await run.ledger.get("del.svs")
        assert deleted is not None and deleted.state == "missing" and deleted.output_h5
        assert Path(deleted.output_h5).exists()
        keep = await run.ledger.get("keep.svs")
        assert keep is not None and keep.state == "done" and keep.version == 1


async def test_ten_thousand_waiting_rows_stay_in_the_ledger(tmp_path: Path) -> None:
    """10,000 ready slides and a consumer that does not read (buffer 4): the watcher takes at most buffer + 1 rows
    (the others wait in the ledger) and its memory stays flat; then the consumer reads 200 in FIFO order."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    for i in range(10_000):
        os.close(os.open(root / f"s{i:05d}.svs", os.O_CREAT | os.O_WRONLY, 0o644))
    found = scan_tree(root, IgnoreRules(), 1)
    async with Ledger.open(state / "ledger.sqlite3") as ledger:
        await ledger.reconcile(found)
    conn = sqlite3.connect(state / "ledger.sqlite3")
    conn.execute("UPDATE slides SET state = 'ready', ready_at = id")  # test set-up: all already settled
    conn.commit()
    conn.close()
    gc.collect()
    tracemalloc.start()
    try:
        async with watching(root, state, buffer=4, consume=False, rescan_s=30.0) as run:
            baseline = tracemalloc.get_traced_memory()[0]
            await anyio.sleep(1.0)
            counts = await run.ledger.counts()
            assert counts["running"] <= 5 and counts["ready"] >= 10_000 - 5
            gc.collect()
            assert tracemalloc.get_traced_memory()[0] - baseline < 2 << 20
    finally:
        tracemalloc.stop()
    async with watching(root, state, buffer=4, rescan_s=30.0) as run:
        slides = await run.wait_for(200, timeout=60)
        ids = [s.slide_id for s in slides[:200]]
        assert ids == sorted(ids)


async def test_system_error_pauses_intake_until_a_probe_write_succeeds(tmp_path: Path) -> None:
    """A slide fails with a system error (disk full): it is deferred, nothing is quarantined, intake pauses (the
    next ready slide is not sent) while the output cannot be written; once a probe write succeeds, intake resumes
    and the deferred slide is sent again."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    probe = blocker / "patches"
    async with watching(root, state, probe_dir=probe, probe_s=0.2, rescan_s=0.3) as run:
        _copy(SMALL, root / "a.svs")
        first = (await run.wait_for(1, timeout=5))[0]
        await run.watcher.slide_failed(first, Failure("write", "disk_full", "system", errno.ENOSPC),
                                       "write a.h5: No space left on device")
        _copy(SMALL, root / "b.svs")
        await anyio.sleep(1.0)
        assert len(run.received) == 1
        assert run.watcher.statistics().paused_because == "write a.h5: No space left on device"
        counts = await run.ledger.counts()
        assert (counts["deferred"], counts["quarantined"], counts["ready"]) == (1, 0, 1)
        blocker.unlink()
        slides = await run.wait_for(3, timeout=5)
        assert sorted(s.slide_id for s in slides) == ["a.svs", "a.svs", "b.svs"]
        assert run.watcher.statistics().paused_because is None


async def test_corrupt_slide_is_quarantined_after_max_attempts_others_unaffected(tmp_path: Path) -> None:
    """A `.svs` that is not a TIFF fails its completeness check as broken: retried with backoff up to
    max_attempts, then quarantined with the reason; a good slide beside it is sent as usual."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    (root / "junk.svs").write_bytes(b"GIF89a" + b"\x01" * 5000)
    _copy(SMALL, root / "good.svs")
    async with watching(root, state, rescan_s=0.2, max_attempts=3, backoff_base_s=0.05, backoff_factor=1.0,
                        backoff_max_s=0.05) as run:
        await run.wait_for(1, timeout=5)
        with anyio.fail_after(10):
            while (record := await run.ledger.get("junk.svs")) is None or record.state != "quarantined":
                await anyio.sleep(0.05)
        assert record.attempts == 3 and "not a TIFF" in (record.error_msg or "")
        assert [s.slide_id for s in (r for _, r in run.received)] == ["good.svs"]


async def test_a_changed_running_slide_waits_for_its_previous_run(tmp_path: Path) -> None:
    """A slide is rewritten while its first version is running: the second version is not sent until the first
    run reports back, then it is sent once, as version 2."""
    root, state = tmp_path / "in", tmp_path / "state"
    _copy(SMALL, root / "a.svs")
    async with watching(root, state, rescan_s=0.2) as run:
        first = (await run.wait_for(1, timeout=5))[0]
        _copy(SVS, root / "a.svs")
        await anyio.sleep(1.0)
        assert len(run.received) == 1
        await run.watcher.slide_done(first, state / "a.h5")  # the old version's result: ignored by the ledger
        second = (await run.wait_for(2, timeout=5))[1]
        assert second.version == 2


async def test_once_takes_slides_present_at_start_once_they_settle(tmp_path: Path) -> None:
    """`--once` with settle_s = 1 right after a copy: two slides modified an hour ago are sent at once; one written
    just now is sent once it has been quiet for 1 s; one still being written to is left `seen`, and `left` says
    it was still changing. The stream is closed when done, within about settle_s."""
    root, state = tmp_path / "in", tmp_path / "state"
    old = time.time() - 3600
    for name in ("old1.svs", "old2.svs"):
        path = _copy(SMALL, root / name)
        os.utime(path, (old, old))
    _copy(SMALL, root / "fresh.svs")
    growing = _copy(SMALL, root / "growing.svs")
    send, receive = anyio.create_memory_object_stream[ReadySlide](16)

    async def keep_writing() -> None:
        while True:
            with growing.open("ab") as handle:
                handle.write(b"\0" * 1024)
            await anyio.sleep(0.1)

    with anyio.fail_after(10):
        async with Ledger.open(state / "ledger.sqlite3") as ledger:
            watcher = FolderWatcher(WatcherOptions(root, WatchConfig(settle_s=1, watch_mode="poll"), state, (state,)),
                                    ledger, SETTINGS)
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_writing)
                started = time.monotonic()
                await watcher.run_once(send)
                took = time.monotonic() - started
                tg.cancel_scope.cancel()
            with receive:
                received = [s.slide_id async for s in receive]
            left = await ledger.get("growing.svs")
    assert sorted(received) == ["fresh.svs", "old1.svs", "old2.svs"]
    assert left is not None and left.state == "seen" and 1.0 <= took < 4.0
    assert list(watcher.left) == ["growing.svs"] and watcher.left["growing.svs"].startswith("still changing")


async def test_settle_period_under_a_manual_clock(tmp_path: Path) -> None:
    """With a manual clock and a mock event source: a slide announced by an event is not sent 29 s after it was
    first seen, and is sent once the clock passes 30 s (settle_s), with no real waiting for the period itself."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    clock = ManualClock(start=time.time())
    events = MemoryEvents()
    async with watching(root, state, mode="events", settle_s=30.0, rescan_s=3600.0, events=events,
                        clock=clock) as run:
        _copy(SMALL, root / "a.svs")
        await events.emit(root / "a.svs")
        with anyio.fail_after(5):
            while run.watcher.statistics().settling == 0:
                await anyio.sleep(0.01)
        clock.advance(29.0)
        await anyio.sleep(0.5)
        assert run.received == []
        clock.advance(1.5)
        slides = await run.wait_for(1, timeout=5)
        assert slides[0].slide_id == "a.svs"
        events.close()


async def test_pseudonymised_slides_carry_no_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With pseudonyms on: the slide sent downstream carries its keyed hash, its output stem is that hash (no file
    name in the output name), and the transition log lines name the pseudonym, never the file."""
    root, state = tmp_path / "in", tmp_path / "state"
    _copy(SMALL, root / "ACC-2024-991.svs")
    names = Pseudonymizer.from_key_file(state / "pseudonym.key")
    caplog.set_level("INFO", logger="atlaspatch_stream.daemon.watcher")
    async with watching(root, state, pseudonym=names.pseudonym) as run:
        slide = (await run.wait_for(1, timeout=5))[0]
    expected = names.pseudonym("ACC-2024-991.svs")
    assert slide.pseudonym == expected and slide.stem == expected and slide.display == expected
    transitions = [r for r in caplog.records if getattr(r, "event", None) == "slide_transition"]
    assert transitions and all("ACC-2024" not in r.getMessage() and r.slide == expected for r in transitions)


async def test_touched_done_slide_is_not_redone_but_new_content_is(tmp_path: Path) -> None:
    """A done slide whose mtime moves with the same bytes (touch, a copy without -p) stays done and is not sent
    again; the same size with different bytes is a new version and is sent."""
    root, state = tmp_path / "in", tmp_path / "state"
    target = _copy(SMALL, root / "a.svs")
    async with watching(root, state, rescan_s=0.2, done=True) as run:
        await run.wait_for(1, timeout=5)
        with anyio.fail_after(5):
            while (await run.ledger.counts())["done"] < 1:
                await anyio.sleep(0.02)
        os.utime(target, (time.time() + 5, time.time() + 5))
        await anyio.sleep(1.0)
        record = await run.ledger.get("a.svs")
        assert len(run.received) == 1 and record is not None and record.state == "done"
        assert record.mtime_ns == target.stat().st_mtime_ns
        data = bytearray(target.read_bytes())
        data[100] ^= 0x01  # inside the first tile's entropy-coded data: same size, still a complete TIFF
        target.write_bytes(bytes(data))
        slides = await run.wait_for(2, timeout=5)
        assert slides[1].version == 2


async def test_missing_input_folder_is_a_config_error(tmp_path: Path) -> None:
    """Watching a folder that does not exist fails at once with a one-line ConfigError naming it."""
    async with Ledger.open(tmp_path / "l.db") as ledger:
        watcher = FolderWatcher(WatcherOptions(tmp_path / "nope", WatchConfig(watch_mode="poll"), tmp_path), ledger,
                                SETTINGS)
        send, receive = anyio.create_memory_object_stream[ReadySlide](1)
        with anyio.fail_after(5), pytest.raises(ConfigError, match="does not exist"):
            await watcher.run(send)
        receive.close()


async def test_never_uses_anyio_default_thread_limiter(tmp_path: Path) -> None:
    """With the default thread limiter's only token held by the test (as a busy FastAPI host would hold it), a full
    cycle still completes: ledger open, real filesystem events, scan, settle, completeness check, dispatch, status
    file, close. Any blocking call on the default limiter would hang here until the deadline."""
    root, state = tmp_path / "in", tmp_path / "state"
    root.mkdir()
    default = anyio.to_thread.current_default_thread_limiter()
    default.total_tokens = 1
    await default.acquire()
    try:
        with anyio.fail_after(15):
            async with watching(root, state, mode="events", settle_s=0.2, rescan_s=0.5) as run:
                _copy(SMALL, root / "a.svs")
                await run.wait_for(1, timeout=10)
                board = StatusBoard()
                await run_status_file_once(state / "status.json", board)
    finally:
        default.release()
    assert (state / "status.json").exists()


async def run_status_file_once(path: Path, board: StatusBoard) -> None:
    """Start the status-file loop (it writes once before reporting started), then stop it."""
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: run_status_file(path, board.snapshot, interval_s=60, task_status=task_status))
        tg.cancel_scope.cancel()
