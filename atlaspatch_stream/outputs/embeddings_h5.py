"""Slide and patient embeddings on disk, in upstream 1.1's schema.

- A slide embedding is `slide_features/<encoder>` in the slide's own H5: float32 (D,), with upstream's attributes
  (`encoder_name`, `source_patch_encoder`, `num_patches`, `patch_size`, `patch_size_level0`,
  `target_magnification`) and ours (e.g. MOOZY's `token_cap`, `subsampled`). Unlike upstream, which rewrites it in
  place, it is written as `slide_features/__tmp_<encoder>` and renamed once the file is synced (`SlideH5.put_dataset`).
- A patient embedding is `<out>/patient_features/<encoder>/<case_id>.h5` with dataset `features` (D,) and upstream's
  file attributes, written to a temporary file beside it and moved into place, under `<case_id>.lock`.

Every h5py call runs on the H5 thread, through the same store, file object and temporary names as the patch
features (`h5store`, `h5io`, `claims`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import SlideError
from ..protocols import Embedding, SlideInputs
from .claims import owned_temp_path
from .h5io import OutputFile
from .h5store import SlideH5, _plain, _translate, move_into_place
from .h5thread import on_h5_thread

SLIDE_GROUP = "slide_features"
PATIENT_FOLDER = "patient_features"
GEOMETRY = ("patch_size", "patch_size_level0", "target_magnification")


# -- reading a slide's inputs ---------------------------------------------------------------------------------------


@on_h5_thread
def read_slide_inputs(h5_path: Path, patch_encoder: str) -> SlideInputs:
    """The patch features, coords and geometry of a complete slide H5 (H5 thread).

    Geometry attributes are read from the root, or from `coords` (TRIDENT-style files), as upstream does.

    Raises:
        SlideError: the file is unreadable, lacks an attribute, or `features/<patch_encoder>` is missing or has not
            one row per patch.
    """
    try:
        with h5py.File(h5_path, "r") as f:
            attrs = _geometry(f, h5_path)
            coords = np.asarray(f["coords"][...])[:, :2].astype(np.int64)
            name = f"features/{patch_encoder}"
            if name not in f:
                raise SlideError(f"{h5_path}: no {name}; run its patch encoder first", slide=str(h5_path))
            features = np.asarray(f[name][...], dtype=np.float32)
            wsi_path = str(_plain(f.attrs.get("wsi_path", "")))
    except (OSError, KeyError) as exc:
        raise SlideError(f"{h5_path}: cannot read patch features ({exc})", slide=str(h5_path)) from exc
    if features.shape[0] != coords.shape[0]:
        raise SlideError(f"{h5_path}: features/{patch_encoder} has {features.shape[0]} rows for "
                         f"{coords.shape[0]} patches; run with --force to rebuild it", slide=str(h5_path))
    return SlideInputs(h5_path, wsi_path, features, coords, **attrs)


def _geometry(f: h5py.File, h5_path: Path) -> dict[str, int]:
    sources = [f.attrs, f["coords"].attrs] if "coords" in f else [f.attrs]
    out = {}
    for key in GEOMETRY:
        value = next((s[key] for s in sources if key in s), None)
        if value is None:
            raise SlideError(f"{h5_path}: attribute {key} missing", slide=str(h5_path))
        out[key] = int(value)
    return out


# -- slide embeddings -----------------------------------------------------------------------------------------------


def slide_attrs(name: str, inputs: SlideInputs, patch_encoder: str, embedding: Embedding) -> dict[str, Any]:
    """Upstream's attributes of `slide_features/<name>`, then ours."""
    return {"encoder_name": name, **_source(inputs, patch_encoder), **embedding.attrs}


def _source(inputs: SlideInputs, patch_encoder: str) -> dict[str, Any]:
    """What a slide embedding records of its source: upstream's reuse rule compares exactly these."""
    return {"source_patch_encoder": patch_encoder, "num_patches": inputs.num_patches, "patch_size": inputs.patch_size,
            "patch_size_level0": inputs.patch_size_level0, "target_magnification": inputs.target_magnification}


@on_h5_thread
def slide_embedding_current(h5_path: Path, name: str, dim: int, inputs: SlideInputs, patch_encoder: str) -> bool:
    """Upstream's reuse rule: `slide_features/<name>` exists, and its width, source encoder, patch size, patch count,
    level-0 patch size and magnification all equal the current H5's (`dim` 0: any width) (H5 thread)."""
    try:
        with h5py.File(h5_path, "r") as f:
            ds = f.get(f"{SLIDE_GROUP}/{name}")
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or dim not in (0, ds.shape[0]):
                return False
            attrs = {k: _plain(v) for k, v in ds.attrs.items()}
    except OSError:
        return False
    return all(attrs.get(k) == v for k, v in _source(inputs, patch_encoder).items())


def write_slide_embedding(h5_path: Path, name: str, embedding: Embedding, attrs: Mapping[str, Any]) -> None:
    """Write `slide_features/<name>` into a complete H5: temporary dataset, sync, rename.

    Raises:
        OutputError: the write failed (disk full, read-only...); nothing under the final name changed.
        SlideError: the file cannot be opened as HDF5.
    """
    store = SlideH5.open_existing(h5_path, 0)
    try:
        store.put_dataset(SLIDE_GROUP, name, np.asarray(embedding.vector, dtype=np.float32), attrs)
        store.finalize()
    except BaseException:
        store.abort()
        raise


# -- patient embeddings ---------------------------------------------------------------------------------------------


def patient_path(output: Path, encoder: str, case_id: str) -> Path:
    """`<out>/patient_features/<encoder>/<case_id>.h5`."""
    return output / PATIENT_FOLDER / encoder / f"{case_id}.h5"


def patient_attrs(name: str, patch_encoder: str, manifest: Path, slides: Sequence[SlideInputs],
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """Upstream's file attributes of a patient file (JSON source lists), then ours."""
    summaries = [{"h5_path": str(s.h5_path), "num_patches": s.num_patches, "patch_size_level0": s.patch_size_level0,
                  "patch_size": s.patch_size, "target_magnification": s.target_magnification,
                  "wsi_path": s.wsi_path} for s in slides]
    return {"encoder_name": name, "num_slides": len(slides), "source_patch_encoder": patch_encoder,
            "source_manifest": str(manifest), "source_slide_h5_paths": json.dumps([str(s.h5_path) for s in slides]),
            "source_slide_patch_summaries": json.dumps(summaries), **extra}


UPSTREAM_PATIENT_KEYS = ("encoder_name", "num_slides", "source_patch_encoder", "source_manifest")
JSON_PATIENT_KEYS = ("source_slide_h5_paths", "source_slide_patch_summaries")


@on_h5_thread
def patient_current(path: Path, dim: int, wanted: Mapping[str, Any]) -> bool:
    """Whether an existing patient file was made from exactly the current sources (and has width `dim`, 0: any)."""
    try:
        with h5py.File(path, "r") as f:
            ds = f.get("features")
            if not isinstance(ds, h5py.Dataset) or (dim and ds.shape != (dim,)):
                return False
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError:
        return False
    same = all(attrs.get(k) == wanted[k] for k in UPSTREAM_PATIENT_KEYS)
    return same and all(_json(attrs.get(k)) == _json(wanted[k]) for k in JSON_PATIENT_KEYS)


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


@on_h5_thread
def write_patient(path: Path, embedding: Embedding, attrs: Mapping[str, Any]) -> None:
    """Write a patient file to a temporary name beside `path`, sync it and move it into place (H5 thread).

    Raises:
        OutputError: the write failed; no file under `path` changed.
    """
    tmp = owned_temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = OutputFile(tmp, create=True)
    except OSError as exc:
        raise _translate(exc, path) from exc
    try:
        with h5py.File(handle, "w") as f:
            ds = f.create_dataset("features", data=np.asarray(embedding.vector, dtype=np.float32))
            ds.id.close()
            f.attrs.update(attrs)
        handle.sync()
        handle.close()
        if handle.error is not None:
            raise _translate(handle.error, path)
        move_into_place(tmp, path)
    finally:
        handle.close()
        tmp.unlink(missing_ok=True)

