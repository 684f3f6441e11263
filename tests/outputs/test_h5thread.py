"""The H5 executor: one thread runs every submitted call, in order; results, errors and releases stay correct."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from atlaspatch_stream.outputs.h5thread import WriterThread, h5_executor

ROOT = Path(__file__).resolve().parents[2]


class _Tracked:
    """Records the thread that releases it (stands in for an h5py object held by a frame)."""

    released_on: list[str] = []

    def __del__(self) -> None:
        self.released_on.append(threading.current_thread().name)


def test_submit_runs_on_the_h5_thread_in_order_and_returns_results() -> None:
    """Calls from several threads all run on the one H5 thread, one at a time, and each caller gets its result."""
    executor = WriterThread("test-h5")
    seen: list[str] = []
    running = [0]
    overlap = []

    def job(i: int) -> int:
        running[0] += 1
        overlap.append(running[0])
        seen.append(threading.current_thread().name)
        running[0] -= 1
        return i * i

    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, executor.submit(job, i))) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {i: i * i for i in range(20)}
    assert set(seen) == {"test-h5"} and max(overlap) == 1


def test_errors_come_back_and_their_frames_release_objects_on_the_h5_thread() -> None:
    """An exception raised on the H5 thread reaches the caller; what its frames held is released on the H5 thread
    (so an h5py object never dies in another thread through a traceback), and the thread keeps serving."""
    executor = WriterThread("test-h5-err")
    _Tracked.released_on.clear()

    def fails() -> None:
        held = _Tracked()  # noqa: F841 - a local the traceback's frame would otherwise keep alive
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        executor.submit(fails)
    assert _Tracked.released_on == ["test-h5-err"]
    del info
    assert executor.submit(lambda: 7) == 7


def test_a_call_made_on_the_h5_thread_runs_inline() -> None:
    """A submitted function that submits again (store methods calling each other) does not deadlock."""
    executor = WriterThread("test-h5-inline")
    assert executor.submit(lambda: executor.submit(lambda: threading.current_thread().name)) == "test-h5-inline"
    assert not executor.on_thread()


def test_acall_from_async_code_under_a_limiter() -> None:
    """From an event loop, acall runs the function on the H5 thread through a worker thread of the given limiter,
    under a deadline, and concurrent callers are all served."""
    executor = h5_executor()

    async def main() -> list[str]:
        limiter = anyio.CapacityLimiter(1)
        names: list[str] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(_call, names, limiter)
        return names

    async def _call(names: list[str], limiter: anyio.CapacityLimiter) -> None:
        names.append(await executor.acall(lambda: threading.current_thread().name, limiter=limiter))

    assert anyio.run(main) == ["atlaspatch-h5"] * 5


def test_a_forked_child_gets_its_own_h5_thread() -> None:
    """After fork the parent's H5 thread does not exist in the child; the child starts its own on first use."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    code = (
        "import os, threading\n"
        "from atlaspatch_stream.outputs.h5thread import h5_executor\n"
        "parent = h5_executor(); parent.submit(lambda: None)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    child = h5_executor()\n"
        "    ok = child is not parent and child.submit(lambda: threading.current_thread().name) == 'atlaspatch-h5'\n"
        "    os._exit(0 if ok else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
