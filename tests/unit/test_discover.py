"""Input discovery and the mpp CSV."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from atlaspatch_stream.errors import ConfigError
from atlaspatch_stream.sources.discover import discover_slides, load_mpp_csv, mpp_for, stem_for


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_folder_discovery_is_case_insensitive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    """Mixed-case suffixes are found (upstream misses `.Svs`); other files and sub-folders are ignored."""
    _touch(tmp_path, "b.Svs", "a.TIFF", "c.png", "notes.txt", "sub/d.svs")
    assert discover_slides(tmp_path, recursive=False) == [
        tmp_path / "a.TIFF",
        tmp_path / "b.Svs",
        tmp_path / "c.png",
    ]


def test_recursive_discovery_and_dicom_collapse(tmp_path: Path) -> None:
    """Recursive search finds nested slides; the .dcm files of one folder become one entry: the folder."""
    _touch(tmp_path, "x.ndpi", "sub/y.mrxs", "series/f0.dcm", "series/f1.DCM", "series/f2.dcm")
    found = discover_slides(tmp_path, recursive=True)
    assert found == [tmp_path / "series", tmp_path / "sub" / "y.mrxs", tmp_path / "x.ndpi"]
    assert stem_for(tmp_path / "series") == "series"


def test_real_dicom_folders(slides_dir: Path) -> None:
    """The two real DICOM series (one with two files) are two slides."""
    found = discover_slides(slides_dir / "dicom", recursive=True)
    assert found == [slides_dir / "dicom" / "boxes", slides_dir / "dicom" / "camelyon-multiframe"]


def test_file_input_is_returned_as_is(tmp_path: Path) -> None:
    """A file is returned whatever its suffix (opening reports an unsupported one)."""
    _touch(tmp_path, "slide.xyz")
    assert discover_slides(tmp_path / "slide.xyz", recursive=False) == [tmp_path / "slide.xyz"]
    assert stem_for(tmp_path / "slide.xyz") == "slide"


def test_empty_folder_and_missing_path_are_config_errors(tmp_path: Path) -> None:
    """No slide in a folder, or a path that does not exist: ConfigError naming it."""
    _touch(tmp_path, "readme.md")
    with pytest.raises(ConfigError, match="No WSI files found in"):
        discover_slides(tmp_path, recursive=True)
    with pytest.raises(ConfigError, match="does not exist"):
        discover_slides(tmp_path / "nope", recursive=False)


def test_mpp_csv_keys_by_stem_and_skips_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Names or paths, with or without extension, match by stem; empty, non-numeric and ≤0 rows are skipped."""
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text(
        "wsi,mpp,comment\n/data/a.svs,0.25,x\nb,0.5,\nc.tiff,abc,\nd.svs,-1,\n,0.3,\ne.svs,,\nf.svs,nan,\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        table = load_mpp_csv(csv_path)
    assert table == {"a": 0.25, "b": 0.5}
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 5
    assert mpp_for(tmp_path / "a.svs", table) == 0.25
    assert mpp_for(tmp_path / "b.PNG", table) == 0.5
    assert mpp_for(tmp_path / "z.svs", table) is None
    assert mpp_for(tmp_path / "a.svs", None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("WSI,MPP\na,0.5\n", "header"),
        ("slide,mpp\na,0.5\n", "header"),
        ("wsi,mpp\na,0\nb,x\n", "no valid rows"),
        ("", "header"),
    ],
)
def test_bad_csvs(tmp_path: Path, text: str, message: str) -> None:
    """Header names are exact and case-sensitive; a CSV without a valid row is refused."""
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_mpp_csv(csv_path)


def test_missing_csv(tmp_path: Path) -> None:
    """A CSV that does not exist is a ConfigError."""
    with pytest.raises(ConfigError, match="cannot read mpp CSV"):
        load_mpp_csv(tmp_path / "none.csv")
