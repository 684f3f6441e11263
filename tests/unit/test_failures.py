"""Failures are typed once, from the exception's class and errno (never its message), and travel as plain data."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch

from atlaspatch_stream.errors import OutputError, SlideError, failure_of, refused
from atlaspatch_stream.items import Failure, SlideJob, SlideResult


@pytest.mark.parametrize(("exc", "kind", "retry"), [
    (OutputError("full", kind="disk_full"), "disk_full", "system"),
    (OutputError("gone", kind="output_missing", systemic=False), "output_missing", "transient"),
    (OutputError("ro", kind="read_only"), "read_only", "system"),
    (SlideError("bad tile"), "unreadable", "slide"),
    (SlideError("no mag", kind="no_magnification"), "no_magnification", "slide"),
    (OSError(errno.ESTALE, "Stale file handle"), "input_io", "transient"),
    (TimeoutError("slow share"), "input_io", "transient"),
    (MemoryError(), "out_of_memory", "slide"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "out_of_memory", "slide"),
    (ValueError("not a tiff"), "unreadable", "slide"),
])
def test_failure_kind_and_retry_class_come_from_the_exception(exc: BaseException, kind: str, retry: str) -> None:
    """Each exception class (and errno) maps to one kind and retry class; `systemic` means retry class system."""
    failure = failure_of(exc, "read")
    assert (failure.stage, failure.kind, failure.retry) == ("read", kind, retry)
    assert failure.systemic is (retry == "system")


def test_the_message_text_is_never_read() -> None:
    """A message that merely mentions a full disk or a CUDA error does not make the failure systemic."""
    failure = failure_of(ValueError("No space left on device; CUDA error: device lost"), "open")
    assert (failure.kind, failure.retry) == ("unreadable", "slide")


def test_an_errno_in_the_cause_chain_counts() -> None:
    """The reader wrapped the OS error: its errno is found through __cause__."""
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as inner:
            raise SlideError("cannot read tile 3") from inner
    except SlideError as outer:
        assert failure_of(outer, "read").kind == "unreadable"  # our own SlideError keeps its kind
    wrapped = KeyError("tile")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert (failure_of(wrapped, "read").kind, failure_of(wrapped, "read").errno) == ("input_io", errno.EIO)


def test_a_failed_result_pickles_with_its_failure() -> None:
    """Results cross process boundaries (Ray): the failure survives as data."""
    result = SlideResult(SlideJob(1, Path("a.svs"), "a"), "failed", message="a.svs: full",
                         failure=refused("write", "disk_full", "system"), attempts=2)
    back = pickle.loads(pickle.dumps(result))
    assert back.failure == Failure("write", "disk_full", "system") and back.failure.systemic and back.attempts == 2
