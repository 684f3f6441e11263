"""Slide and patient embeddings (encode-slide, encode-patient, process --slide-encoders) on synthetic slides, with
MOOZY built from the `moozy` package with seeded random weights on the CPU, and the weight-free mean pooling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

pytest.importorskip("moozy")

from atlaspatch_stream.testing.slide_models import write_lunit_weights, write_moozy_checkpoint  # noqa: E402

BASE = ["--patch-size", "224", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
        "--feature-precision", "float32", "--feature-batch-size", "8"]
UPSTREAM_SLIDE_ATTRS = {"encoder_name", "source_patch_encoder", "num_patches", "patch_size", "patch_size_level0",
                        "target_magnification"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic 40x slides (9 and 6 patches of 224 px at 20x)."""
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "a.svs", width=2048, height=2048, seed=3)
    write_synthetic_slide(folder / "b.svs", width=2048, height=1536, seed=4)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`--weights` flags for a seeded random MOOZY checkpoint (small shape) and Lunit ViT-S/8."""
    folder = tmp_path_factory.mktemp("weights")
    moozy = write_moozy_checkpoint(folder / "moozy.pt", seed=1)
    lunit = write_lunit_weights(folder / "lunit.safetensors", seed=2)
    return ["--weights", f"moozy={moozy}", "--weights", f"lunit_vit_small_patch8_dino={lunit}"]


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


def _slide_embeddings(out: Path) -> dict[tuple[str, str], tuple[np.ndarray, dict]]:
    found = {}
    for path in sorted((out / "patches").glob("*.h5")):
        with h5py.File(path, "r") as f:
            for name, ds in f.get("slide_features", {}).items():
                found[(path.stem, name)] = (ds[...], dict(ds.attrs))
    return found


@pytest.fixture(scope="module")
def encoded(slides: Path, weights: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input folder, output) of one `encode-slide --slide-encoders moozy,mean-<lunit>` run from raw slides."""
    folder = tmp_path_factory.mktemp("in")
    for stem in "ab":
        os.symlink(slides / f"{stem}.svs", folder / f"{stem}.svs")
    out = tmp_path_factory.mktemp("encoded")
    code, text = _cli(["encode-slide", str(folder), "-o", str(out), *BASE, *weights,
                       "--slide-encoders", "moozy,mean-lunit_vit_small_patch8_dino"])
    assert code == 0, text
    return folder, out


def test_encode_slide_moozy_and_mean_schema(encoded: tuple[Path, Path]) -> None:
    """encode-slide with moozy and mean-<lunit>: upstream's dataset and attributes in each slide's H5, the patch
    features computed on the way; mean pooling equals the mean of features/<patch encoder>; nothing temporary left."""
    _, out = encoded
    found = _slide_embeddings(out)
    assert set(found) == {(s, n) for s in "ab" for n in ("moozy", "mean-lunit_vit_small_patch8_dino")}
    for stem in "ab":
        vector, attrs = found[(stem, "moozy")]
        assert vector.shape == (64,) and vector.dtype == np.float32  # the checkpoint's width (768 for the real one)
        assert set(attrs) >= UPSTREAM_SLIDE_ATTRS
        assert attrs["source_patch_encoder"] == "lunit_vit_small_patch8_dino"
        assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["target_magnification"]) == (224, 448, 20)
        assert attrs["token_cap"] == 0 and attrs["subsampled"] == 0  # no cap on the CPU
        with h5py.File(out / "patches" / f"{stem}.h5", "r") as f:
            features = f["features/lunit_vit_small_patch8_dino"][...]
            assert attrs["num_patches"] == f.attrs["num_patches"] == len(features)
            assert [n for n in f["slide_features"] if n.startswith("__tmp_")] == []
        mean, _ = found[(stem, "mean-lunit_vit_small_patch8_dino")]
        np.testing.assert_allclose(mean, features.astype(np.float64).mean(axis=0), rtol=1e-6)
    assert not list((out / "patches").glob("*.lock")) and not list((out / "patches").glob(".*"))


def test_streamed_equals_two_pass_and_reuse(encoded: tuple[Path, Path], weights: list[str], tmp_path: Path) -> None:
    """process --slide-encoders (one run) gives the same embeddings as process followed by encode-slide (and as
    encode-slide from raw slides); a rerun reuses them (file untouched), --force recomputes them equal."""
    folder, encoded_out = encoded
    one, two = tmp_path / "one", tmp_path / "two"
    enc = ["--slide-encoders", "moozy"]
    assert _cli(["process", str(folder), "-o", str(one), *BASE, *weights,
                 "--feature-extractors", "lunit_vit_small_patch8_dino", *enc])[0] == 0
    assert _cli(["process", str(folder), "-o", str(two), *BASE, *weights,
                 "--feature-extractors", "lunit_vit_small_patch8_dino"])[0] == 0
    assert _slide_embeddings(two) == {}
    assert _cli(["encode-slide", str(folder), "-o", str(two), *BASE, *weights, *enc])[0] == 0
    streamed, two_pass = _slide_embeddings(one), _slide_embeddings(two)
    assert streamed.keys() == two_pass.keys() and len(streamed) == 2
    for key in streamed:
        np.testing.assert_array_equal(streamed[key][0], two_pass[key][0])
        np.testing.assert_array_equal(streamed[key][0], _slide_embeddings(encoded_out)[key][0])
    before = (one / "patches" / "a.h5").stat().st_mtime_ns
    assert _cli(["encode-slide", str(folder), "-o", str(one), *BASE, *weights, *enc])[0] == 0
    assert (one / "patches" / "a.h5").stat().st_mtime_ns == before
    assert _cli(["encode-slide", str(folder / "b.svs"), "-o", str(one), *BASE, *weights, *enc, "--force"])[0] == 0
    np.testing.assert_array_equal(_slide_embeddings(one)[("b", "moozy")][0], streamed[("b", "moozy")][0])


def _manifest(folder: Path, rows: list[str], name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text("case_id,slide_path,mpp\n" + "\n".join(rows) + "\n")
    return path


def test_encode_patient_schema_reuse_and_package_equality(encoded: tuple[Path, Path], weights: list[str],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """encode-patient over existing patch features: one file per case with upstream's dataset and attributes (JSON
    source lists); a one-slide case equals that slide's moozy slide embedding; the slide and patient embeddings equal
    the moozy package's own end-to-end `run_encoding` on the same H5s; a rerun reuses the files."""
    import moozy.encoding

    folder, out = encoded
    manifest = _manifest(folder, ["p1,a.svs,", "p1,b.svs,", "p2,b.svs,"], "patients.csv")
    args = ["encode-patient", str(manifest), "-o", str(out), *BASE, *weights, "--patient-encoders", "moozy"]
    code, text = _cli(args)
    assert code == 0, text
    assert "Completed 2 patient embedding(s), failures: 0" in text
    cases = out / "patient_features" / "moozy"
    assert sorted(p.name for p in cases.iterdir()) == ["p1.h5", "p2.h5"]
    with h5py.File(cases / "p1.h5", "r") as f:
        assert f["features"].shape == (64,) and f["features"].dtype == np.float32
        patient, attrs = f["features"][...], dict(f.attrs)
    assert attrs["encoder_name"] == "moozy" and attrs["num_slides"] == 2
    assert attrs["source_patch_encoder"] == "lunit_vit_small_patch8_dino"
    assert attrs["source_manifest"] == str(manifest)
    h5s = json.loads(attrs["source_slide_h5_paths"])
    assert [Path(p).name for p in h5s] == ["a.h5", "b.h5"]
    summaries = json.loads(attrs["source_slide_patch_summaries"])
    assert [set(s) for s in summaries] == [{"h5_path", "num_patches", "patch_size_level0", "patch_size",
                                           "target_magnification", "wsi_path"}] * 2
    slides = _slide_embeddings(out)
    with h5py.File(cases / "p2.h5", "r") as f:
        np.testing.assert_allclose(f["features"][...], slides[("b", "moozy")][0], rtol=1e-6)
    checkpoint = weights[1].split("=", 1)[1]
    monkeypatch.setattr(moozy.encoding, "ensure_checkpoint", lambda: checkpoint)  # its hub download step only
    moozy.encoding.run_encoding(h5s[:1], str(tmp_path / "ref_a.h5"))
    moozy.encoding.run_encoding(h5s, str(tmp_path / "ref_p1.h5"))
    with h5py.File(tmp_path / "ref_a.h5", "r") as ref:
        np.testing.assert_allclose(slides[("a", "moozy")][0], ref["features"][...], rtol=1e-5, atol=1e-6)
    with h5py.File(tmp_path / "ref_p1.h5", "r") as ref:
        np.testing.assert_allclose(patient, ref["features"][...], rtol=1e-5, atol=1e-6)
    before = (cases / "p1.h5").stat().st_mtime_ns
    assert _cli(args)[0] == 0
    assert (cases / "p1.h5").stat().st_mtime_ns == before
    assert sorted(p.name for p in cases.iterdir()) == ["p1.h5", "p2.h5"]


def test_target_mag_and_patch_size_refused_before_any_slide(slides: Path, weights: list[str], tmp_path: Path) -> None:
    """A --target-mag or --patch-size other than the encoder's stops the run with one line and writes nothing."""
    out = tmp_path / "out"
    args = ["encode-slide", str(slides), "-o", str(out), "--segmenter", "otsu", "--device", "cpu", *weights,
            "--slide-encoders", "moozy"]
    code, text = _cli([*args, "--patch-size", "224", "--target-mag", "40"])
    assert code == 1 and "moozy was trained at 20x: use --target-mag 20 (got 40)" in text
    code, text = _cli([*args, "--patch-size", "256", "--target-mag", "20"])
    assert code == 1 and "moozy needs --patch-size 224" in text
    assert not out.exists()


def test_missing_weights_one_line(slides: Path, tmp_path: Path) -> None:
    """Without the MOOZY checkpoint (offline, empty cache) the run stops before any slide with one line naming it."""
    code, text = _cli(["encode-slide", str(slides), "-o", str(tmp_path / "o"), *BASE, "--slide-encoders", "moozy"])
    assert code == 1
    line = [t for t in text.splitlines() if t.startswith("Error:")]
    assert len(line) == 1 and "AtlasAnalyticsLab/MOOZY" in line[0] and "--weights moozy=PATH" in line[0]
    assert not (tmp_path / "o" / "patches").exists()


def test_geometry_mismatch_fails_only_its_slide(slides: Path, tmp_path: Path) -> None:
    """An existing H5 made at another patch size fails only its own slide (upstream aborts the whole run)."""
    out = tmp_path / "out"
    other = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu"]
    assert _cli(["segment-and-get-coords", str(slides / "a.svs"), "-o", str(out), *other])[0] == 0
    code, text = _cli(["encode-slide", str(slides), "-o", str(out), *BASE, "--slide-encoders", "mean-color_stats"])
    assert code == 1
    fails = [t for t in text.splitlines() if t.startswith("[FAIL]")]
    assert len(fails) == 1 and "a.svs" in fails[0] and "use --force" in fails[0]
    assert set(_slide_embeddings(out)) == {("b", "mean-color_stats")}


@pytest.mark.parametrize(("rows", "expected"), [
    (["p1,missing.svs,"], "slide missing.svs not found"),
    ([",a.svs,"], "case id '' cannot name a file"),
    (["..,a.svs,"], "case id '..' cannot name a file"),
    (["x/y,a.svs,"], "case id 'x/y' cannot name a file"),
    (["p1,a.svs,", "p1,a.svs,"], "is listed twice for case 'p1'"),
    (["p1,a.svs,0.25", "p2,a.svs,0.5"], "two mpp values"),
    (["p1,a.svs,", "p2,sub/a.svs,"], "share the stem 'a'"),
])
def test_manifest_errors_one_line_before_any_slide(slides: Path, tmp_path: Path, rows: list[str],
                                                   expected: str) -> None:
    """Each of upstream's manifest rules is one `Error:` line naming the row, before any slide is opened."""
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    os.symlink(slides / "a.svs", folder / "a.svs")
    os.symlink(slides / "b.svs", folder / "sub" / "a.svs")
    code, text = _cli(["encode-patient", str(_manifest(folder, rows)), "-o", str(tmp_path / "out"), *BASE,
                       "--patient-encoders", "mean-color_stats"])
    lines = [t for t in text.splitlines() if t.strip()]
    assert code == 1 and len(lines) == 1 and expected in lines[0] and "manifest.csv line" in lines[0]
    assert not (tmp_path / "out").exists()


def test_killed_mid_write_leaves_no_partial_embedding(slides: Path, tmp_path: Path) -> None:
    """A process killed (SIGKILL) after writing the temporary dataset and before the rename leaves no
    slide_features/<name>; the next run writes it and drops the leftover."""
    out = tmp_path / "out"
    assert _cli(["process", str(slides / "a.svs"), "-o", str(out), *BASE, "--feature-extractors", "color_stats"])[0] == 0
    h5 = out / "patches" / "a.h5"
    code = (
        "import os, numpy as np\n"
        "from pathlib import Path\n"
        "from atlaspatch_stream.outputs.h5store import SlideH5\n"
        f"store = SlideH5.open_existing(Path({str(h5)!r}), 0)\n"
        "store.put_dataset('slide_features', 'mean-color_stats', np.ones(3, np.float32), {})\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy())
    assert proc.returncode == -9
    with h5py.File(h5, "r") as f:
        assert "mean-color_stats" not in f.get("slide_features", {})
    assert _cli(["encode-slide", str(slides / "a.svs"), "-o", str(out), *BASE,
                 "--slide-encoders", "mean-color_stats"])[0] == 0
    with h5py.File(h5, "r") as f:
        assert list(f["slide_features"]) == ["mean-color_stats"]


@pytest.mark.slow
def test_real_slide_patient_and_slide(weights: list[str], tmp_path: Path) -> None:
    """A real Aperio slide: encode-patient writes its case file, then encode-slide reuses the patch features and
    writes the slide embedding, which equals the one-slide case's embedding (upstream's definition for moozy)."""
    from ..conftest import real_slide

    source = real_slide("aperio/CMU-1-Small-Region.svs")
    folder = tmp_path / "m"
    folder.mkdir()
    os.symlink(source, folder / source.name)
    out = tmp_path / "out"
    code, text = _cli(["encode-patient", str(_manifest(folder, [f"cmu1,{source.name},"])), "-o", str(out), *BASE,
                       *weights, "--patient-encoders", "moozy"])
    assert code == 0, text
    code, text = _cli(["encode-slide", str(folder), "-o", str(out), *BASE, *weights, "--slide-encoders", "moozy"])
    assert code == 0, text
    (vector, attrs), = _slide_embeddings(out).values()
    assert attrs["num_patches"] > 0 and attrs["patch_size_level0"] == 224  # a 20x scan: level-0 patches of 224
    with h5py.File(out / "patient_features" / "moozy" / "cmu1.h5", "r") as f:
        np.testing.assert_allclose(f["features"][...], vector, rtol=1e-5, atol=1e-6)
        assert json.loads(f.attrs["source_slide_patch_summaries"])[0]["num_patches"] == attrs["num_patches"]


def test_info_names_embedding_outputs() -> None:
    """`info` gains 1.1's two lines on where slide and patient embeddings go."""
    code, text = _cli(["info"])
    assert code == 0
    assert "slide_features/<encoder>" in text and "patient_features/<encoder>/<case_id>.h5" in text


def test_watch_with_slide_encoders(slides: Path, tmp_path: Path) -> None:
    """`watch --once --slide-encoders`: the daemon's slides get their slide embedding in the same run."""
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides / "b.svs", folder / "b.svs")
    out = tmp_path / "out"
    code, text = _cli(["watch", str(folder), "-o", str(out), "--patch-size", "224", "--target-mag", "20",
                       "--segmenter", "otsu", "--device", "cpu", "--once", "--settle-s", "0", "--allow-root",
                       "--slide-encoders", "mean-color_stats"])
    assert code == 0, text
    assert set(_slide_embeddings(out)) == {("b", "mean-color_stats")}


def test_library_slide_encoders(slides: Path, tmp_path: Path) -> None:
    """The library: `encode.slide_encoders` in the config embeds each slide in the same run; a slide encoder
    whose patch encoder is not among the extractors stops the pipeline before any slide, naming it."""
    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.errors import ConfigError
    from atlaspatch_stream.sync import process_slides

    def config(extractors: tuple[str, ...]):  # noqa: ANN202
        return load_config({"plan": {"patch_size": 224, "target_mag": 20},
                            "segment": {"segmenter": "otsu", "device": "cpu"},
                            "encode": {"device": "cpu", "extractors": extractors,
                                       "slide_encoders": ("mean-color_stats",)},
                            "write": {"output": tmp_path / "out"}}, environ={})

    with pytest.raises(ConfigError, match="add color_stats to the feature extractors"):
        process_slides([slides / "a.svs"], config(("resnet18",)))
    summary = process_slides([slides / "a.svs"], config(("color_stats",)))
    assert summary.ok and summary.results[0].notes["slide_features"] == ("mean-color_stats",)


def test_slide_locked_by_another_process_is_not_embedded(slides: Path, tmp_path: Path) -> None:
    """A slide whose patch features exist but whose lock a live process holds is reported locked and not embedded
    (the embedding takes `patches/<stem>.lock`, purpose slide-embedding); once released it is embedded."""
    out = tmp_path / "out"
    base = [*BASE, "--slide-encoders", "mean-color_stats"]
    assert _cli(["process", str(slides / "a.svs"), "-o", str(out), *BASE, "--feature-extractors", "color_stats"])[0] == 0
    lock = out / "patches" / "a.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom pathlib import Path\nfrom atlaspatch_stream.outputs import claims\n"
        f"claims.try_claim(Path({str(lock)!r}), slide='a')\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, text = _cli(["encode-slide", str(slides / "a.svs"), "-o", str(out), *base])
        assert code == 0 and "[SKIP]" in text and "locked by another process" in text
        assert _slide_embeddings(out) == {}
    finally:
        holder.kill()
        holder.wait()
    assert _cli(["encode-slide", str(slides / "a.svs"), "-o", str(out), *base])[0] == 0
    assert set(_slide_embeddings(out)) == {("a", "mean-color_stats")}
