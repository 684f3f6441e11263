"""systemd notifications (sd_notify(3)): READY, STATUS, WATCHDOG, STOPPING, sent as datagrams to $NOTIFY_SOCKET.

Our own few lines instead of a dependency: `sdnotify` was last released in 2017 and `systemd-python` needs the
libsystemd headers (reference `service-and-daemon.md` §3.2). Without `NOTIFY_SOCKET` every call is a no-op, so the
daemon runs the same under systemd, in a terminal and in tests. The socket is non-blocking: a full queue drops a
notification instead of stalling the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping

from ..clock import Clock, SystemClock

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """`/run/...` as is, `@name` as the abstract socket "\\0name"; other schemes (vsock:) are not supported."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages; a no-op when the environment names no socket.

    Args:
        environ: where to read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (default `os.environ`).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        if env.get("NOTIFY_SOCKET") and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path; systemd notifications are off",
                        env["NOTIFY_SOCKET"])
        self._socket: socket.socket | None = None
        self._watchdog_usec = int(env["WATCHDOG_USEC"]) if env.get("WATCHDOG_USEC", "").isdigit() else 0
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if watchdog_pid.isdigit() and int(watchdog_pid) != os.getpid():
            self._watchdog_usec = 0  # the watchdog is meant for another process

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of `WATCHDOG_USEC` in seconds (systemd's advice), or None without a watchdog."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec and self.enabled else None

    def send(self, **fields: str | int) -> bool:
        """One datagram of `KEY=value` lines; True when it was sent (False when disabled or dropped)."""
        if self._address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8", "replace")
        try:
            self._socket.sendto(payload, self._address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError, OSError) as exc:
            log.debug("sd_notify dropped (%s)", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (after models are loaded, the ledger is open and the first scan is done)."""
        return self.send(READY=1, **({"STATUS": _one_line(status)} if status else {}))

    def status(self, text: str) -> bool:
        """STATUS=<one line> (what `systemctl status` shows)."""
        return self.send(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 (first shutdown signal)."""
        return self.send(STOPPING=1, **({"STATUS": _one_line(status)} if status else {}))

    async def run_watchdog(self, healthy: Callable[[], bool] = lambda: True, clock: Clock | None = None) -> None:
        """Ping WATCHDOG=1 from the event loop every `watchdog_interval_s` while `healthy()`; returns at once
        without a watchdog.

        Pinging from a loop task means a wedged loop stops the pings; `healthy` lets the caller also stop them when
        slides are queued but nothing advances, so systemd restarts a stalled daemon.
        """
        interval = self.watchdog_interval_s
        if interval is None:
            return
        clock = clock or SystemClock()
        while True:
            if healthy():
                self.watchdog()
            await clock.sleep_until(clock.now() + interval)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())

