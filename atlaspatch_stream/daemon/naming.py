"""Output names for watched slides: collision-free, safe to join under the output root.

Upstream names every output `<out>/patches/<Path.stem>.h5`, so `a/x.svs`, `b/x.svs` and `x.ndpi` all write `x.h5`
(reference `upstream-atlaspatch.md` §2.1). Names derived from an untrusted drop folder must also never escape the
output root (reference `service-and-daemon.md` §6.2). The rule here:

- the first slide to claim a stem keeps upstream's name, so a flat drop folder gives exactly upstream's files;
- a later slide whose stem is taken gets `<stem>__<8 hex of its slide ID>`, stable across restarts because the
  ledger records every assignment (and keeps it while a slide is missing, so its kept H5 is never overwritten);
- control characters, separators, `.`/`..` and over-long names are replaced, so a stem is one safe path component.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable

__all__ = ["MAX_STEM_BYTES", "clean_stem", "unique_stem"]

MAX_STEM_BYTES = 160  # leaves room for ".h5", "_mask_bw.png" and temp suffixes under the usual 255-byte limit


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def clean_stem(stem: str) -> str:
    """A stem that is one safe path component.

    Control characters, NUL, `/` and `\\` become `_`; leading dots are dropped (no hidden outputs); an empty
    result, `.` or `..` becomes a hash; names over `MAX_STEM_BYTES` UTF-8 bytes are cut and end in a hash.
    """
    text = unicodedata.normalize("NFC", stem)
    text = "".join("_" if (ord(c) < 32 or c in "/\\\x7f") else c for c in text).lstrip(".").strip()
    if not text:
        return "slide-" + _digest(stem, 12)
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_STEM_BYTES:
        return text
    head = raw[: MAX_STEM_BYTES - 18].decode("utf-8", "ignore")
    return f"{head}-{_digest(stem, 16)}"


def unique_stem(slide_id: str, stem: str, taken: Callable[[str], bool]) -> str:
    """The output stem for `slide_id`: `clean_stem(stem)`, or with a hash of the slide ID when that is taken.

    Args:
        slide_id: the slide's ID (its path relative to the watch root).
        stem: the natural stem (`Path.stem`, the DICOM folder's name, or a pseudonym).
        taken: whether another slide already owns a stem.
    """
    base = clean_stem(stem)
    if not taken(base):
        return base
    for length in (8, 16, 64):
        candidate = clean_stem(f"{base}__{_digest(slide_id, length)}")
        if not taken(candidate):
            return candidate
    raise ValueError(f"no free output name for {slide_id!r}")

