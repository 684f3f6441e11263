"""Prometheus metrics of the daemon, served only when asked and only on 127.0.0.1 or a Unix socket.

The registry is fed by a collector that reads the `StatusBoard` at scrape time, so there is one source of truth
and nothing to keep in step. Label values are bounded names (states, outcomes, encoders, stages, edges): a value
that looks like a path is refused, so slide paths (PHI, unbounded cardinality) can never become labels.

Serving: a small HTTP/1.0 responder on an anyio listener inside the caller's task group. uvicorn's `Server.serve`
installs process signal handlers (the library must not), and prometheus-client's own servers bind TCP only (and
default to 0.0.0.0); the exposition text itself comes from prometheus-client's `generate_latest`.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from ...errors import ConfigError

if TYPE_CHECKING:
    from .statusfile import StatusBoard

__all__ = ["Bind", "BoardCollector", "make_registry", "parse_bind", "render", "serve_metrics"]

_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_REQUEST_LIMIT = 8192
_REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Bind:
    """Where metrics are served: a loopback TCP port, or a Unix socket path."""

    port: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"127.0.0.1:{self.port}"


def parse_bind(text: str) -> Bind:
    """`127.0.0.1:PORT` or `unix:PATH`; anything else is refused with one line.

    Port 0 picks a free port (useful in tests); the address actually bound is reported by `serve_metrics`.

    Raises:
        ConfigError: any other address (another interface, a host name, IPv6 wildcard, a missing port).
    """
    refused = (f"--metrics {text!r} refused: only 127.0.0.1:PORT or unix:PATH are served "
               "(without --metrics the daemon listens on nothing)")
    if text.startswith("unix:"):
        if not text[len("unix:"):] or "\x00" in text:
            raise ConfigError(refused)
        return Bind(path=Path(text[len("unix:"):]))
    host, _, port = text.rpartition(":")
    # 127.0.0.1 spelled exactly so: short forms, leading zeros and IPv6 spellings are refused too.
    if host != "127.0.0.1" or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(refused)
    return Bind(port=int(port))


def _label(value: str) -> str:
    if not _LABEL.match(value) or "/" in value:
        raise ValueError(f"refused as a metric label (not a bounded name): {value[:40]!r}")
    return value


def _by_label(family: Any, values: Mapping[str, float]) -> Any:
    """`family` with one sample per entry of `values`, in name order (each name checked by `_label`)."""
    for name, value in sorted(values.items()):
        family.add_metric([_label(name)], value)
    return family


class BoardCollector:
    """A prometheus-client collector that reads a `StatusBoard` at each scrape (reference §3.3 metrics)."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board

    def describe(self) -> list[Any]:
        """No fixed description: the families are built at collect time."""
        return []

    def collect(self) -> Iterator[Any]:
        """The metric families, from the board's current values."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        b = self.board
        yield _by_label(GaugeMetricFamily("atlaspatch_slides_in_state", "Slides in the ledger, per state.",
                                          labels=["state"]), b.states)
        yield _by_label(CounterMetricFamily("atlaspatch_slides_completed", "Slides that left the pipeline, per outcome.",
                                            labels=["outcome"]), b.completed_total)
        yield _by_label(CounterMetricFamily("atlaspatch_patches", "Patches written, per encoder (rate() gives patches/s).",
                                            labels=["encoder"]), b.patches_total)
        yield _by_label(CounterMetricFamily("atlaspatch_stage_busy_seconds", "Seconds each stage spent working.",
                                            labels=["stage"]), b.stage_busy_s)
        yield _by_label(GaugeMetricFamily("atlaspatch_edge_fill_ratio", "Fill of each bounded stream (0-1).",
                                          labels=["edge"]), b.queue_fill)
        yield GaugeMetricFamily("atlaspatch_last_success_timestamp_seconds", "When the last slide was done.",
                                value=b.last_success_at or 0.0)
        yield GaugeMetricFamily("atlaspatch_watch_last_scan_timestamp_seconds", "When the last rescan finished.",
                                value=b.last_scan_at or 0.0)
        yield CounterMetricFamily("atlaspatch_watch_events", "Filesystem events received.", value=b.events_total)
        yield GaugeMetricFamily("atlaspatch_intake_paused", "1 while a system error pauses intake.",
                                value=1.0 if b.paused_because else 0.0)
        info = InfoMetricFamily("atlaspatch_build", "Version and settings fingerprint.")
        info.add_metric([], {"version": b.version, "config_fp": b.config_fp})
        yield info


def make_registry(board: StatusBoard) -> Any:
    """A fresh prometheus-client registry (never the process-global one) holding the board's collector."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(board))
    return registry


def render(registry: Any) -> bytes:
    """The Prometheus text exposition of `registry`."""
    from prometheus_client import generate_latest

    return bytes(generate_latest(registry))


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


async def _read_request(stream: ByteStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < _REQUEST_LIMIT:
        data += await stream.receive(_REQUEST_LIMIT)
    return data


def _answer(request: bytes, registry: Any) -> bytes:
    line = request.split(b"\n", 1)[0].decode("latin-1").split()
    if len(line) < 2:
        return _response("400 Bad Request", b"bad request\n", "text/plain")
    method, target = line[0], line[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n", "text/plain")
    if target == "/metrics":
        from prometheus_client import CONTENT_TYPE_LATEST

        body = render(registry)
        return _response("200 OK", b"" if method == "HEAD" else body, CONTENT_TYPE_LATEST)
    if target == "/healthz":
        return _response("200 OK", b"ok\n", "text/plain")
    return _response("404 Not Found", b"not found\n", "text/plain")


async def _handle(stream: ByteStream, registry: Any) -> None:
    async with stream:
        with anyio.move_on_after(_REQUEST_TIMEOUT_S), contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                                                          OSError):
            await stream.send(_answer(await _read_request(stream), registry))


def _stale_socket(path: Path) -> None:
    """A socket file left by a crash is removed; any other file at that path is refused."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"--metrics unix:{path}: a file that is not a socket is in the way")
        path.unlink()


async def serve_metrics(
    registry: Any, bind: Bind, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve `GET /metrics` (and `/healthz`) on `bind` until cancelled.

    Reports the bound address (`127.0.0.1:PORT` or `unix:PATH`) through `task_status`. A Unix socket is created
    0600 and removed on exit.
    """
    if bind.path is not None:
        _stale_socket(bind.path)
        bind.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        listener: Any = await anyio.create_unix_listener(bind.path, mode=0o600)
        where = str(bind)
    else:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=bind.port or 0)
        port = listener.listeners[0].extra(SocketAttribute.local_port)
        where = f"127.0.0.1:{port}"
    try:
        async with listener:
            task_status.started(where)
            await listener.serve(lambda stream: _handle(stream, registry))
    finally:
        if bind.path is not None:
            with contextlib.suppress(OSError):
                bind.path.unlink()
