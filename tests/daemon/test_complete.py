"""Completeness checks on real slides, truncated copies, and pre-sized copies filled in order (no pixel decoded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from atlaspatch_stream.daemon.complete import (
    check_slide,
    is_temporary_name,
    members,
    quick_fingerprint,
    relative_id,
    signature,
    slide_identity,
)
from atlaspatch_stream.testing.synthetic import write_image, write_synthetic_slide
from tests.conftest import real_slide

TIFFS = [
    "aperio/CMU-1-Small-Region.svs",
    "aperio/small-16x16.svs",
    "hamamatsu/test3-DAPI-2-387.ndpi",
    "generic-tiff/boxes.tiff",
    "errors/unreadable.svs",
    "errors/unopenable.tiff",
]
DICOM_INSTANCES = ["dicom/boxes/boxes_0.dcm", "dicom/camelyon-multiframe/multiframe_camelyon_challenge_image.dcm"]


def _fill_in_order(data: bytes, target: Path, chunk: int, reverse: bool = False):
    """Pre-size `target` to the final length (as Windows CopyFile does), then write `data` chunk by chunk."""
    with open(target, "wb") as handle:
        handle.truncate(len(data))
    offsets = list(range(0, len(data), chunk))
    for offset in reversed(offsets) if reverse else offsets:
        with open(target, "r+b") as handle:
            handle.seek(offset)
            handle.write(data[offset : offset + chunk])
        yield


def _truncations(size: int) -> list[int]:
    return sorted({*range(0, size, max(1, size // 97)), size - 1, size - 2, size - 16})


@pytest.mark.parametrize("name", TIFFS)
def test_real_tiff_family_slides_are_ready(name: str) -> None:
    """Each real TIFF-family slide (SVS, NDPI, generic tiled TIFF, and the two with bad pixels) is ready as it is:
    the structure is complete, and pixel problems are the pipeline's to report."""
    assert check_slide(real_slide(name), "file").state == "ready"


@pytest.mark.parametrize("name", TIFFS)
def test_truncated_tiff_is_never_ready_and_never_broken(name: str, tmp_path: Path) -> None:
    """A copy cut at ~100 points (and 1, 2, 16 bytes short) is "not ready" every time, never "broken": a file still
    arriving is not a failure."""
    data = real_slide(name).read_bytes()
    target = tmp_path / Path(name).name
    for cut in _truncations(len(data)):
        target.write_bytes(data[:cut])
        result = check_slide(target, "file")
        assert result.state == "not_ready", (cut, result)
        assert result.reason


@pytest.mark.parametrize("name", TIFFS)
@pytest.mark.parametrize("reverse", [False, True])
def test_presized_tiff_is_ready_only_when_its_bytes_are_all_there(name: str, reverse: bool, tmp_path: Path) -> None:
    """A copy pre-sized with truncate and then filled in 37 chunks (forwards, then backwards) is never ready while
    it differs from the original; it is ready once the last chunk is written."""
    data = real_slide(name).read_bytes()
    target = tmp_path / Path(name).name
    results = []
    for _ in _fill_in_order(data, target, max(64, len(data) // 37), reverse):
        result = check_slide(target, "file")
        assert result.state != "broken", result
        if result.ready:
            assert target.read_bytes() == data, "ready while bytes were still missing"
        results.append(result)
    assert results[-1].ready


def test_synthetic_pyramid_filled_in_small_chunks(tmp_path: Path) -> None:
    """A tiled JPEG pyramid written by tifffile (IFDs before their tiles, unlike Aperio) filled 4 KiB at a time is
    never ready before its last tile is written."""
    source = write_synthetic_slide(tmp_path / "src.svs", width=1024, height=768, tile=256, levels=(1, 4))
    data = source.read_bytes()
    target = tmp_path / "copy.svs"
    for _ in _fill_in_order(data, target, 4096):
        result = check_slide(target, "file")
        assert not result.ready or target.read_bytes() == data
    assert check_slide(target, "file").ready


def test_not_a_tiff_is_broken_and_zeros_are_not_ready(tmp_path: Path) -> None:
    """Non-zero bytes without a TIFF header are broken; an all-zero file (pre-sized, nothing written) is not ready."""
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"PK\x03\x04" + os.urandom(1000))
    assert check_slide(junk, "file").state == "broken"
    zeros = tmp_path / "zeros.svs"
    zeros.write_bytes(bytes(4096))
    assert check_slide(zeros, "file").state == "not_ready"


def test_circular_ifd_chain_is_broken(tmp_path: Path) -> None:
    """An IFD whose next-IFD pointer points back to itself is a contradiction no further byte can fix: broken."""
    data = bytearray(real_slide("aperio/small-16x16.svs").read_bytes())
    first = int.from_bytes(data[4:8], "little")
    count = int.from_bytes(data[first : first + 2], "little")
    next_at = first + 2 + 12 * count
    data[next_at : next_at + 4] = first.to_bytes(4, "little")
    target = tmp_path / "loop.svs"
    target.write_bytes(bytes(data))
    result = check_slide(target, "file")
    assert result.state == "broken" and "circular" in result.reason


def _dicom_folder(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "series"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(real_slide(name), folder / Path(name).name)
    return folder


def test_real_dicom_series_are_ready(tmp_path: Path) -> None:
    """The two-instance boxes series and the multi-frame CAMELYON instance each form a ready series folder."""
    assert check_slide(real_slide("dicom/boxes/boxes_0.dcm").parent, "dicom").ready
    assert check_slide(real_slide(DICOM_INSTANCES[1]).parent, "dicom").ready


@pytest.mark.parametrize("name", DICOM_INSTANCES)
def test_truncated_dicom_instance_is_not_ready(name: str, tmp_path: Path) -> None:
    """Every cut of an instance (header, encapsulated fragments, last bytes) makes its series "not ready"; pydicom's
    quiet stop at a truncation does not pass as a complete instance."""
    data = real_slide(name).read_bytes()
    folder = _dicom_folder(tmp_path, [])
    target = folder / Path(name).name
    for cut in _truncations(len(data)):
        target.write_bytes(data[:cut])
        assert check_slide(folder, "dicom").state == "not_ready", cut


@pytest.mark.parametrize("name", DICOM_INSTANCES)
def test_presized_encapsulated_dicom_is_not_ready_until_filled(name: str, tmp_path: Path) -> None:
    """A JPEG-encapsulated instance pre-sized and filled in order: the fragment walk finds the unwritten items, so
    the series is never ready while bytes are missing, and never called broken."""
    data = real_slide(name).read_bytes()
    folder = _dicom_folder(tmp_path, [])
    target = folder / Path(name).name
    for _ in _fill_in_order(data, target, max(64, len(data) // 37)):
        result = check_slide(folder, "dicom")
        assert result.state != "broken", result
        assert not result.ready or target.read_bytes() == data
    assert check_slide(folder, "dicom").ready


def test_dicom_series_waits_for_a_half_copied_instance(tmp_path: Path) -> None:
    """One complete instance plus a half-copied second one: the folder is not ready (OpenSlide would open it with a
    level silently missing)."""
    folder = _dicom_folder(tmp_path, ["dicom/boxes/boxes_0.dcm"])
    data = real_slide("dicom/boxes/boxes_1.dcm").read_bytes()
    (folder / "boxes_1.dcm").write_bytes(data[: len(data) // 2])
    assert check_slide(folder, "dicom").state == "not_ready"
    (folder / "boxes_1.dcm").write_bytes(data)
    assert check_slide(folder, "dicom").ready


def _mrxs(tmp_path: Path, files: int) -> Path:
    slide = tmp_path / "case.mrxs"
    slide.write_bytes(b"\x00" * 16)
    folder = tmp_path / "case"
    folder.mkdir()
    lines = ["[GENERAL]", "SLIDE_VERSION=01.02", "[HIERARCHICAL]", "INDEXFILE=Index.dat", "[DATAFILE]",
             f"FILE_COUNT={files}", *(f"FILE_{i}=Data{i:04d}.dat" for i in range(files))]
    (folder / "Slidedat.ini").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return slide


def test_mrxs_needs_every_file_slidedat_names(tmp_path: Path) -> None:
    """`case.mrxs` + `case/Slidedat.ini` naming Index.dat and 3 data files: not ready until all four exist; the
    missing file is named in the reason."""
    slide = _mrxs(tmp_path, 3)
    folder = tmp_path / "case"
    result = check_slide(slide, "mrxs")
    assert result.state == "not_ready" and "Index.dat" in result.reason
    for name in ("Index.dat", "Data0000.dat", "Data0001.dat"):
        (folder / name).write_bytes(b"x" * 10)
        assert not check_slide(slide, "mrxs").ready
    (folder / "Data0002.dat").write_bytes(b"x" * 10)
    assert check_slide(slide, "mrxs").ready
    assert [p.name for p in members(slide, "mrxs")] == [
        "case.mrxs", "Data0000.dat", "Data0001.dat", "Data0002.dat", "Index.dat", "Slidedat.ini"]


def test_mrxs_without_its_folder_or_ini_is_not_ready(tmp_path: Path) -> None:
    """A lone `.mrxs` (its folder still being copied) and a folder without Slidedat.ini are both not ready."""
    slide = tmp_path / "lone.mrxs"
    slide.write_bytes(b"\x00")
    assert check_slide(slide, "mrxs").state == "not_ready"
    (tmp_path / "lone").mkdir()
    assert "Slidedat.ini" in check_slide(slide, "mrxs").reason


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif"])
def test_plain_images_need_their_end_marker(suffix: str, tmp_path: Path) -> None:
    """PNG/JPEG/GIF: every truncation and every pre-sized partial fill is not ready; the full file is ready."""
    source = write_image(tmp_path / f"src{suffix}", width=300, height=200)
    data = source.read_bytes()
    target = tmp_path / f"copy{suffix}"
    for cut in _truncations(len(data)):
        target.write_bytes(data[:cut])
        assert check_slide(target, "file").state == "not_ready", cut
    for _ in _fill_in_order(data, target, max(64, len(data) // 37)):
        assert not check_slide(target, "file").ready or target.read_bytes() == data
    assert check_slide(target, "file").ready


def test_identity_and_fingerprint(tmp_path: Path) -> None:
    """The identity holds the path relative to the root, the size and mtime; the fingerprint changes when the
    content changes at the same size, and not when only the mtime moves."""
    slide = tmp_path / "in" / "sub" / "a.svs"
    slide.parent.mkdir(parents=True)
    shutil.copy(real_slide("aperio/CMU-1-Small-Region.svs"), slide)
    identity = slide_identity(tmp_path / "in", slide, "file")
    assert identity.slide_id == "sub/a.svs" and identity.size == slide.stat().st_size
    assert identity.mtime_ns == slide.stat().st_mtime_ns
    os.utime(slide, ns=(1, 10**18))
    assert quick_fingerprint([slide]) == identity.fingerprint
    data = bytearray(slide.read_bytes())
    data[-1] ^= 0xFF  # the last MiB is hashed
    slide.write_bytes(bytes(data))
    assert quick_fingerprint([slide]) != identity.fingerprint


def test_signature_of_a_folder_moves_when_a_file_is_added(tmp_path: Path) -> None:
    """A DICOM folder's signature counts its instances and changes when one more arrives."""
    folder = _dicom_folder(tmp_path, ["dicom/boxes/boxes_0.dcm"])
    before = signature(folder, "dicom")
    shutil.copy(real_slide("dicom/boxes/boxes_1.dcm"), folder / "boxes_1.dcm")
    after = signature(folder, "dicom")
    assert (before.count, after.count) == (1, 2) and after.size > before.size


@pytest.mark.parametrize(
    ("name", "skipped"),
    [(".hidden.svs", True), ("a.svs.part", True), ("a.TMP", True), ("x.partial", True), ("~$a.svs", True),
     ("Thumbs.db", True), ("a.svs", False), ("a~.svs", False)],
)
def test_temporary_names(name: str, skipped: bool) -> None:
    """Hidden, *.part, *.tmp, *.partial, ~* and OS litter are never slides (case-insensitive)."""
    assert is_temporary_name(name) is skipped


def test_relative_id_is_nfc_and_slash_separated(tmp_path: Path) -> None:
    """A decomposed name (NFD, as macOS writes it) gives the NFC slide ID."""
    assert relative_id(tmp_path, tmp_path / "sub" / "Cafe\u0301.svs") == "sub/Caf\u00e9.svs"


def _bigtiff_with_subifds(path: Path) -> Path:
    """A BigTIFF whose pyramid levels are SubIFDs (the OME-TIFF layout), JPEG tiles, written by tifffile."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, tile=(128, 128), compression="jpeg", photometric="rgb", subifds=2)
        tif.write(image[::2, ::2], tile=(128, 128), compression="jpeg", photometric="rgb", subfiletype=1)
        tif.write(image[::4, ::4], tile=(128, 128), compression="jpeg", photometric="rgb", subfiletype=1)
    return path


def test_bigtiff_with_subifds_truncated_and_presized(tmp_path: Path) -> None:
    """A BigTIFF pyramid stored as SubIFDs: ready whole; every truncation not ready; a pre-sized copy filled in
    order never ready while bytes are missing (the SubIFD chains and their tiles are checked too)."""
    import tifffile

    source = _bigtiff_with_subifds(tmp_path / "src.tif")
    with tifffile.TiffFile(source) as tif:
        assert tif.is_bigtiff and len(tif.pages[0].subifds or ()) == 2
    data = source.read_bytes()
    target = tmp_path / "copy.tif"
    target.write_bytes(data)
    assert check_slide(target, "file").ready
    for cut in _truncations(len(data)):
        target.write_bytes(data[:cut])
        assert check_slide(target, "file").state == "not_ready", cut
    for _ in _fill_in_order(data, target, max(64, len(data) // 41)):
        result = check_slide(target, "file")
        assert result.state != "broken", result
        assert not result.ready or target.read_bytes() == data
    assert check_slide(target, "file").ready
