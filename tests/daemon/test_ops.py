"""Operations: sd_notify over a real datagram socket, Prometheus metrics (and no socket without them), the atomic
status file, JSON-lines logs and keyed pseudonyms. Files the daemon creates carry no group/other write bit."""

from __future__ import annotations

import io
import logging
import os
import socket
import stat
import threading
from pathlib import Path

import anyio
import orjson
import pytest

from atlaspatch_stream.daemon.ops.logs import (
    JsonLinesFormatter,
    Pseudonymizer,
    RedactPaths,
    TextFormatter,
    escape_control,
)
from atlaspatch_stream.daemon.ops.metrics import Bind, make_registry, parse_bind, render, serve_metrics
from atlaspatch_stream.daemon.ops.notify import Notifier
from atlaspatch_stream.daemon.ops.statusfile import (
    StatusBoard,
    run_status_file,
    write_status,
)
from atlaspatch_stream.errors import ConfigError
from tests.daemon.manual_clock import ManualClock

httpx = pytest.importorskip("httpx")
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families
pytestmark = pytest.mark.anyio


def _no_group_other_write(path: Path) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o022 == 0 and mode & 0o007 == 0, (path, oct(mode))


# ---------------------------------------------------------------------------------------------------------------
# sd_notify


def _receiver(path: str | bytes) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    return server


def test_notify_is_a_no_op_without_notify_socket() -> None:
    """No NOTIFY_SOCKET: every message reports "not sent", no socket is created, no watchdog interval."""
    notifier = Notifier(environ={"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()
    assert notifier._socket is None


def test_notify_messages_arrive_in_order_on_a_real_socket(tmp_path: Path) -> None:
    """READY=1 (with STATUS), STATUS=, WATCHDOG=1, STOPPING=1 arrive as datagrams in that order; STATUS is one line."""
    path = str(tmp_path / "notify.sock")
    server = _receiver(path)
    notifier = Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.ready("models loaded")
    assert notifier.status("3 queued\n1 running")
    assert notifier.watchdog()
    assert notifier.stopping("draining 1 slide")
    got = [server.recv(4096) for _ in range(4)]
    assert got == [b"READY=1\nSTATUS=models loaded", b"STATUS=3 queued 1 running", b"WATCHDOG=1",
                   b"STOPPING=1\nSTATUS=draining 1 slide"]
    notifier.close()
    server.close()


def test_notify_abstract_socket_and_watchdog_interval() -> None:
    """`@name` is the abstract socket `\\0name`; the watchdog interval is half of WATCHDOG_USEC, and none when
    WATCHDOG_PID names another process."""
    name = f"atlaspatch-test-{os.getpid()}"
    server = _receiver(b"\0" + name.encode())
    notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval_s == 2.0
    assert notifier.watchdog() and server.recv(64) == b"WATCHDOG=1"
    other = Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None
    notifier.close()
    server.close()


async def test_watchdog_pings_from_the_loop_only_while_healthy(tmp_path: Path) -> None:
    """With WATCHDOG_USEC = 0.2 s the loop pings every 0.1 s while healthy; once unhealthy (a stall) it stops."""
    path = str(tmp_path / "wd.sock")
    server = _receiver(path)
    server.setblocking(False)
    notifier = Notifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    healthy = True
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(notifier.run_watchdog, lambda: healthy)
            await anyio.sleep(0.55)
            healthy = False
            pings = _drain(server)
            await anyio.sleep(0.4)
            after = _drain(server)
            tg.cancel_scope.cancel()
    assert 4 <= len(pings) <= 7 and set(pings) == {b"WATCHDOG=1"}
    assert after == []
    notifier.close()
    server.close()


def _drain(server: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(server.recv(64))
        except BlockingIOError:
            return got


# ---------------------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "localhost:9464", "[::1]:9464", "::1:9464", "10.1.2.3:9464",
                                  "127.0.0.1", "127.0.0.1:99999", "unix:", "tcp://127.0.0.1:1", ":9464"])
def test_other_bind_addresses_are_refused_with_one_line(text: str) -> None:
    """Anything but 127.0.0.1:PORT or unix:PATH is refused with a single-line message naming the address."""
    with pytest.raises(ConfigError) as info:
        parse_bind(text)
    message = str(info.value)
    assert "\n" not in message and repr(text) in message


def test_accepted_binds() -> None:
    """Loopback with a port, and a Unix socket path."""
    assert parse_bind("127.0.0.1:9464") == Bind(port=9464)
    assert parse_bind("unix:/run/atlaspatch/metrics.sock") == Bind(path=Path("/run/atlaspatch/metrics.sock"))


def _board() -> StatusBoard:
    board = StatusBoard(version="0.1.0", config_fp="abc123", started_at=1000.0)
    board.set_states({"done": 7, "ready": 2, "running": 1})
    board.slide_finished("done", 1100.0, {"resnet50": 500, "uni_v1": 500})
    board.slide_finished("quarantined", 1101.0)
    board.add_stage_busy("encode", 12.5)
    board.set_queue_fill({"patches": 0.75})
    return board


def test_exposition_parses_and_carries_the_operator_metrics() -> None:
    """The text parses as Prometheus exposition format and holds slides by state, completions, patches per encoder,
    stage busy seconds, edge fill, last success and build info; a path-like label value is refused."""
    board = _board()
    families = {f.name: f for f in text_string_to_metric_families(render(make_registry(board)).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("atlaspatch_slides_in_state", (("state", "done"),))] == 7
    assert samples[("atlaspatch_slides_completed_total", (("outcome", "quarantined"),))] == 1
    assert samples[("atlaspatch_patches_total", (("encoder", "uni_v1"),))] == 500
    assert samples[("atlaspatch_stage_busy_seconds_total", (("stage", "encode"),))] == 12.5
    assert samples[("atlaspatch_edge_fill_ratio", (("edge", "patches"),))] == 0.75
    assert samples[("atlaspatch_last_success_timestamp_seconds", ())] == 1100.0
    assert samples[("atlaspatch_build_info", (("config_fp", "abc123"), ("version", "0.1.0")))] == 1
    board.set_states({"/data/scans/PATIENT-123.svs": 1})
    with pytest.raises(ValueError, match="refused as a metric label"):
        render(make_registry(board))


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _listening() -> dict[str, str]:
    """inode -> local address of every listening TCP/TCP6 socket and listening Unix socket of the machine."""
    found = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":
                found[parts[9]] = parts[1]
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "00010000":  # __SO_ACCEPTCON
            found[parts[6]] = parts[7] if len(parts) > 7 else "unix"
    return found


def _our_listeners() -> dict[str, str]:
    mine = _socket_inodes()
    return {inode: where for inode, where in _listening().items() if inode in mine}


async def test_no_listening_socket_unless_served(tmp_path: Path) -> None:
    """Building the board, the registry and the text opens no listening socket; serving on 127.0.0.1 opens exactly
    one, bound to 127.0.0.1 only; after cancellation none is left."""
    before = _our_listeners()
    registry = make_registry(_board())
    render(registry)
    assert _our_listeners() == before
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            where = await tg.start(serve_metrics, registry, Bind(port=0))
            port = int(where.rsplit(":", 1)[1])
            new = {i: a for i, a in _our_listeners().items() if i not in before}
            assert list(new.values()) == [f"0100007F:{port:04X}"]
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
                assert response.status_code == 200
                assert "atlaspatch_slides_in_state" in response.text
                list(text_string_to_metric_families(response.text))
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).text == "ok\n"
                assert (await client.get(f"http://127.0.0.1:{port}/other")).status_code == 404
                assert (await client.post(f"http://127.0.0.1:{port}/metrics")).status_code == 405
            tg.cancel_scope.cancel()
    assert _our_listeners() == before


async def test_metrics_on_a_unix_socket(tmp_path: Path) -> None:
    """`unix:PATH` serves the same text on a socket created 0600 (a stale one from a crash is replaced), which is
    removed on exit."""
    path = tmp_path / "run" / "metrics.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            assert await tg.start(serve_metrics, make_registry(_board()), Bind(path=path)) == f"unix:{path}"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path))) as client:
                response = await client.get("http://metrics/metrics")
            assert response.status_code == 200
            list(text_string_to_metric_families(response.text))
            tg.cancel_scope.cancel()
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------------------
# Status file


def test_status_file_is_replaced_atomically(tmp_path: Path) -> None:
    """A reader thread reading status.json in a tight loop while it is replaced 300 times never sees a partial
    file; the file is 0640 at most and no temporary file is left."""
    path = tmp_path / "state" / "status.json"
    board = _board()
    write_status(path, board.snapshot(1200.0))
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as exc:
                bad.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(300):
        board.set_states({"done": i})
        write_status(path, board.snapshot(1200.0 + i))
    stop.set()
    thread.join()
    assert bad == []
    assert orjson.loads(path.read_bytes())["states"] == {"done": 299}
    _no_group_other_write(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["status.json"]


def test_snapshot_content() -> None:
    """The snapshot carries states, throughput, queue fill, last success and why intake is paused."""
    board = _board()
    board.paused_because = "disk full"
    snap = board.snapshot(1200.0)
    assert snap["states"]["done"] == 7 and snap["queue_fill"] == {"patches": 0.75}
    assert snap["throughput"]["slides_per_hour"] > 0 and snap["throughput"]["patches_per_s"] > 0
    assert snap["last_success_at"].startswith("1970-01-01T00:18:20")
    assert snap["paused_because"] == "disk full"


async def test_status_loop_writes_every_interval(tmp_path: Path) -> None:
    """Under a manual clock, the loop writes at start and after each interval, and once more when cancelled."""
    path = tmp_path / "status.json"
    clock = ManualClock(start=5000.0)
    board = _board()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: run_status_file(path, board.snapshot, interval_s=5, clock=clock,
                                                               task_status=task_status))
            first = orjson.loads(path.read_bytes())["updated_at"]
            board.set_states({"done": 42})
            clock.advance(5)
            while orjson.loads(path.read_bytes())["states"] != {"done": 42}:
                await anyio.sleep(0.01)
            board.set_states({"done": 43})
            tg.cancel_scope.cancel()
    assert first == "1970-01-01T01:23:20+00:00"
    assert orjson.loads(path.read_bytes())["states"] == {"done": 43}


# ---------------------------------------------------------------------------------------------------------------
# Logs and pseudonyms


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("atlaspatch.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_escape_control_characters() -> None:
    """A slide name with a newline and an escape sequence stays on one JSON line; extra fields are kept."""
    name = "evil\nFAKE level=error\x1b[31m.svs"
    line = JsonLinesFormatter().format(_record("%s: seen -> ready", name, event="slide_transition", slide=name,
                                               state_to="ready"))
    assert "\n" not in line and "\x1b" not in line
    data = orjson.loads(line)
    assert data["event"] == "slide_transition" and data["slide"] == name and data["state_to"] == "ready"
    assert data["level"] == "info" and data["ts"].endswith("+00:00")
    text = TextFormatter("%(message)s").format(_record("%s", name))
    assert text == "evil\\nFAKE level=error\\x1b[31m.svs"
    assert escape_control("a\u2028b") == "a\\u2028b"


def test_pseudonym_key_is_created_private_and_stable(tmp_path: Path) -> None:
    """The key file is created 0600; the same key gives the same pseudonym (NFC-insensitive), another key another
    one; a key readable by others is refused."""
    key = tmp_path / "state" / "pseudonym.key"
    first = Pseudonymizer.from_key_file(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = Pseudonymizer.from_key_file(key)
    assert first.pseudonym("case/Caf\u00e9.svs") == again.pseudonym("case/Cafe\u0301.svs")
    assert first.pseudonym("a.svs").startswith("s_") and len(first.pseudonym("a.svs")) == 26
    other = tmp_path / "other.key"
    assert Pseudonymizer.from_key_file(other).pseudonym("a.svs") != first.pseudonym("a.svs")
    os.chmod(other, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Pseudonymizer.from_key_file(other)


def test_redaction_keeps_paths_out_of_logs(tmp_path: Path) -> None:
    """With RedactPaths on the handler, no path, relative path, file name or stem of a registered slide reaches the
    JSON log: not in the message, its arguments, extra fields or exception text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLinesFormatter())
    redact = RedactPaths()
    handler.addFilter(redact)
    logger = logging.getLogger("atlaspatch.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        absolute = "/data/in/case-77/ACC-2024-991.svs"
        pseudonym = Pseudonymizer(b"k" * 32).pseudonym("case-77/ACC-2024-991.svs")
        redact.add(pseudonym, absolute, "case-77/ACC-2024-991.svs", "ACC-2024-991.svs", "ACC-2024-991")
        logger.info("opening %s", absolute, extra={"slide": "case-77/ACC-2024-991.svs"})
        try:
            raise OSError(f"cannot read tile of {absolute}")
        except OSError:
            logger.exception("failed ACC-2024-991")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "ACC-2024-991" not in text and "case-77" not in text
    assert text.count(pseudonym) >= 3
    assert all(orjson.loads(line) for line in text.splitlines())
