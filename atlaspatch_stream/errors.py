"""The exception tree. A `SlideError` is a per-slide, recoverable failure; anything else is a bug or a broken run."""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from .items import Failure, FailureKind, OutputKind, RetryClass

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # anyio depends on it there


class AtlasPatchError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AtlasPatchError):
    """Invalid settings: raised before any slide is opened."""


class WeightsError(AtlasPatchError):
    """Model weights cannot be found or loaded: raised before any slide is opened."""


class MissingExtraError(AtlasPatchError):
    """An optional dependency needed by the requested feature is not installed (`extra` names the pip extra)."""

    def __init__(self, message: str, *, extra: str | None = None) -> None:
        super().__init__(message)
        self.extra = extra


def import_extra(module: str, extra: str, needs: str) -> Any:
    """`module` imported, or MissingExtraError "`needs`: pip install 'atlaspatch-stream[`extra`]'" naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{needs}: pip install 'atlaspatch-stream[{extra}]'", extra=extra) from exc


class SlideError(AtlasPatchError):
    """A problem confined to one slide (unreadable file, no magnification, corrupt tile, ...).

    It becomes a `SlideFailed` record; the run goes on. `kind` is the failure kind it stands for.
    """

    def __init__(self, message: str, *, slide: str | None = None, kind: FailureKind = "unreadable") -> None:
        super().__init__(message)
        self.slide = slide
        self.kind: FailureKind = kind

    def one_line(self) -> str:
        """The message as a single line naming the slide."""
        text = " ".join(str(self.args[0]).split()) if self.args else type(self).__name__
        return f"{self.slide}: {text}" if self.slide else text


def describe(exc: BaseException) -> str:
    """A one-line description of a foreign exception, for per-slide failure records."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


class NotASlideError(AtlasPatchError):
    """A path given as a slide does not exist or is not a format we read (a service answers 400)."""


class PipelineFull(AtlasPatchError):
    """`submit_nowait()`/`process_nowait()` found the pipeline full (a service answers 503 with Retry-After)."""


class PipelineClosed(AtlasPatchError):
    """The pipeline takes no more slides: its input was closed, or it stopped on an error (`__cause__`)."""


# Exceptions that signal a bug in our code or a plugin's, never a bad slide: they propagate and stop the run.
# (KeyError/ValueError/IndexError are not here: slide libraries raise them on malformed files.)
BUG_TYPES: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)


def is_bug(exc: BaseException) -> bool:
    """Whether `exc` is a bug (stops the run) rather than a problem with one slide (becomes a record)."""
    return isinstance(exc, BUG_TYPES) and not isinstance(exc, AtlasPatchError)


def failure_message(name: str, exc: BaseException) -> str:
    """The one-line failure record of a slide: `<slide>: <cause>`, whatever raised."""
    if isinstance(exc, SlideError | OutputError):
        return exc.one_line() if exc.slide else f"{name}: {exc.one_line()}"
    return f"{name}: {describe(exc)}"


STOP_REASONS: dict[FailureKind, str] = {
    "disk_full": "output disk full",
    "quota": "output disk quota exceeded",
    "read_only": "output folder is read-only",
    "permission": "output folder is not writable",
    "output_missing": "output folder is gone",
    "output_io": "output I/O error",
    "device": "the feature device failed",
}

# OS errors met while reading a slide that a later try may not meet (a share that hiccups, a file being replaced).
_TRANSIENT_ERRNOS = frozenset({
    errno.ENOENT, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
    errno.EHOSTDOWN, errno.ENOTCONN, errno.EBUSY,
})


def failure_of(exc: BaseException, stage: str) -> Failure:
    """The typed failure of a slide whose `stage` raised `exc`: the one place an exception becomes a `Failure`.

    Decided by the exception's class and its errno (through the cause/context chain), never by its message.
    """
    if isinstance(exc, OutputError):
        return Failure(stage, exc.kind, "system" if exc.systemic else "transient", exc.errno)
    if isinstance(exc, SlideError):
        return Failure(stage, exc.kind, "slide")
    if isinstance(exc, MemoryError) or _is_torch(exc, "OutOfMemoryError"):
        return Failure(stage, "out_of_memory", "slide")
    if _is_torch(exc, "AcceleratorError"):
        return Failure(stage, "device", "system")
    number = next((n for e in _chain(exc) if (n := getattr(e, "errno", None)) in _TRANSIENT_ERRNOS), None)
    if number is not None or isinstance(exc, TimeoutError):
        return Failure(stage, "input_io", "transient", number)
    return Failure(stage, "unreadable", "slide")


def refused(stage: str, kind: FailureKind, retry: RetryClass = "slide") -> Failure:
    """A failure decided by our own checks rather than raised (a reuse refusal, an output-name collision)."""
    return Failure(stage, kind, retry)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its cause (or context), and so on; each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, in order; `exc` itself when it is none."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _is_torch(exc: BaseException, name: str) -> bool:
    """Whether `exc` is torch's exception class `name` (told by class, without importing torch)."""
    return any(cls.__name__ == name and cls.__module__.startswith("torch") for cls in type(exc).__mro__)


def single_error(group: BaseException) -> BaseException:
    """The one real error inside (possibly nested) task-group wrappers: cancellations and knock-on closures dropped.

    When several distinct errors happened at once, the first is returned (the others stay in its `__context__`
    chain's group, for debugging).
    """
    leaves = _leaves(group)
    cancelled = anyio.get_cancelled_exc_class()
    real = [e for e in leaves if not isinstance(e, cancelled | anyio.BrokenResourceError | anyio.ClosedResourceError)]
    chosen = (real or leaves)[0]
    if len(real) > 1:
        chosen.__context__ = group
    return chosen



_KIND_OF_ERRNO: dict[int, OutputKind] = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "quota",
    errno.EROFS: "read_only",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ENOENT: "output_missing",
    errno.ENOTDIR: "output_missing",
    errno.EIO: "output_io",
    errno.ESTALE: "output_io",
    errno.EFBIG: "output_io",
}
# HDF5 reports the OS failure inside its message ("... errno = 28, error message = 'No space left on device' ...");
# h5py raises OSError (errno set only for some calls) or, from a destructor, RuntimeError with only the text.
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|\[Errno (\d+)\]")


class OutputError(AtlasPatchError):
    """Writing the output failed at the OS level: disk full, quota, read-only, no permission, gone, or I/O error.

    A slide that hits it fails with `one_line()`; when `systemic` is true the cause is the output filesystem itself,
    so later slides would fail the same way (`process` stops starting slides, the daemon pauses intake).

    Attributes:
        kind: What failed (`disk_full`, `quota`, `read_only`, `permission`, `output_missing`, `output_io`): the
            slide's failure kind.
        path: The file or folder concerned.
        errno: The OS error number, when known.
        slide: The slide name, when known.
        systemic: True when the output filesystem itself is the problem (full, read-only, gone,
            failing), not one file.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: OutputKind,
        path: Path | None = None,
        errno: int | None = None,
        slide: str | None = None,
        systemic: bool = True,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.errno = errno
        self.slide = slide
        self.systemic = systemic

    def one_line(self) -> str:
        """The message as a single line, naming the slide when known."""
        text = " ".join(str(self.args[0]).split())
        return f"{self.slide}: {text}" if self.slide else text


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use on `folder`'s filesystem (statvfs `f_bavail`); None if unknown."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def megabytes(n: int | None) -> str:
    """`n` bytes as `3.2 MB` (decimal megabytes, one decimal)."""
    return "? MB" if n is None else f"{n / 1e6:.1f} MB"


def errno_of(exc: BaseException) -> int | None:
    """The OS error number behind `exc`, from `errno`, HDF5's message text, or its cause/context chain.

    HDF5 loses the errno of the OS call that failed under it but keeps it in its message ("errno = 28"): reading it
    there is part of translating h5py's exceptions at the output edge, the one place message text is looked at.
    """
    for current in _chain(exc):
        number = getattr(current, "errno", None)
        if isinstance(number, int) and number in _KIND_OF_ERRNO:
            return number
        match = _ERRNO_IN_TEXT.search(str(current))
        if match and int(match.group(1) or match.group(2)) in _KIND_OF_ERRNO:
            return int(match.group(1) or match.group(2))
    return None


def output_error(exc: BaseException, path: Path, *, slide: str | None = None) -> OutputError | None:
    """Translate an OS or h5py failure while writing `path` (file or folder); None when it is not an output error.

    Args:
        exc: The exception raised (OSError, h5py's OSError/RuntimeError, or one chained to them).
        path: The output file or folder being written; its folder is probed for free space and writability.
        slide: The slide name, for the message.
    """
    if isinstance(exc, OutputError):
        return exc
    number = errno_of(exc)
    if number is None:
        return None
    kind = _KIND_OF_ERRNO[number]
    folder = _existing_folder(path)
    message, systemic = _describe(kind, number, path, folder)
    return OutputError(message, kind=kind, path=path, errno=number, slide=slide, systemic=systemic)


def disk_full_before(needed: int, free: int, folder: Path, *, slide: str | None = None) -> OutputError:
    """The pre-flight failure: the output would not fit (`needs ~X MB, Y MB free on <folder>`)."""
    return OutputError(
        f"output disk full (needs ~{megabytes(needed)}, {megabytes(free)} free on {folder})",
        kind="disk_full", path=folder, errno=errno.ENOSPC, slide=slide,
    )


def _existing_folder(path: Path) -> Path:
    """`path`'s nearest existing ancestor folder (the output folder itself may be what vanished)."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _describe(kind: OutputKind, number: int, path: Path, folder: Path) -> tuple[str, bool]:
    """(one-line message, systemic) for an OS failure on `path`."""
    if kind == "disk_full":
        return f"output disk full ({megabytes(free_bytes(folder))} free on {folder})", True
    if kind == "quota":
        return f"output disk quota exceeded on {folder}", True
    if kind == "read_only":
        return f"output filesystem is read-only ({folder})", True
    if kind == "permission":
        # Only this file is refused when its folder is still writable (e.g. someone else's H5 in a shared output).
        writable = os.access(folder, os.W_OK)
        return f"no permission to write the output ({path})", not writable
    if kind == "output_missing":
        if path.parent.exists():
            return f"output file vanished while being written ({path})", False
        return f"output folder is missing ({path.parent})", True
    return f"output I/O error on {path} ({os.strerror(number)})", True
