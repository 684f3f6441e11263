"""`SimulatedOps`: CUDA stream and event semantics on the CPU, for testing code that orders work with events.

Each stream is a queue of deferred work; `record` and `wait` put markers in it with CUDA's rule (a wait refers to the
event's latest record at the time of the wait). Nothing runs at launch: work runs when a host thread waits
(`synchronize`), and then streams advance one item at a time in a seeded random order, each only past waits whose
events have fired. So any ordering the code fails to state with events can happen here, and shows as wrong results
(a buffer read before it is written, or overwritten before it is read). A deadlock (a host wait no stream can ever
satisfy) raises instead of hanging.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backends.cuda_streams import DeviceOps


@dataclass(eq=False)
class SimStream:
    """A stream: a FIFO of ("run", work) | ("record", event, generation) | ("wait", event, generation)."""

    name: str
    items: deque[tuple[Any, ...]] = field(default_factory=deque)


@dataclass(eq=False)
class SimEvent:
    """An event: `recorded` counts records queued, `fired` counts records that have executed."""

    recorded: int = 0
    fired: int = 0


class SimulatedOps(DeviceOps):
    """`backends.cuda_streams.DeviceOps` with deferred, randomly interleaved streams on the CPU.

    Args:
        seed: Seeds the interleaving (each seed is one schedule).

    Attributes:
        log: What ran, in order: ("run", stream name) and ("record", stream name), for assertions.
    """

    device = "cpu"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._streams: list[SimStream] = []
        self._lock = threading.RLock()
        self.log: list[tuple[str, str]] = []

    def stream(self, priority: int) -> SimStream:
        """A new empty stream."""
        with self._lock:
            s = SimStream(f"s{len(self._streams)}")
            self._streams.append(s)
            return s

    def event(self) -> SimEvent:
        """A new event (never recorded: waiting on it passes at once, as in CUDA)."""
        return SimEvent()

    def launch(self, stream: SimStream, work: Callable[[], None]) -> None:
        """Queue `work`; it runs later, when the schedule reaches it."""
        with self._lock:
            stream.items.append(("run", work))

    def record(self, event: SimEvent, stream: SimStream) -> None:
        """Queue a record of `event`."""
        with self._lock:
            event.recorded += 1
            stream.items.append(("record", event, event.recorded))

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        """Queue a wait for `event`'s latest record so far."""
        with self._lock:
            stream.items.append(("wait", event, event.recorded))

    def follow_current(self, stream: SimStream) -> None:
        """Nothing: host threads here have no stream of their own; their torch ops ran already."""

    def synchronize(self, event: SimEvent) -> None:
        """Advance streams (randomly interleaved) until `event`'s latest record has executed."""
        with self._lock:
            target = event.recorded
            while event.fired < target:
                if not self._step():
                    raise RuntimeError("simulated deadlock: a host wait that no stream can satisfy")

    def query(self, event: SimEvent) -> bool:
        """True when `event`'s latest record has executed."""
        with self._lock:
            return event.fired >= event.recorded

    def empty(self, shape: tuple[int, ...], dtype: Any, pinned: bool) -> Any:
        """A CPU tensor filled with a marker value (255 / NaN), so reads of unwritten memory show."""
        import torch

        t = torch.empty(shape, dtype=dtype)
        t.fill_(255 if not dtype.is_floating_point else float("nan"))
        return t

    def drain(self) -> None:
        """Run everything queued (end of a test)."""
        with self._lock:
            while self._step():
                pass

    def _step(self) -> bool:
        ready = [s for s in self._streams if s.items and self._runnable(s.items[0])]
        if not ready:
            return False
        stream = self._rng.choice(ready)
        item = stream.items.popleft()
        if item[0] == "run":
            item[1]()
            self.log.append(("run", stream.name))
        elif item[0] == "record":
            item[1].fired = max(item[1].fired, item[2])
            self.log.append(("record", stream.name))
        return True

    @staticmethod
    def _runnable(item: tuple[Any, ...]) -> bool:
        return item[0] != "wait" or item[1].fired >= item[2]
