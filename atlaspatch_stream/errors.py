"""The exception tree. A `SlideError` is a per-slide, recoverable failure; anything else is a bug or a broken run."""

from __future__ import annotations


class AtlasPatchError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AtlasPatchError):
    """Invalid settings: raised before any slide is opened."""


class WeightsError(AtlasPatchError):
    """Model weights cannot be found or loaded: raised before any slide is opened."""


class MissingExtraError(AtlasPatchError):
    """An optional dependency needed by the requested feature is not installed."""


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
