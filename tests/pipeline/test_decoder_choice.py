"""`process` with each tile decoder: the GPU backends' CPU modes give the same features as the `cpu` decoder."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import orjson
import pytest

from atlaspatch_stream.assembly import RealBackends
from atlaspatch_stream.config import load_config
from atlaspatch_stream.errors import MissingExtraError
from atlaspatch_stream.sync import process_slides
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

from ..conftest import real_slide

pytest.importorskip("nvidia.dali")
pytest.importorskip("nvidia.nvimgcodec")


def _config(out: Path, decoder: str):
    return load_config({
        "plan": {"patch_size": 224, "target_mag": 20},
        "segment": {"segmenter": "otsu", "device": "cpu"},
        "encode": {"extractors": ("color_stats",), "device": "cpu", "precision": "float32", "batch_size": 16},
        "read": {"reader_threads": 2, "chunk_patches": 16, "decoder": decoder, "decode_batch": 32},
        "write": {"output": out},
    }, environ={})


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1 (real Aperio RGB JPEG) and a synthetic 40× YCbCr JPEG slide, side by side."""
    folder = tmp_path_factory.mktemp("slides")
    (folder / "cmu.svs").symlink_to(real_slide("aperio/CMU-1-Small-Region.svs"))
    write_synthetic_slide(folder / "ycc.svs", width=3072, height=2048, seed=5, compression="jpeg_ycbcr")
    return folder


def _features(out: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(out / "patches" / f"{stem}.h5") as f:
        return f["coords"][...], f["features/color_stats"][...]


@pytest.mark.parametrize("decoder", ["dali", "nvimgcodec"])
def test_process_with_gpu_backend_cpu_mode_equals_cpu_decoder(slides: Path, tmp_path: Path, decoder: str) -> None:
    """`process --decoder dali` (and nvimgcodec) on a machine without CUDA, i.e. through the libraries' CPU
    backends: every slide done, the same coordinates and bit-identical color_stats features as `--decoder cpu`."""
    ref_out, out = tmp_path / "cpu", tmp_path / decoder
    assert process_slides([slides], _config(ref_out, "cpu")).ok
    summary = process_slides([slides], _config(out, decoder))
    assert summary.ok and summary.count("done") == 2
    events = [orjson.loads(line) for line in (out / "atlaspatch-report.jsonl").read_bytes().splitlines()]
    routes = {Path(e["slide"]).stem: e["decode_routes"] for e in events if e["event"] == "slide"}
    assert routes == {"cmu": f"level 0: {decoder}", "ycc": f"level 0: {decoder}"}  # how each level was decoded
    for stem in ("cmu", "ycc"):
        coords, feats = _features(out, stem)
        ref_coords, ref_feats = _features(ref_out, stem)
        assert len(coords) > 0
        np.testing.assert_array_equal(coords, ref_coords)
        np.testing.assert_array_equal(feats, ref_feats)


def test_backends_share_one_decoder_and_report_routes(slides: Path, tmp_path: Path) -> None:
    """The backends build the decoder once (before any slide, with the encoders) and every slide's reader uses it;
    each slide's patch iterator says which decoder read each level."""
    from atlaspatch_stream.items import OpenedSlide, PatchPlan, SlideJob

    backends = RealBackends(_config(tmp_path / "o", "dali"))
    encoders = backends.make_encoders().encoders
    decoder = backends.pixels.decoder()
    assert decoder.name == "dali" and backends.pixels.decoder() is decoder
    job = SlideJob(0, slides / "cmu.svs", "cmu")
    handle = backends.slides.open_slide(job)
    try:
        coords = np.array([[0, 0, 224, 224, 0], [500, 700, 224, 224, 0]], np.int32)
        it = backends.pixels.iter_patches(PatchPlan(OpenedSlide(job, handle), None, coords), 224, 16, 2)
        assert sum(len(rows) for rows, _ in it) == 2
        assert it.routes == "level 0: dali"  # type: ignore[attr-defined]
    finally:
        handle.close()
        for enc in encoders:
            enc.close()


def test_missing_decoder_extra_fails_before_any_slide(slides: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`process --decoder dali` without DALI importable: the run stops with MissingExtraError naming `[dali]`
    before any slide is opened (no output file appears)."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    out = tmp_path / "o"
    with pytest.raises(MissingExtraError, match=r"\[dali\]"):
        process_slides([slides], _config(out, "dali"))
    assert not list(out.glob("patches/*.h5"))
