"""The exception tree. A `SlideError` is a per-slide, recoverable failure; anything else is a bug or a broken run."""

from __future__ import annotations

import sys

import anyio

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


class SlideError(AtlasPatchError):
    """A problem confined to one slide (unreadable file, no magnification, corrupt tile, ...).

    It becomes a `SlideFailed` record; the run goes on.
    """

    def __init__(self, message: str, *, slide: str | None = None) -> None:
        super().__init__(message)
        self.slide = slide

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
    if isinstance(exc, SlideError):
        return exc.one_line() if exc.slide else f"{name}: {exc.one_line()}"
    return f"{name}: {describe(exc)}"


def single_error(group: BaseException) -> BaseException:
    """The one real error inside (possibly nested) task-group wrappers: cancellations and knock-on closures dropped.

    When several distinct errors happened at once, the first is returned (the others stay in its `__context__`
    chain's group, for debugging).
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    real = [e for e in leaves if not isinstance(e, cancelled | anyio.BrokenResourceError | anyio.ClosedResourceError)]
    chosen = (real or leaves)[0]
    if len(real) > 1:
        chosen.__context__ = group
    return chosen
