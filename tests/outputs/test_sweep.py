"""Start-up sweep of orphans (claims.sweep_orphans): temp H5s and locks of dead writers go, live ones stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py

from atlaspatch_stream.outputs import claims

ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from atlaspatch_stream.outputs.h5store import SlideH5
    from atlaspatch_stream.outputs import SlideAttrs
    from atlaspatch_stream.outputs import claims
    out, stem = Path(sys.argv[1]), sys.argv[2]
    claim = claims.try_claim(out / "patches" / f"{stem}.lock", slide=stem)
    assert claim is not None
    coords = np.zeros((500, 5), np.int32)
    store = SlideH5.create(out / "patches" / f"{stem}.h5", SlideAttrs(256, 512, 40, 20, 0, 9, 9, "s", "s"),
                           coords, stem, 64, 32)
    store.begin_feature("enc", 64)
    store.write_rows("enc", np.arange(250), np.ones((250, 64), np.float32))
    print("READY", flush=True)
    time.sleep(600)
""")


def _writer(out: Path, stem: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), stem], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_after_kill_9_removes_the_dead_writers_files_only(tmp_path: Path) -> None:
    """Two real writers hold a lock and a temporary H5 each; one is killed with SIGKILL mid-write. The sweep removes
    the dead one's temp file and lock, and keeps the live one's files and a finished H5; a second sweep finds
    nothing; after the live writer dies too, its files go as well."""
    patches = tmp_path / "patches"
    patches.mkdir()
    with h5py.File(patches / "done.h5", "w") as f:
        f["coords"] = [[0, 0, 1, 1, 0]]
    dead, live = _writer(tmp_path, "dead"), _writer(tmp_path, "live")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        before = _names(patches)
        assert "dead.lock" in before and any(n.startswith(".dead.h5.tmp.") for n in before)
        summary = claims.sweep_orphans(tmp_path)
        assert [p.name for p in summary.removed_locks] == ["dead.lock"]
        assert [p.name.split(".tmp.")[0] for p in summary.removed_temps] == [".dead.h5"]
        after = _names(patches)
        assert "done.h5" in after and "live.lock" in after and any(n.startswith(".live.h5.tmp.") for n in after)
        assert not any(n.startswith(".dead") or n.startswith("dead") for n in after)
        assert claims.sweep_orphans(tmp_path).one_line() == "nothing to sweep"
    finally:
        live.kill()
        live.wait()
    assert claims.sweep_orphans(tmp_path).one_line() == "swept 1 temporary file and 1 stale lock"
    assert _names(patches) == ["done.h5"]


def test_old_style_temp_files_go_after_grace_unless_a_live_lock_holds_the_stem(tmp_path: Path) -> None:
    """Temp files of the older naming (`.<stem>.h5.tmp.<32hex>`, no owner) are kept while young, removed once older
    than the grace period, but kept while a live process holds their stem's lock."""
    patches = tmp_path / "patches"
    patches.mkdir()
    young, old, locked = (patches / f".{s}.h5.tmp.{'a' * 32}" for s in ("young", "old", "locked"))
    for path in (young, old, locked):
        path.write_bytes(b"partial")
    _age(old, claims.DEFAULT_GRACE + 10)
    _age(locked, claims.DEFAULT_GRACE + 10)
    claim = claims.try_claim(patches / "locked.lock")
    assert claim is not None
    summary = claims.sweep_orphans(tmp_path)
    assert summary.removed_temps == [old]
    assert young.exists() and locked.exists()
    claim.release()
    assert claims.sweep_orphans(tmp_path).removed_temps == [locked]


def test_other_hosts_temp_files_go_only_when_stale_by_lease(tmp_path: Path) -> None:
    """A temp file written on another host is kept while its stem's lock is held or it changed within the lease;
    once unchanged for longer than the lease with no lock, it is removed."""
    patches = tmp_path / "patches"
    patches.mkdir()
    fresh = patches / ".a.h5.tmp.0123456789-42-7.abcdefabcdef"
    stale = patches / ".b.h5.tmp.0123456789-42-7.abcdefabcdef"
    for path in (fresh, stale):
        path.write_bytes(b"partial")
    _age(fresh, 30)
    _age(stale, 120)
    summary = claims.sweep_orphans(tmp_path, lease=60)
    assert summary.removed_temps == [stale] and fresh.exists()


def test_leftover_publish_and_takeover_files_are_swept(tmp_path: Path) -> None:
    """A lock publish temp and a clock probe of a dead local process go at once; takeover side files go after
    grace (a young one stays); a takeover guard left by a dead process goes at once."""
    patches = tmp_path / "patches"
    patches.mkdir()
    dead_child = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_child.wait()
    key = claims.owner_tag().split("-", 1)[0]
    pub = patches / f".s.lock.pub.{key}-{dead_child.pid}-0.0123456789ab"
    probe = patches / f".probe.{key}-{dead_child.pid}-0.0123456789ab"
    side = patches / "s.lock.stale.0123456789ab"
    young_side = patches / "t.lock.released.0123456789ab"
    guard = patches / "u.lock.takeover"
    for path in (pub, probe, side, young_side):
        path.write_bytes(b"")
    guard.write_bytes(claims.Holder(host=claims.HOST, pid=dead_child.pid).to_bytes())
    _age(side, claims.DEFAULT_GRACE + 1)
    summary = claims.sweep_orphans(tmp_path)
    assert sorted(summary.removed_temps) == sorted([pub, probe, side])
    assert summary.removed_locks == [guard]
    assert _names(patches) == [young_side.name]
