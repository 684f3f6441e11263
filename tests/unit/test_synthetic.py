"""The synthetic slide writer: every variant opens in tiffslide and OpenSlide with the written mpp, power and pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from atlaspatch_stream.testing import draw_tissue, pyramid, write_image, write_synthetic_slide

SMALL = {"width": 1024, "height": 768, "tile": 128, "levels": (1, 4)}


def _levels_tiffslide(path: Path) -> list[np.ndarray]:
    with tiffslide.TiffSlide(str(path)) as slide:
        return [
            slide.read_region((0, 0), i, size, as_array=True) for i, size in enumerate(slide.level_dimensions)
        ]


def _levels_openslide(path: Path) -> list[np.ndarray]:
    with openslide.OpenSlide(str(path)) as slide:
        return [
            np.asarray(slide.read_region((0, 0), i, size).convert("RGB"))
            for i, size in enumerate(slide.level_dimensions)
        ]


@pytest.mark.parametrize("compression", ["jpeg_rgb", "jpeg_ycbcr", "deflate", "jpeg2000"])
def test_variants_read_identically_in_tiffslide_and_openslide(tmp_path: Path, compression: str) -> None:
    """Write each compression; both readers report 0.25 µm/px and 40× and decode the same pixels at every level,
    and those pixels are close to the drawing (exact for deflate)."""
    path = write_synthetic_slide(tmp_path / "s.svs", compression=compression, seed=3, **SMALL)  # type: ignore[arg-type]
    with tiffslide.TiffSlide(str(path)) as ts:
        assert ts.properties["tiffslide.mpp-x"] == pytest.approx(0.25)
        assert ts.properties["tiffslide.objective-power"] == 40
        assert ts.level_dimensions == ((1024, 768), (256, 192))
    with openslide.OpenSlide(str(path)) as osl:
        assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert osl.properties["openslide.objective-power"] == "40"
        assert osl.properties["openslide.vendor"] == "aperio"
    ours, theirs = _levels_tiffslide(path), _levels_openslide(path)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    drawn = pyramid(draw_tissue(1024, 768, seed=3)[0], (1, 4))
    for level, expected in zip(ours, drawn, strict=True):
        error = np.abs(level.astype(np.int16) - expected).mean()
        assert error == 0 if compression == "deflate" else error < 4.0


def test_jpeg_rgb_tiles_are_written_like_aperio(tmp_path: Path) -> None:
    """Photometric RGB JPEG tiles without APP14 (Adobe) or APP0 (JFIF) markers, component ids 0, 1, 2."""
    path = write_synthetic_slide(tmp_path / "s.svs", compression="jpeg_rgb", **SMALL)  # type: ignore[arg-type]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.RGB and page.compression == tifffile.COMPRESSION.JPEG
        tif.filehandle.seek(page.dataoffsets[0])
        data = tif.filehandle.read(page.databytecounts[0])
        assert page.description.startswith("Aperio Image Library") and "AppMag = 40" in page.description
    assert data[:2] == b"\xff\xd8" and b"\xff\xee" not in data[:200] and b"JFIF" not in data[:200]
    sof = data.index(b"\xff\xc0")
    assert [data[sof + 10 + 3 * i] for i in range(3)] == [0, 1, 2]


def test_variant_without_mpp(tmp_path: Path) -> None:
    """mpp=None: neither reader finds an mpp; the objective power is still there."""
    path = write_synthetic_slide(tmp_path / "s.svs", mpp=None, **SMALL)  # type: ignore[arg-type]
    with tiffslide.TiffSlide(str(path)) as ts:
        assert ts.properties["tiffslide.mpp-x"] is None and ts.properties["tiffslide.objective-power"] == 40
    with openslide.OpenSlide(str(path)) as osl:
        assert "openslide.mpp-x" not in osl.properties and osl.properties["openslide.objective-power"] == "40"


def test_drawing_is_deterministic_and_tissue_modes_hold() -> None:
    """Same seed, same pixels; another seed differs; blobs cover part of the slide, none/full cover nothing/all."""
    a, mask = draw_tissue(320, 240, seed=1)
    b, _ = draw_tissue(320, 240, seed=1)
    c, _ = draw_tissue(320, 240, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.05 < mask.mean() < 0.8
    assert a[mask].mean() < a[~mask].mean() - 30  # tissue is darker than the near-white background
    assert not draw_tissue(64, 48, tissue="none")[1].any()
    assert draw_tissue(64, 48, tissue="full")[1].all()


def test_pyramid_is_a_rounded_block_mean() -> None:
    """Level k is the rounded mean of k×k blocks, cropped to whole blocks."""
    image = np.random.default_rng(0).integers(0, 256, (10, 9, 3), dtype=np.uint8)
    level = pyramid(image, (1, 2))[1]
    expected = np.floor(image[:10, :8].reshape(5, 2, 4, 2, 3).astype(float).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(level, expected.astype(np.uint8))


def test_write_image_png_is_lossless(tmp_path: Path) -> None:
    """A flat PNG holds exactly the drawn pixels."""
    from PIL import Image

    path = write_image(tmp_path / "img.png", width=200, height=150, seed=4)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), draw_tissue(200, 150, seed=4)[0])


def test_import_is_light() -> None:
    """Importing the helpers pulls in neither torch nor cv2 (nor the TIFF libraries)."""
    code = (
        "import sys, atlaspatch_stream.testing, atlaspatch_stream.backends.slides, atlaspatch_stream.sources.discover;"
        "bad = [m for m in ('torch', 'cv2', 'tifffile', 'tiffslide', 'openslide') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
