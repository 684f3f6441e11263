"""Has a slide fully arrived? Format-aware completeness checks that read metadata only, never pixels.

A folder watcher cannot trust a quiet period alone: Windows `CopyFile` sets the final size before it writes the
data, and NFS attribute caching hides growth (reference `service-and-daemon.md` §1.3). So after the quiet period a
slide must also pass a check for its format:

- TIFF family (SVS, NDPI, generic TIFF, SCN, BIF): every IFD of the chain is written and inside the file, the chain
  terminates, every tile/strip byte range lies inside the file, and sampled tiles of compressed pages are not still
  zero (the pre-sized-copy case, where the size is final long before the bytes are).
- DICOM series folder: every instance parses up to its pixel data, and the pixel data element (native, or every
  encapsulated fragment) lies inside the file.
- MRXS: `name.mrxs` plus the folder `name/` holding `Slidedat.ini` and every file the ini names.
- Plain images: the format's end marker is present (PNG `IEND`, JPEG `EOI`, GIF trailer, BMP/WebP stated size).

What a check cannot see, the quiet period must: the bytes of uncompressed data (native DICOM pixel data,
uncompressed TIFF pages, BMP) may legitimately be zeros, so a pre-sized copy of those is judged by its size only.

The outcome is `ready`, `not_ready` (still arriving: try again later; never a failure) or `broken` (a structural
contradiction that more bytes cannot fix). The module also gives a slide's identity: the path relative to the watch
root, its size and mtime, and a quick fingerprint (a hash of the first and last MiB and the size of each member).
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import stat
import struct
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ..errors import describe
from ..formats import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, TIFF_EXTENSIONS

__all__ = [
    "Readiness",
    "Signature",
    "SlideIdentity",
    "SlideKind",
    "check_slide",
    "is_temporary_name",
    "members",
    "quick_fingerprint",
    "relative_id",
    "signature",
    "slide_identity",
]

log = logging.getLogger(__name__)

SlideKind = Literal["file", "dicom", "mrxs"]
ReadinessState = Literal["ready", "not_ready", "broken"]

MIB = 1 << 20
# Names a writer uses while a file is still being written: never taken as slides, never counted as members.
TEMPORARY_GLOBS = ("*.part", "*.tmp", "*.partial", "~*")
_OS_LITTER = frozenset({"thumbs.db", "desktop.ini"})

# TIFF compressions whose encoded blocks start and end with non-zero framing (markers, checksums, end codes), so a
# block still made of zeros has not been written yet. Uncompressed and PackBits data may legitimately be zeros.
_FRAMED_COMPRESSIONS = frozenset({5, 6, 7, 8, 32946, 33003, 33004, 33005, 33007, 34712, 34892, 50000, 50001, 50002})
_SAMPLED_BLOCKS = 32  # blocks per page whose first and last bytes are read (plus the first and the last block)
_PROBE = 16  # bytes read at each end of a sampled block
_MAX_IFDS = 65536
_MAX_TAGS = 4096  # tifffile's own bound on a sane tag count


@dataclass(frozen=True)
class Readiness:
    """The outcome of a completeness check.

    Attributes:
        state: "ready", "not_ready" (still arriving: check again later) or "broken" (will not become ready).
        reason: one line saying why, naming the part of the slide concerned (empty when ready).
    """

    state: ReadinessState
    reason: str = ""

    @property
    def ready(self) -> bool:
        """True when the slide may be processed."""
        return self.state == "ready"


READY = Readiness("ready")


def _not_ready(reason: str) -> Readiness:
    return Readiness("not_ready", reason)


def _broken(reason: str) -> Readiness:
    return Readiness("broken", reason)


@dataclass(frozen=True)
class Signature:
    """What must stay unchanged through the quiet period: over all member files of the slide.

    `ctime_ns` is included because a copy that resets mtime to the source's still moves ctime on the target.
    """

    count: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class SlideIdentity:
    """Who a slide is and which version of it we saw.

    Attributes:
        slide_id: the path relative to the watch root, NFC-normalised, `/`-separated.
        size: bytes over all member files.
        mtime_ns: the newest member mtime.
        fingerprint: `quick_fingerprint` of the members.
    """

    slide_id: str
    size: int
    mtime_ns: int
    fingerprint: str


# ---------------------------------------------------------------------------------------------------------------
# Names, members, signatures, identity


_TEMPORARY = re.compile(
    "|".join([r"\..*", *(fnmatch.translate(g) for g in TEMPORARY_GLOBS), *(re.escape(n) for n in _OS_LITTER)]),
    re.IGNORECASE | re.DOTALL,
)


def is_temporary_name(name: str) -> bool:
    """True for names a writer or the OS uses for unfinished or irrelevant files: never slides, never members.

    Hidden names (`.x`, which covers rsync's `.name.XXXXXX`, NFS silly-renames and AppleDouble `._x`), `*.part`,
    `*.tmp`, `*.partial`, `~*` (Office's `~$x` too), `Thumbs.db` and `desktop.ini`; matched case-insensitively.
    """
    return _TEMPORARY.fullmatch(name) is not None


def relative_id(root: Path, path: Path) -> str:
    """The slide ID of `path`: relative to `root`, `/`-separated, NFC-normalised ("." for the root itself)."""
    return unicodedata.normalize("NFC", Path(os.path.relpath(path, root)).as_posix())


def _mrxs_folder(path: Path) -> Path:
    return path.with_suffix("")


def members(path: Path, kind: SlideKind) -> list[Path]:
    """The files that make up a slide, sorted by name (temporary and hidden names left out).

    Args:
        path: the slide: a file, a DICOM series folder, or a `.mrxs` file.
        kind: which of the three.

    Returns:
        file: [path]; dicom: the folder's `.dcm`/`.dicom` files; mrxs: the `.mrxs` and every file of its folder.
    """
    if kind == "file":
        return [path]
    folder = path if kind == "dicom" else _mrxs_folder(path)
    found: list[Path] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as entries:
        for entry in entries:
            if is_temporary_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            if kind == "mrxs" or Path(entry.name).suffix.lower() in DICOM_EXTENSIONS:
                found.append(Path(entry.path))
    found.sort()
    return [path, *found] if kind == "mrxs" else found


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[BinaryIO]:
    """Open a regular file for reading without blocking on a FIFO (a file swapped since the scan)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            yield handle
    finally:
        if fd >= 0:
            os.close(fd)


def _fstat(path: Path) -> os.stat_result:
    """open + fstat rather than stat: on NFS the open revalidates cached attributes (close-to-open)."""
    with _open_regular(path) as handle:
        return os.fstat(handle.fileno())


def signature(path: Path, kind: SlideKind) -> Signature:
    """The quiet-period signature of a slide, from open + fstat of each member.

    For folders (DICOM, MRXS) the folder's own mtime also counts, so a file added or removed shows as a change.

    Raises:
        OSError: a member vanished or cannot be opened (the caller treats that as "still changing").
    """
    stats = [_fstat(p) for p in members(path, kind)]
    folder_ns = 0
    if kind != "file":
        folder_ns = os.stat(path if kind == "dicom" else _mrxs_folder(path)).st_mtime_ns
    return Signature(
        count=len(stats),
        size=sum(s.st_size for s in stats),
        mtime_ns=max([folder_ns, *(s.st_mtime_ns for s in stats)]),
        ctime_ns=max([0, *(s.st_ctime_ns for s in stats)]),
    )


def quick_fingerprint(paths: Sequence[Path], base: Path | None = None) -> str:
    """A hash of each member's name, size, first MiB and last MiB (OpenSlide's quickhash idea).

    Reading two MiB per file instead of the whole slide keeps this cheap on network shares, and still changes when a
    slide is rescanned under the same name.

    Args:
        paths: the member files.
        base: names are hashed relative to this folder (default: each file's name).
    """
    digest = hashlib.sha256(b"qf1")
    for path in sorted(paths):
        name = os.path.relpath(path, base) if base is not None else path.name
        with _open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(unicodedata.normalize("NFC", name).encode("utf-8", "surrogateescape"))
            digest.update(struct.pack("<Q", size))
            digest.update(handle.read(MIB))
            if size > MIB:
                handle.seek(max(MIB, size - MIB))
                digest.update(handle.read(MIB))
    return "qf1:" + digest.hexdigest()[:32]


def slide_identity(root: Path, path: Path, kind: SlideKind) -> SlideIdentity:
    """The identity of the slide at `path` under the watch root `root` (reads up to 2 MiB per member file)."""
    files = members(path, kind)
    stats = [_fstat(p) for p in files]
    base = path if kind == "dicom" else path.parent
    return SlideIdentity(
        slide_id=relative_id(root, path),
        size=sum(s.st_size for s in stats),
        mtime_ns=max([0, *(s.st_mtime_ns for s in stats)]),
        fingerprint=quick_fingerprint(files, base),
    )


# ---------------------------------------------------------------------------------------------------------------
# The dispatcher


def check_slide(path: Path, kind: SlideKind) -> Readiness:
    """Is the slide at `path` complete? Never decodes pixels.

    An I/O error (the file vanished, a share hiccup) is "not ready": the caller looks again later.
    """
    try:
        if kind == "dicom":
            return _check_dicom_series(path)
        if kind == "mrxs":
            return _check_mrxs(path)
        suffix = path.suffix.lower()
        if suffix in TIFF_EXTENSIONS:
            return _check_tiff(path)
        if suffix in IMAGE_EXTENSIONS:
            return _check_image(path)
        # VMS/VMU and other OpenSlide-only single files: no cheap structural check; the quiet period decides.
        return READY
    except FileNotFoundError:
        return _not_ready("a file of the slide vanished")
    except OSError as exc:
        return _not_ready(f"cannot read yet ({describe(exc)})")
    except Exception as exc:  # untrusted input: a parser's surprise is this slide's problem, not the daemon's
        log.debug("completeness check of %s raised", path.name, exc_info=True)
        return _broken(f"metadata cannot be parsed ({describe(exc)})")


# ---------------------------------------------------------------------------------------------------------------
# TIFF family


def _first_ifd(fd: int, size: int) -> int | Readiness:
    """Where the first IFD is, once the header and that IFD with its values are written (a writer may patch the
    header last); else why not.

    The first IFD is checked before tifffile parses the first page, which it does on opening and which would log
    errors on a half-written directory.
    """
    import tifffile

    head = os.pread(fd, 16, 0)
    if len(head) < 8 or not any(head):
        return _not_ready("TIFF header not written yet")
    order = head[:2]
    if order not in (b"II", b"MM"):
        return _broken("not a TIFF file (bad byte-order mark)")
    end = "<" if order == b"II" else ">"
    version = struct.unpack(end + "H", head[2:4])[0]
    if version == 43 and len(head) < 16:
        return _not_ready("BigTIFF header not written yet")
    if version not in (42, 43):
        return _broken(f"not a TIFF file (version {version})")
    big = version == 43
    first = struct.unpack(end + "Q", head[8:16])[0] if big else struct.unpack(end + "I", head[4:8])[0]
    if first == 0:
        return _not_ready("first IFD not written yet")
    if first < (16 if big else 8):
        return _broken(f"first IFD offset {first} points into the header")
    fmt = getattr(tifffile.TIFF, ("BIG" if big else "CLASSIC") + ("_LE" if end == "<" else "_BE"))
    found = _ifd(fd, fmt, first, size, _Chain([]), "first IFD")
    return found if isinstance(found, Readiness) else first


# Bytes per value of each TIFF field type (TIFF 6 and BigTIFF); unknown types are skipped, as tifffile does.
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_SUBIFDS = 330
_JPEG_TABLES = 347  # an abbreviated JPEG stream: ends with EOI


@dataclass
class _Chain:
    """What the walk found: IFD offsets, and the out-of-line tag value that ends last in the file."""

    offsets: list[int]
    last_value: tuple[int, int, int] = (0, 0, 0)  # (tag code, start, end)


def _entries(fd: int, fmt: Any, offset: int, count: int, size: int, chain: _Chain) -> Readiness | list[int]:
    """Check the out-of-line values of one IFD's entries; returns the SubIFD offsets it names.

    tifffile drops a tag whose value lies beyond the end with only a log message, so the entries are read here.
    """
    big = fmt.tagsize == 20
    entry = struct.Struct(fmt.byteorder + ("HHQ8s" if big else "HHI4s"))
    pointer = struct.Struct(fmt.byteorder + ("Q" if big else "I"))
    inline = 8 if big else 4
    raw = os.pread(fd, count * fmt.tagsize, offset + fmt.tagnosize)
    subifds: list[int] = []
    for i in range(count):
        code, dtype, number, value = entry.unpack_from(raw, i * fmt.tagsize)
        if not (code or dtype or number):
            return _not_ready(f"the IFD at byte {offset} is not fully written yet")
        width = _TYPE_SIZES.get(dtype)
        if width is None:
            continue
        nbytes = width * number
        start = pointer.unpack(value)[0] if nbytes > inline else -1
        if start >= 0 and start + nbytes > size:
            return _not_ready(f"tag {code} of the IFD at byte {offset} ends at byte {start + nbytes}, the file has {size}")
        if start >= 0 and start + nbytes > chain.last_value[2]:
            chain.last_value = (code, start, start + nbytes)
        if code == _SUBIFDS and width in (4, 8):
            data = os.pread(fd, nbytes, start) if start >= 0 else value[:nbytes]
            subifds += list(struct.unpack(f"{fmt.byteorder}{number}{'Q' if width == 8 else 'I'}", data))
    return subifds


def _ifd(fd: int, fmt: Any, offset: int, size: int, chain: _Chain, where: str) -> Readiness | tuple[int, list[int]]:
    """One IFD (`where` names it in reasons): its entries and their values written and inside the file, and its
    next-IFD pointer too; returns (where that pointer is, the SubIFD offsets it names)."""
    if offset + fmt.tagnosize > size:
        return _not_ready(f"{where} lies beyond the end ({size} bytes)")
    (count,) = struct.unpack(fmt.tagnoformat, os.pread(fd, fmt.tagnosize, offset))
    if count == 0:
        return _not_ready(f"{where} not written yet")
    if count > _MAX_TAGS:
        return _broken(f"{where} claims {count} tags")
    next_at = offset + fmt.tagnosize + count * fmt.tagsize
    if next_at + fmt.offsetsize > size:
        return _not_ready(f"{where} runs past the end ({size} bytes)")
    subifds = _entries(fd, fmt, offset, count, size, chain)
    return subifds if isinstance(subifds, Readiness) else (next_at, subifds)


def _walk_chain(fd: int, fmt: Any, first: int, size: int, chain: _Chain, depth: int = 0) -> Readiness | None:
    """Follow one IFD chain (and the SubIFD chains it names) with tifffile's format description.

    Returns None when every IFD is written, inside the file and the chain terminates; else why not.
    """
    seen: set[int] = set()
    offset = first
    while offset:
        where = f"IFD {len(chain.offsets)} at byte {offset}"
        if offset in seen:
            return _broken(f"IFD chain is circular ({where} repeats)")
        if len(chain.offsets) >= _MAX_IFDS:
            return _broken(f"IFD chain longer than {_MAX_IFDS}")
        ifd = _ifd(fd, fmt, offset, size, chain, where)
        if isinstance(ifd, Readiness):
            return ifd
        next_at, subifds = ifd
        seen.add(offset)
        if depth == 0:
            chain.offsets.append(offset)
        for sub in subifds if depth < 2 else ():
            found = _walk_chain(fd, fmt, sub, size, chain, depth + 1) if sub else _not_ready(f"{where}: SubIFD not written yet")
            if found is not None:
                return found
        (offset,) = struct.unpack(fmt.offsetformat, os.pread(fd, fmt.offsetsize, next_at))
        if offset >= size:
            return _not_ready(f"IFD {len(chain.offsets)} at byte {offset} lies beyond the end ({size} bytes)")
    return None


def _last_value_state(fd: int, chain: _Chain) -> Readiness | None:
    """The tag value that ends last in the file is, for a copy written in order, among the last bytes to arrive;
    its tail still being zeros means the copy has not reached it (an ASCII value ends in one NUL, never sixteen)."""
    code, start, end = chain.last_value
    probe = min(_PROBE, end - start)
    if not probe:
        return None
    tail = os.pread(fd, probe, end - probe)
    written = tail.endswith(b"\xff\xd9") if code == _JPEG_TABLES else any(tail)
    return None if written else _not_ready("the last directory data is not written yet")


def _block_written(head: bytes, tail: bytes, compression: int) -> bool:
    """A compressed block is written when its ends are not zeros; a JPEG block ends in EOI or a restart marker."""
    if compression == 7:
        return any(head) and len(tail) >= 2 and tail[-2] == 0xFF and 0xD0 <= tail[-1] <= 0xD9
    return any(head) and any(tail)


def _sample(n: int) -> list[int]:
    if n <= _SAMPLED_BLOCKS + 2:
        return list(range(n))
    step = (n - 1) / (_SAMPLED_BLOCKS + 1)
    return sorted({0, n - 1, *(round(i * step) for i in range(1, _SAMPLED_BLOCKS + 1))})


def _blocks_state(fd: int, page: Any, label: str, size: int) -> Readiness | None:
    """None when every tile/strip of `page` lies inside the file and sampled compressed blocks are written."""
    blocks = [(int(o), int(c)) for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
    if not blocks:
        return _not_ready(f"{label}: tile tables not written yet")
    for offset, count in blocks:
        if offset < 8:
            return _not_ready(f"{label}: tile table not written yet")
        if offset + count > size:
            return _not_ready(f"{label}: tile data ends at byte {offset + count}, the file has {size}")
    if int(page.compression) not in _FRAMED_COMPRESSIONS:
        return None
    for index in _sample(len(blocks)):
        offset, count = blocks[index]
        head = os.pread(fd, min(_PROBE, count), offset)
        tail = os.pread(fd, min(_PROBE, count), offset + count - min(_PROBE, count))
        if not _block_written(head, tail, int(page.compression)):
            return _not_ready(f"{label}: tile {index} not written yet")
    return None


def _pages_state(fd: int, pages: Any, label: str, size: int, depth: int = 0) -> Readiness | None:
    for index, page in enumerate(pages):
        name = f"{label}{index}"
        found = _blocks_state(fd, page, f"page {name}", size)
        if found is not None:
            return found
        if depth < 2 and page.subifds:
            found = _pages_state(fd, page.pages, f"{name}.", size, depth + 1)
            if found is not None:
                return found
    return None


_IN_CHECK = threading.local()  # `active` while this thread runs a completeness check


def _outside_checks(record: logging.LogRecord) -> bool:
    """Drops tifffile's log records from threads that are inside a completeness check.

    Parsing a slide that is still arriving is expected to meet half-written directories; tifffile logs each one as
    an error. Records from other threads (the slide readers) pass untouched.
    """
    return not getattr(_IN_CHECK, "active", False)


logging.getLogger("tifffile").addFilter(_outside_checks)


def _check_tiff(path: Path) -> Readiness:
    """Completeness of a TIFF-family file from its tag tables; no pixel is decoded.

    Checks, in order: the header; the first IFD; the whole IFD chain (written, inside the file, terminating);
    every tile/strip byte range of every page and SubIFD inside the file; and, for compressed pages, that sampled
    blocks (always the first and the last) are no longer zeros.
    """
    import tifffile

    with _open_regular(path) as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        first = _first_ifd(fd, size)
        if isinstance(first, Readiness):
            return first
        try:
            handle.seek(0)
            _IN_CHECK.active = True
            with tifffile.TiffFile(handle, name=path.name) as tif:
                chain = _Chain([])
                found = _walk_chain(fd, tif.tiff, first, size, chain) or _last_value_state(fd, chain)
                if found is not None:
                    return found
                pages = list(tif.pages)
                if len(pages) != len(chain.offsets):
                    return _not_ready(f"{len(chain.offsets)} IFDs in the chain but {len(pages)} readable pages")
                return _pages_state(fd, pages, "", size) or READY
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, struct.error) as exc:
            # A half-written directory fails to parse: the chain walk above already refused the structural
            # contradictions, so this is treated as "not yet".
            return _not_ready(f"TIFF directory not readable yet ({describe(exc)})")
        finally:
            _IN_CHECK.active = False


# ---------------------------------------------------------------------------------------------------------------
# DICOM


_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"})


def _pixel_element(handle: BinaryIO, implicit: bool, little: bool) -> tuple[int, int] | None:
    """(tag, value length) of the element at the handle's position, which pydicom left at the pixel data."""
    end = "<" if little else ">"
    raw = handle.read(8)
    if len(raw) < 8:
        return None
    group, element = struct.unpack(end + "HH", raw[:4])
    tag = group << 16 | element
    if implicit:
        return tag, struct.unpack(end + "I", raw[4:8])[0]
    if raw[4:6] in _LONG_VRS:
        more = handle.read(4)
        if len(more) < 4:
            return None
        return tag, struct.unpack(end + "I", more)[0]
    return tag, struct.unpack(end + "H", raw[6:8])[0]


def _fragments_state(handle: BinaryIO, size: int, little: bool, frames: int) -> Readiness | None:
    """Walk encapsulated pixel data item by item (8-byte headers only) to the sequence delimiter."""
    end = "<" if little else ">"
    fragments = 0
    while True:
        raw = handle.read(8)
        if len(raw) < 8:
            return _not_ready("pixel data fragments not all written yet")
        group, element, length = struct.unpack(end + "HHI", raw)
        tag = group << 16 | element
        if tag == _SEQ_END:
            break
        if tag != _ITEM:
            if b"\x00\x00" in raw:  # an item header only partly written yet
                return _not_ready("pixel data fragments not all written yet")
            return _broken(f"unexpected tag ({group:04X},{element:04X}) inside encapsulated pixel data")
        if handle.tell() + length > size:
            return _not_ready("a pixel data fragment runs past the end of the file")
        handle.seek(length, os.SEEK_CUR)
        fragments += 1
    # The first item is the basic offset table; each frame needs at least one fragment after it.
    if fragments - 1 < frames:
        return _broken(f"{frames} frames but {max(fragments - 1, 0)} pixel data fragments")
    return None


def _dicom_instance_state(path: Path) -> Readiness | None:
    """None when the instance is complete up to and through its pixel data; else why not."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with _open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        preamble = handle.read(132)
        if len(preamble) < 132 or not any(preamble[128:]):
            return _not_ready("header not written yet")
        if preamble[128:132] != b"DICM":
            return _broken("not a DICOM file (no DICM prefix)")
        handle.seek(0)
        try:
            dataset = pydicom.dcmread(handle, stop_before_pixels=True)
            syntax = dataset.file_meta.get("TransferSyntaxUID")
            implicit = bool(syntax.is_implicit_VR) if syntax is not None else True
            little = bool(syntax.is_little_endian) if syntax is not None else True
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
            # pydicom reads a truncated header quietly up to the cut, or fails on a half-written value.
            return _not_ready(f"header not complete yet ({describe(exc)})")
        found = _pixel_element(handle, implicit, little)
        if found is None or found[0] not in _PIXEL_TAGS:
            # pydicom stops quietly at a truncation; an image instance must reach its pixel data.
            return _not_ready("pixel data not written yet")
        _tag, length = found
        if length == 0xFFFFFFFF:  # encapsulated: fragment by fragment
            return _fragments_state(handle, size, little, int(dataset.get("NumberOfFrames", 1) or 1))
        if handle.tell() + length > size:
            return _not_ready("pixel data runs past the end of the file")
        return None


def _check_dicom_series(folder: Path) -> Readiness:
    """Completeness of a DICOM series folder: each instance parses up to, and through, its pixel data.

    Nothing in a level instance states how many instances the series has (OpenSlide skips unreadable files
    silently), so the caller's quiet period on the whole folder is what decides that no instance is still coming.
    """
    files = members(folder, "dicom")
    if not files:
        return _not_ready("no DICOM instance yet")
    for path in files:
        state = _dicom_instance_state(path)
        if state is not None:
            return Readiness(state.state, f"{path.name}: {state.reason}")
    return READY


# ---------------------------------------------------------------------------------------------------------------
# MRXS


def _mrxs_names(ini: configparser.ConfigParser) -> list[str] | Readiness:
    if not ini.has_section("DATAFILE"):
        return _not_ready("Slidedat.ini has no [DATAFILE] section yet")
    data = ini["DATAFILE"]
    try:
        count = int(data.get("FILE_COUNT", ""))
    except ValueError:
        return _not_ready("Slidedat.ini has no FILE_COUNT yet")
    names = [data.get(f"FILE_{i}") for i in range(count)]
    if any(not name for name in names):
        return _not_ready("Slidedat.ini does not name every data file yet")
    index = ini.get("HIERARCHICAL", "INDEXFILE", fallback=None)
    if not index:
        return _not_ready("Slidedat.ini names no index file yet")
    return [index, *(str(n) for n in names)]


def _check_mrxs(path: Path) -> Readiness:
    """Completeness of an MRXS slide: `name.mrxs`, the folder `name/`, its `Slidedat.ini` and every file it names.

    The index and data files cannot be checked further without OpenSlide's format knowledge; the quiet period on
    the whole group covers their contents.
    """
    folder = _mrxs_folder(path)
    if not folder.is_dir():
        return _not_ready(f"data folder {folder.name}/ not there yet")
    ini_path = folder / "Slidedat.ini"
    if not ini_path.is_file():
        return _not_ready("Slidedat.ini not there yet")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(ini_path.read_text(encoding="utf-8-sig", errors="replace"))
    except configparser.Error as exc:
        return _not_ready(f"Slidedat.ini not readable yet ({describe(exc)})")
    names = _mrxs_names(parser)
    if isinstance(names, Readiness):
        return names
    present = {p.name for p in members(path, "mrxs")}
    missing = [name for name in names if name not in present]
    if missing:
        return _not_ready(f"{len(missing)} file(s) named in Slidedat.ini not there yet (first: {missing[0]})")
    return READY


# ---------------------------------------------------------------------------------------------------------------
# Plain images

_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _check_image(path: Path) -> Readiness:
    """Completeness of a plain image from its signature and end marker (trailing zero padding is ignored)."""
    with _open_regular(path) as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        head = os.pread(fd, 16, 0)
        tail = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024))
    if not any(head):
        return _not_ready("image header not written yet")
    if not any(tail):
        return _not_ready("image end not written yet")
    if head.startswith(_PNG):
        return READY if tail.endswith(_PNG_END) else _not_ready("PNG end chunk not written yet")
    if head.startswith(b"\xff\xd8\xff"):
        return READY if tail.rstrip(b"\x00").endswith(b"\xff\xd9") else _not_ready("JPEG end marker not written yet")
    if head.startswith(b"GIF8"):
        # The last data sub-block terminator (0) then the trailer (';').
        return READY if tail.endswith(b"\x00;") else _not_ready("GIF trailer not written yet")
    if head.startswith(b"BM") and len(head) >= 6:
        stated = struct.unpack("<I", head[2:6])[0]
        return _not_ready("BMP not complete yet") if stated > size else READY
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        stated = struct.unpack("<I", head[4:8])[0] + 8
        return _not_ready("WebP not complete yet") if stated > size else READY
    return _broken("not a PNG, JPEG, GIF, BMP or WebP file")
