"""Log lines for a daemon: JSON lines on orjson, control characters escaped, and keyed path pseudonyms.

The library only logs through `logging.getLogger(__name__)` with `extra=` fields; `install_handler` is for the CLI,
which owns the process. File names often embed accession numbers, so `Pseudonymizer` maps a slide's relative path
to an HMAC under a site key (created 0600 on first use); `RedactPaths` rewrites known paths inside log records,
exception text included.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import sys
import unicodedata
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import orjson

from ...errors import ConfigError

__all__ = ["JsonLinesFormatter", "Pseudonymizer", "RedactPaths", "TextFormatter", "escape_control", "install_handler"]

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "taskName"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
KEY_BYTES = 32


def escape_control(text: str) -> str:
    """Control characters (newlines included) as visible escapes, so a file name cannot forge a log line."""
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return _CONTROL.sub(lambda m: named.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                                            else f"\\u{ord(m.group()):04x}"), text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339 UTC), level, logger, event, message, the record's extra fields.

    orjson escapes every control character inside strings, so a path with a newline stays on its line.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        extras = _extras(record)
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": extras.pop("event", None) or "log",
            "message": record.getMessage(),
            **extras,
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and redacted) by a filter
            line["exc"] = record.exc_text
        text = orjson.dumps(line, default=str).decode()
        # orjson leaves U+2028/U+2029 raw (valid JSON); some log viewers break lines there.
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class TextFormatter(logging.Formatter):
    """Plain lines (`logging.Formatter`), with control characters escaped after formatting."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record with control characters escaped (the traceback keeps its own lines)."""
        exc_text, record.exc_text = record.exc_text, None
        exc_info, record.exc_info = record.exc_info, None
        try:
            text = escape_control(super().format(record))
        finally:
            record.exc_info, record.exc_text = exc_info, exc_text
        if exc_info:
            text += "\n" + self.formatException(exc_info)
        elif exc_text:  # already formatted (and redacted) by a filter
            text += "\n" + exc_text
        return text


def _read_key(path: Path) -> bytes:
    info = os.stat(path)
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(f"pseudonym key {path}: readable by others or writable by the group; chmod 600 it")
    key = path.read_bytes()
    if len(key) < 16:
        raise ConfigError(f"pseudonym key {path}: too short ({len(key)} bytes; need at least 16)")
    return key


def _create_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class Pseudonymizer:
    """Keyed pseudonyms of slide paths: `s_` + 24 hex of HMAC-SHA256(site key, relative path, NFC).

    The same key gives the same pseudonym on every host and restart; without the key a pseudonym reveals nothing.

    Args:
        key: the site key (at least 16 bytes).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("pseudonym key too short (need at least 16 bytes)")
        self._key = key

    @classmethod
    def from_key_file(cls, path: Path) -> Pseudonymizer:
        """Load the key at `path`, creating it (32 random bytes, mode 0600) when absent.

        Raises:
            ConfigError: the key is readable by others, group-writable, or too short.
        """
        path = Path(path)
        try:
            return cls(_create_key(path))
        except FileExistsError:
            return cls(_read_key(path))

    def pseudonym(self, slide_id: str) -> str:
        """The pseudonym of a slide ID (its path relative to the watch root)."""
        message = unicodedata.normalize("NFC", slide_id).encode("utf-8", "surrogateescape")
        return "s_" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:24]


class RedactPaths(logging.Filter):
    """Replaces known slide paths (and their file names) by pseudonyms in every record passing a handler.

    Register each slide with `add` before it is logged about; the mapping keeps the `capacity` most recent slides.
    Message, arguments, string extra fields and exception text are all rewritten.
    """

    def __init__(self, capacity: int = 4096) -> None:
        super().__init__()
        self._names: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._pattern: re.Pattern[str] | None = None

    def add(self, pseudonym: str, *spellings: str | os.PathLike[str]) -> None:
        """Register the spellings of one slide (absolute path, relative path, file name, stem)."""
        for spelling in spellings:
            text = os.fspath(spelling)
            if len(text) >= 3:
                self._names[text] = pseudonym
                self._names.move_to_end(text)
        while len(self._names) > self._capacity:
            self._names.popitem(last=False)
        self._pattern = None

    def redact(self, text: str) -> str:
        """`text` with every registered spelling replaced (longest first, so a path wins over its file name)."""
        if not self._names:
            return text
        if self._pattern is None:
            ordered = sorted(self._names, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))
        return self._pattern.sub(lambda m: self._names[m.group()], text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        record.msg = self.redact(record.getMessage())
        record.args = None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, self.redact(value))
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install_handler(
    log_format: str, *, stream: IO[str] | None = None, redact: RedactPaths | None = None, level: int = logging.INFO
) -> logging.Handler:
    """For the CLI only: one stderr handler on the root logger, text or JSON lines, optionally redacting paths."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if redact is not None:
        handler.addFilter(redact)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
