"""Slide and patient embedding files: atomic writes under a failing disk, reuse rules, locks, and plugins."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream.errors import OutputError
from atlaspatch_stream.outputs import claims
from atlaspatch_stream.outputs import embeddings_h5 as store
from atlaspatch_stream.protocols import Embedding, SlideInputs
from atlaspatch_stream.testing import faults


def _slide_h5(path: Path, n: int = 5, dim: int = 3) -> Path:
    """A complete slide H5 as the pipeline writes it (coords, root attributes, one feature set)."""
    with h5py.File(path, "w") as f:
        coords = np.array([[i * 448, 0, 448, 448, 0] for i in range(n)], dtype=np.int32).reshape(n, 5)
        f.create_dataset("coords", data=coords)
        f.create_dataset("features/enc", data=np.arange(n * dim, dtype=np.float32).reshape(n, dim))
        f.attrs.update({"num_patches": n, "patch_size": 224, "patch_size_level0": 448, "target_magnification": 20,
                        "wsi_path": "/slides/s.svs"})
    return path


def _inputs(path: Path) -> SlideInputs:
    return store.read_slide_inputs(path, "enc")


def test_read_inputs_and_reuse_rules(tmp_path: Path) -> None:
    """Inputs come from the H5 (coords as int64 x, y); an embedding is current only when width, source encoder,
    patch size, patch count, level-0 patch size and magnification all match."""
    h5 = _slide_h5(tmp_path / "s.h5")
    inputs = _inputs(h5)
    assert inputs.coords.dtype == np.int64 and inputs.coords.shape == (5, 2) and inputs.num_patches == 5
    embedding = Embedding(np.ones(4, np.float32), {"token_cap": 0})
    attrs = store.slide_attrs("pool", inputs, "enc", embedding)
    store.write_slide_embedding(h5, "pool", embedding, attrs)
    assert store.slide_embedding_current(h5, "pool", 4, inputs, "enc")
    assert not store.slide_embedding_current(h5, "absent", 0, inputs, "enc")
    assert not store.slide_embedding_current(h5, "pool", 8, inputs, "enc")
    assert not store.slide_embedding_current(h5, "pool", 4, inputs, "other")
    for key, value in (("num_patches", 6), ("patch_size_level0", 896), ("target_magnification", 40)):
        with h5py.File(h5, "a") as f:
            old = f["slide_features/pool"].attrs[key]
            f["slide_features/pool"].attrs[key] = value
        assert not store.slide_embedding_current(h5, "pool", 4, inputs, "enc")
        with h5py.File(h5, "a") as f:
            f["slide_features/pool"].attrs[key] = old


def test_rows_mismatch_is_a_slide_error(tmp_path: Path) -> None:
    """features/<enc> with fewer rows than patches (another tool's partial set) is refused with one message."""
    h5 = _slide_h5(tmp_path / "s.h5")
    with h5py.File(h5, "a") as f:
        del f["features/enc"]
        f.create_dataset("features/enc", data=np.zeros((3, 3), np.float32))
    with pytest.raises(Exception, match="has 3 rows for 5 patches"):
        _inputs(h5)


@pytest.mark.parametrize("at", [1, 2, 3])
def test_full_disk_leaves_no_slide_embedding(tmp_path: Path, at: int) -> None:
    """ENOSPC at the k-th write: OutputError, the old embedding (if any) untouched, no temporary dataset."""
    h5 = _slide_h5(tmp_path / "s.h5")
    inputs = _inputs(h5)
    old = Embedding(np.zeros(4, np.float32), {})
    store.write_slide_embedding(h5, "pool", old, store.slide_attrs("pool", inputs, "enc", old))
    new = Embedding(np.ones(4, np.float32), {})
    with faults.inject(at=at, errno=errno.ENOSPC), pytest.raises(OutputError):
        store.write_slide_embedding(h5, "pool", new, store.slide_attrs("pool", inputs, "enc", new))
    with h5py.File(h5, "r") as f:
        assert list(f["slide_features"]) == ["pool"]
        np.testing.assert_array_equal(f["slide_features/pool"][...], old.vector)


@pytest.mark.parametrize("at", [1, 2, 4])
def test_full_disk_leaves_no_patient_file(tmp_path: Path, at: int) -> None:
    """A patient file that cannot be written leaves neither the file nor its temporary file."""
    h5 = _slide_h5(tmp_path / "s.h5")
    path = store.patient_path(tmp_path / "out", "pool", "case1")
    embedding = Embedding(np.ones(4, np.float32), {})
    attrs = store.patient_attrs("pool", "enc", tmp_path / "m.csv", [_inputs(h5)], {})
    with faults.inject(at=at, errno=errno.ENOSPC), pytest.raises(OutputError):
        store.write_patient(path, embedding, attrs)
    assert list(path.parent.iterdir()) == []
    store.write_patient(path, embedding, attrs)
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (4,)
        assert json.loads(f.attrs["source_slide_h5_paths"]) == [str(h5)]
    assert store.patient_current(path, 4, attrs) and not store.patient_current(path, 5, attrs)
    assert not store.patient_current(path, 4, {**attrs, "source_manifest": "/other.csv"})


def test_patient_lock_held_elsewhere_and_orphans_swept(tmp_path: Path) -> None:
    """A live holder of <case_id>.lock makes the case `locked`; a dead writer's temporary file is swept."""
    from atlaspatch_stream.backends.encoders.slide_mean import MeanPooling
    from atlaspatch_stream.outputs.embeddings import PatientEmbedder

    h5 = _slide_h5(tmp_path / "s.h5")
    out = tmp_path / "out"
    embedder = PatientEmbedder([MeanPooling("mean-enc", "enc")], out, tmp_path / "m.csv", force=False)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom atlaspatch_stream.outputs import claims\n"
        f"claims.try_claim(Path({str(store.patient_path(out, 'mean-enc', 'c1').with_suffix('.lock'))!r}), slide='c1')\n"
        "print('held', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert embedder.embed_case(embedder.encoders[0], "c1", [h5]) == "locked"
    finally:
        holder.kill()
        holder.wait()
    dead = subprocess.run([sys.executable, "-c", (
        "from pathlib import Path\nfrom atlaspatch_stream.outputs.claims import owned_temp_path\n"
        f"p = owned_temp_path(Path({str(store.patient_path(out, 'mean-enc', 'c2'))!r}))\n"
        "p.write_bytes(b'partial'); print(p)\n")], capture_output=True, text=True, env=os.environ.copy(), check=True)
    embedder.warm_up()
    assert not Path(dead.stdout.strip()).exists()
    assert embedder.embed_case(embedder.encoders[0], "c1", [h5]) == "done"
    assert embedder.embed_case(embedder.encoders[0], "c1", [h5]) == "reused"
    assert sorted(p.name for p in store.patient_path(out, "mean-enc", "c1").parent.iterdir()) == ["c1.h5"]
    assert claims.judge(store.patient_path(out, "mean-enc", "c1").with_suffix(".lock")).state != "held"


PLUGIN = '''
import numpy as np
from atlaspatch_stream.protocols import Embedding


class MaxPool:
    name = "maxpool"
    patch_encoder = "color_stats"
    dim = 0

    def warm_up(self):
        pass

    def encode(self, slides):
        return Embedding(np.concatenate([s.features for s in slides]).max(axis=0), {"pooling": "max"})

    def close(self):
        pass


def register_slide_encoders(registry, device):
    registry.register("maxpool", patch_encoder="color_stats", dim=0, builder=MaxPool, patient=True)
'''


def test_plugin_slide_encoder(tmp_path: Path) -> None:
    """A `--feature-plugin` file registering only a slide encoder: planned like a built-in (its patch encoder is
    added), and its name cannot shadow a built-in."""
    from atlaspatch_stream.backends.encoders.slide_registry import build_slide_registry, plan_slide_encoders
    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.errors import ConfigError

    plugin = tmp_path / "maxpool.py"
    plugin.write_text(PLUGIN)
    config = load_config({"plan": {"patch_size": 224, "target_mag": 20},
                          "encode": {"device": "cpu", "plugins": (plugin,)}}, environ={})
    planned = plan_slide_encoders(config, ["maxpool"], patient=True)
    assert planned.encode.extractors == ("color_stats",)
    encoder = build_slide_registry(config).create("maxpool")
    h5 = _slide_h5(tmp_path / "s.h5")
    embedding = encoder.encode([store.read_slide_inputs(h5, "enc")])
    np.testing.assert_array_equal(embedding.vector, [12, 13, 14])
    with pytest.raises(ConfigError, match="already registered"):
        build_slide_registry(config).register("moozy", patch_encoder="x", dim=1, builder=encoder.__class__)


def test_zero_patch_slide_fails_alone(tmp_path: Path) -> None:
    """A slide without patches has no embedding: a SlideError for that slide, nothing written."""
    from atlaspatch_stream.backends.encoders.slide_mean import MeanPooling
    from atlaspatch_stream.errors import SlideError
    from atlaspatch_stream.outputs.embeddings import SlideEmbedderH5

    h5 = _slide_h5(tmp_path / "s.h5", n=0)
    embedder = SlideEmbedderH5([MeanPooling("mean-enc", "enc")], tmp_path, force=False)
    with pytest.raises(SlideError, match="no patches"):
        embedder.embed(h5)
    with h5py.File(h5, "r") as f:
        assert "slide_features" not in f
