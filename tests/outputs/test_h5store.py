"""The H5 store: upstream's schema (§2.2-2.4) written so that no file ever looks complete unless it is."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream.errors import SlideError
from atlaspatch_stream.outputs import PASSPORT_FORMAT, SlideAttrs, claims
from atlaspatch_stream.outputs.h5store import TMP_PREFIX, SlideH5, inspect_h5, passports, read_coords

UPSTREAM_ATTRS = {  # name -> h5py/numpy kind, as upstream stores them (§2.3): ints int64, strings vlen UTF-8
    "patch_size": "i8", "patch_size_level0": "i8", "level0_magnification": "i8", "target_magnification": "i8",
    "overlap": "i8", "level0_width": "i8", "level0_height": "i8", "wsi_path": "str", "passport_format": "str",
    "passport_version": "i8", "creation_date": "str", "filename": "str", "mpp": "f8", "magnification": "i8",
    "vendor": "str", "institution": "str", "stain": "str", "num_patches": "i8",
}


def _attrs(**extra: object) -> SlideAttrs:
    return SlideAttrs(256, 512, 40, 20, 0, 9000, 7000, "slides/s.svs", "s.svs", mpp=0.2527, magnification=40,
                      vendor="aperio", institution="CMU", stain="H&E", extra=extra)


def _coords(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    xy = rng.integers(0, 9000, size=(n, 2))
    return np.column_stack([xy, np.full((n, 2), 512), np.zeros(n, int)]).astype(np.int32)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "str"
    return np.asarray(value).dtype.str[1:]


def test_schema_dtypes_and_attributes(tmp_path: Path) -> None:
    """A finished file has coords int32 (N,5) and passports S160 with upstream's chunks/maxshape, and every upstream
    attribute with upstream's type; our additions only add new names."""
    final = tmp_path / "patches" / "s.h5"
    coords = _coords(7)
    store = SlideH5.create(final, _attrs(settings_fingerprint="abc", fast_mode=1), coords, "s", write_batch=4)
    store.finalize()
    with h5py.File(final, "r") as f:
        cds, pds = f["coords"], f["passports"]
        assert (cds.dtype, cds.shape, cds.chunks, cds.maxshape) == (np.dtype("int32"), (7, 5), (4, 5), (None, 5))
        assert (pds.dtype, pds.shape, pds.chunks, pds.maxshape) == (np.dtype("S160"), (7,), (4,), (None,))
        assert cds.compression is None and pds.compression is None
        np.testing.assert_array_equal(cds[...], coords)
        kinds = {k: _kind(v) for k, v in f.attrs.items()}
        assert {k: kinds.get(k) for k in UPSTREAM_ATTRS} == UPSTREAM_ATTRS
        assert f.attrs["num_patches"] == 7 and f.attrs["passport_version"] == 2
        assert f.attrs["passport_format"] == PASSPORT_FORMAT
        assert f.attrs["settings_fingerprint"] == "abc" and f.attrs["fast_mode"] == 1
        assert (f.attrs["patch_size"], f.attrs["patch_size_level0"], f.attrs["overlap"]) == (256, 512, 0)
        assert f.attrs["mpp"] == pytest.approx(0.2527)
        assert "features" not in f


def test_optional_attributes_absent_when_unknown(tmp_path: Path) -> None:
    """mpp, magnification, vendor, institution and stain are written only when known (§2.3)."""
    final = tmp_path / "s.h5"
    SlideH5.create(final, SlideAttrs(256, 512, 40, 20, 0, 10, 10, "s.svs", "s.svs"), _coords(1), "s", 8).finalize()
    with h5py.File(final, "r") as f:
        assert not {"mpp", "magnification", "vendor", "institution", "stain"} & set(f.attrs)


def test_passports_format_and_truncation() -> None:
    """Each passport follows the v2 template; magnification 0 reads 'na'; long stems are cut at 160 bytes."""
    coords = np.array([[10, 20, 512, 512, 1]], np.int32)
    assert passports("s", coords, 40, 20, 9)[0] == b"s__x10_y20_rw512_rh512_lv1_mag40_tmag20_total9"
    assert passports("s", coords, 0, 20, 9)[0].startswith(b"s__x10_y20_rw512_rh512_lv1_magna_tmag20")
    long = passports("x" * 300, coords, 40, 20, 1)
    assert long.dtype == np.dtype("S160") and len(long[0]) == 160


def test_passports_in_file_match_coords(tmp_path: Path) -> None:
    """Stored passports are the template filled from each row, `total` being N."""
    final = tmp_path / "s.h5"
    coords = _coords(5)
    SlideH5.create(final, _attrs(), coords, "slide-1", write_batch=2).finalize()
    with h5py.File(final, "r") as f:
        got = [p.decode() for p in f["passports"][...]]
    want = [PASSPORT_FORMAT.format(stem="slide-1", X=x, Y=y, RW=rw, RH=rh, LV=lv, MAG=40, TMAG=20, N=5)
            for x, y, rw, rh, lv in coords.tolist()]
    assert got == want


def test_coords_stream_in_chunks_when_n_exceeds_write_batch(tmp_path: Path) -> None:
    """N = 1000 with write_batch 64: the dataset is chunked by write_batch and every row lands in order."""
    final = tmp_path / "s.h5"
    coords = _coords(1000)
    SlideH5.create(final, _attrs(), coords, "s", write_batch=64).finalize()
    with h5py.File(final, "r") as f:
        assert f["coords"].chunks == (64, 5)
        assert f["passports"].chunks == (64,)
    np.testing.assert_array_equal(read_coords(final), coords)


def test_temp_file_invisible_until_finalize(tmp_path: Path) -> None:
    """While writing, only `.<stem>.h5.tmp.<owner>.<hex>` exists, the owner naming this host and process; finalize
    moves it to `<stem>.h5` and leaves nothing else."""
    final = tmp_path / "s.h5"
    store = SlideH5.create(final, _attrs(), _coords(6), "s", write_batch=4, feature_chunk=4)
    names = _files(tmp_path)
    assert len(names) == 1 and names[0].startswith(f".s.h5.tmp.{claims.owner_tag()}.")
    store.begin_feature("enc", 3)
    store.write_rows("enc", np.arange(6), np.ones((6, 3), np.float32))
    assert not final.exists()
    assert store.finalize() == final
    assert _files(tmp_path) == ["s.h5"]


def test_abort_removes_temp_file(tmp_path: Path) -> None:
    """Abort of a new file leaves no file at all."""
    store = SlideH5.create(tmp_path / "s.h5", _attrs(), _coords(3), "s", write_batch=4)
    store.begin_feature("enc", 2)
    store.abort()
    assert _files(tmp_path) == []


def test_rows_written_out_of_order_land_by_index(tmp_path: Path) -> None:
    """Rows arrive shuffled and in pieces; each row's values end up at its index; the set is renamed when full."""
    final = tmp_path / "s.h5"
    n = 50
    store = SlideH5.create(final, _attrs(), _coords(n), "s", write_batch=16, feature_chunk=8)
    store.begin_feature("enc", 2)
    want = np.column_stack([np.arange(n), -np.arange(n)]).astype(np.float32)
    order = np.random.default_rng(0).permutation(n)
    for piece in np.array_split(order, 7):
        assert not store.complete()
        store.write_rows("enc", piece, want[piece])
    assert store.complete() and store.missing_rows("enc") == 0
    store.finalize()
    with h5py.File(final, "r") as f:
        ds = f["features/enc"]
        assert (ds.dtype, ds.shape, ds.maxshape, ds.chunks) == (np.dtype("float32"), (n, 2), (None, 2), (8, 2))
        assert len(ds.attrs) == 0
        np.testing.assert_array_equal(ds[...], want)
        assert [k for k in f["features"] if k.startswith(TMP_PREFIX)] == []


def test_finalize_with_missing_rows_refuses(tmp_path: Path) -> None:
    """Finalize before every row is written raises SlideError; abort then leaves nothing."""
    store = SlideH5.create(tmp_path / "s.h5", _attrs(), _coords(4), "s", write_batch=4)
    store.begin_feature("enc", 2)
    store.write_rows("enc", np.array([0, 2]), np.zeros((2, 2), np.float32))
    with pytest.raises(SlideError, match="2 rows missing"):
        store.finalize()
    store.abort()
    assert _files(tmp_path) == []


def test_wrong_width_is_a_slide_error(tmp_path: Path) -> None:
    """An encoder returning another width than the set's is a per-slide error."""
    store = SlideH5.create(tmp_path / "s.h5", _attrs(), _coords(2), "s", write_batch=4)
    store.begin_feature("enc", 3)
    with pytest.raises(SlideError, match="width 2"):
        store.write_rows("enc", np.arange(2), np.zeros((2, 2), np.float32))
    store.abort()


def test_zero_patch_file_has_empty_sets(tmp_path: Path) -> None:
    """N = 0: coords (0,5), passports (0,), num_patches 0 and each feature set (0, D), complete at once."""
    final = tmp_path / "s.h5"
    store = SlideH5.create(final, _attrs(), np.zeros((0, 5), np.int32), "s", write_batch=8)
    store.begin_feature("enc", 384)
    assert store.complete()
    store.finalize()
    with h5py.File(final, "r") as f:
        assert f["coords"].shape == (0, 5) and f["passports"].shape == (0,)
        assert f.attrs["num_patches"] == 0
        assert f["features/enc"].shape == (0, 384) and f["features/enc"].dtype == np.float32


def _complete_file(tmp_path: Path, n: int = 6) -> Path:
    final = tmp_path / "s.h5"
    store = SlideH5.create(final, _attrs(), _coords(n), "s", write_batch=4)
    store.begin_feature("a", 2)
    store.write_rows("a", np.arange(n), np.full((n, 2), 7, np.float32))
    store.finalize()
    return final


def test_reuse_adds_a_set_and_drops_stale_tmp(tmp_path: Path) -> None:
    """An existing file with a crashed run's `__tmp_b`: opening it drops that; the new set appears only when full."""
    final = _complete_file(tmp_path)
    with h5py.File(final, "a") as f:
        f.create_dataset(f"features/{TMP_PREFIX}b", data=np.zeros((2, 2), np.float32))
    store = SlideH5.open_existing(final, 6)
    store.begin_feature("c", 3)
    store.write_rows("c", np.arange(6), np.ones((6, 3), np.float32))
    store.finalize()
    with h5py.File(final, "r") as f:
        assert sorted(f["features"]) == ["a", "c"]  # no __tmp_b left
        np.testing.assert_array_equal(f["features/a"][...], np.full((6, 2), 7, np.float32))
    assert _files(tmp_path) == ["s.h5"]
    existing = inspect_h5(final)
    assert existing is not None and existing.features == {"a": 6, "c": 6} and existing.num_patches == 6


def test_reuse_replaces_wrong_length_set_and_refuses_a_complete_one(tmp_path: Path) -> None:
    """A set with the wrong row count (another tool's partial write) is replaced; a complete one is never clobbered."""
    final = _complete_file(tmp_path)
    with h5py.File(final, "a") as f:
        f.create_dataset("features/b", data=np.zeros((2, 5), np.float32))
    store = SlideH5.open_existing(final, 6)
    with pytest.raises(SlideError, match="already exists"):
        store.begin_feature("a", 2)
    store.begin_feature("b", 4)
    store.write_rows("b", np.arange(6), np.ones((6, 4), np.float32))
    store.finalize()
    with h5py.File(final, "r") as f:
        assert f["features/b"].shape == (6, 4)


def test_reuse_abort_keeps_the_file_without_partial_sets(tmp_path: Path) -> None:
    """Abort while adding a set to an existing file keeps the file and its complete sets, drops the partial one."""
    final = _complete_file(tmp_path)
    store = SlideH5.open_existing(final, 6)
    store.begin_feature("b", 2)
    store.write_rows("b", np.arange(3), np.ones((3, 2), np.float32))
    store.abort()
    with h5py.File(final, "r") as f:
        assert sorted(f["features"]) == ["a"]
    assert _files(tmp_path) == ["s.h5"]


def test_open_existing_unreadable_is_a_slide_error(tmp_path: Path) -> None:
    """A corrupt existing file fails the slide with a message naming the file."""
    bad = tmp_path / "s.h5"
    bad.write_bytes(b"junk")
    with pytest.raises(SlideError, match="cannot open existing output"):
        SlideH5.open_existing(bad, 3)


def test_additions_never_overwrite_upstream_attributes(tmp_path: Path) -> None:
    """Extra attributes that repeat an upstream name keep upstream's value; new names are added."""
    final = tmp_path / "s.h5"
    SlideH5.create(final, _attrs(patch_size=999, num_patches=-1, step_size=256), _coords(2), "s", 8).finalize()
    with h5py.File(final, "r") as f:
        assert f.attrs["patch_size"] == 256 and f.attrs["num_patches"] == 2 and f.attrs["step_size"] == 256
