"""Slide backends: real slides open with the expected backend and metadata, pixels equal the libraries', the
thumbnail equals upstream's §3.2 computed directly with OpenSlide, the strip path equals the whole-level path, and
bad inputs give one-line SlideErrors."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from PIL import Image

from atlaspatch_stream.backends.slides import open_slide
from atlaspatch_stream.errors import SlideError
from atlaspatch_stream.formats import SUPPORTED_EXTENSIONS
from atlaspatch_stream.geometry import optimal_level
from atlaspatch_stream.protocols import SlideHandle
from atlaspatch_stream.testing import draw_tissue, write_image, write_synthetic_slide
from tests.conftest import real_slide


def upstream_thumbnail(
    path: Path, magnification: int, power: float = 1.25, max_size: int = 1024
) -> np.ndarray:
    """Upstream §3.2 steps 2-6 written out directly on OpenSlide, for comparison."""
    with openslide.OpenSlide(str(path)) as slide:
        w0, h0 = slide.dimensions
        target_ds = magnification / power
        level = optimal_level(tuple(slide.level_downsamples), target_ds)
        level_ds = slide.level_downsamples[level]
        size = (round(w0 / level_ds), round(h0 / level_ds))
        region = np.asarray(slide.read_region((0, 0), level, size).convert("RGB"))
    target = (max(1, round(w0 / target_ds)), max(1, round(h0 / target_ds)))
    shrink = target[0] < size[0] or target[1] < size[1]
    resized = cv2.resize(region, target, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    image = Image.fromarray(resized)
    image.thumbnail((max_size, max_size))
    return np.asarray(image)


REAL = [
    # relative path, backend, mpp, magnification, vendor, level count
    ("aperio/CMU-1-Small-Region.svs", "tiffslide", 0.499, 20, "aperio", 1),
    ("aperio/small-16x16.svs", "tiffslide", 0.499, 20, "aperio", 1),
    ("hamamatsu/test3-DAPI-2-387.ndpi", "openslide", 0.2282, 40, "hamamatsu", 7),
    ("generic-tiff/boxes.tiff", "tiffslide", None, None, "generic-tiff", 4),  # 352.8 µm/px is no real mpp
    ("dicom/boxes", "openslide", 0.499, 20, "dicom", 1),
    ("dicom/camelyon-multiframe", "openslide", None, None, "dicom", 1),  # 28.97 µm/px: implausible
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("relative", "backend", "mpp", "mag", "vendor", "levels"), REAL)
def test_real_slides_open_with_expected_backend_and_metadata(
    relative: str, backend: str, mpp: float | None, mag: int | None, vendor: str, levels: int
) -> None:
    """Open each real slide; backend, mpp (4 dp), magnification, vendor and pyramid are as expected."""
    path = real_slide(relative)
    handle = open_slide(path)
    try:
        assert isinstance(handle, SlideHandle)
        assert handle.backend == backend == handle.info.backend
        assert (handle.info.mpp, handle.info.magnification, handle.info.vendor) == (mpp, mag, vendor)
        assert len(handle.info.level_dimensions) == levels
        assert handle.path == path
        assert (handle.tiff_path == path) if backend == "tiffslide" else handle.tiff_path is None
    finally:
        handle.close()


def test_boxes_tiff_gets_magnification_from_csv() -> None:
    """boxes.tiff has no objective power and a 72-dpi-like resolution: a CSV mpp of 0.5 makes it 20×."""
    handle = open_slide(real_slide("generic-tiff/boxes.tiff"), mpp_override=0.5)
    assert (handle.info.mpp, handle.info.magnification) == (0.5, 20)
    handle.close()


def test_csv_overrides_objective_power_of_a_real_slide() -> None:
    """CMU is tagged 20×; a CSV mpp of 0.25 makes it 40× (our improvement over upstream)."""
    handle = open_slide(real_slide("aperio/CMU-1-Small-Region.svs"), mpp_override=0.25)
    assert (handle.info.mpp, handle.info.magnification) == (0.25, 40)
    handle.close()


@pytest.mark.parametrize("relative", ["errors/unopenable.tiff", "errors/unreadable.svs"])
def test_broken_slides_fail_with_one_line_slide_error(relative: str) -> None:
    """Opening or reading a broken slide raises SlideError whose message is one line naming the cause."""
    path = real_slide(relative)
    with pytest.raises(SlideError) as caught:
        handle = open_slide(path, name="broken")
        try:
            handle.read_region(0, 0, 0, 16, 16)
        finally:
            handle.close()
    line = caught.value.one_line()
    assert "\n" not in line and line.startswith("broken: ")
    assert "COMPRESSION" in line or "Bogus marker length" in line


def _tiffslide_region(path: Path, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    with tiffslide.TiffSlide(str(path)) as slide:
        return slide.read_region((x, y), level, (w, h), as_array=True)


def _openslide_region(path: Path, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((x, y), level, (w, h)).convert("RGB"))


@pytest.mark.parametrize(
    ("relative", "library", "region"),
    [
        ("aperio/CMU-1-Small-Region.svs", _tiffslide_region, (2100, 2900, 0, 300, 200)),
        ("aperio/CMU-1-Small-Region.svs", _openslide_region, (2100, 2900, 0, 300, 200)),
        ("generic-tiff/boxes.tiff", _tiffslide_region, (200, 150, 2, 64, 64)),
        (
            "dicom/camelyon-multiframe/multiframe_camelyon_challenge_image.dcm",
            _openslide_region,
            (1000, 600, 0, 300, 200),
        ),
    ],
)
def test_read_region_equals_library_across_slide_edges(
    relative: str, library, region: tuple[int, ...]
) -> None:
    """A region crossing the right/bottom edges equals the library's read_region converted to RGB (black outside)."""
    path = real_slide(relative)
    handle = open_slide(path)
    try:
        ours = handle.read_region(*region)
    finally:
        handle.close()
    assert ours.shape == (region[4], region[3], 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, library(path, *region))
    assert (ours[-5:, -5:] == 0).all()  # outside the slide


@pytest.mark.parametrize(
    ("relative", "mpp_override"),
    [("aperio/CMU-1-Small-Region.svs", None), ("generic-tiff/boxes.tiff", 0.5), ("dicom/boxes", None)],
)
def test_thumbnail_equals_upstream_on_real_slides(relative: str, mpp_override: float | None) -> None:
    """Our thumbnail (whole-level path) is bit-identical to upstream's §3.2 computed with OpenSlide."""
    path = real_slide(relative)
    handle = open_slide(path, mpp_override=mpp_override)
    try:
        ours = handle.thumbnail(1.25, 1024, 512)
        assert handle.info.magnification is not None
        file = next(path.glob("*.dcm")) if path.is_dir() else path
        np.testing.assert_array_equal(ours, upstream_thumbnail(file, handle.info.magnification))
    finally:
        handle.close()


@pytest.fixture(scope="module")
def synthetic_exact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2048×1536 at 40×, levels 1/4: the thumbnail level (ds 4, 512×384) shrinks by exactly 8 to 64×48."""
    return write_synthetic_slide(
        tmp_path_factory.mktemp("s") / "exact.svs", width=2048, height=1536, tile=128, levels=(1, 4), seed=5
    )


@pytest.fixture(scope="module")
def synthetic_odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2000×1500 at 40×, levels 1/4: 500×375 → 62×47, a non-integer factor."""
    return write_synthetic_slide(
        tmp_path_factory.mktemp("s") / "odd.svs", width=2000, height=1500, tile=128, levels=(1, 4), seed=6
    )


def test_thumbnail_equals_upstream_on_synthetic(synthetic_exact: Path) -> None:
    """Whole-level path on a synthetic slide equals upstream's computation on OpenSlide."""
    with open_slide(synthetic_exact) as handle:  # type: ignore[attr-defined]
        np.testing.assert_array_equal(
            handle.thumbnail(1.25, 1024, 512), upstream_thumbnail(synthetic_exact, 40)
        )


def _spy_rows(handle) -> list[int]:
    """Record the height of every strip the handle reads (a spy on the real method, not a stand-in)."""
    heights: list[int] = []
    original = handle._read_rows

    def recording(level: int, row0: int, row1: int, width: int) -> np.ndarray:
        heights.append(row1 - row0)
        return original(level, row0, row1, width)

    handle._read_rows = recording
    return heights


def test_strip_path_is_bit_exact_for_integer_factors(synthetic_exact: Path) -> None:
    """With a zero budget the level is read in 8-row strips; the thumbnail is bit-identical to the whole read."""
    with open_slide(synthetic_exact) as handle:  # type: ignore[attr-defined]
        whole = handle.thumbnail(1.25, 1024, 512)
        heights = _spy_rows(handle)
        strips = handle.thumbnail(1.25, 1024, 0)
    assert heights and max(heights) == 8 and sum(heights) == 384
    assert whole.shape == (48, 64, 3)
    np.testing.assert_array_equal(strips, whole)


def test_strip_path_is_closest_possible_for_other_factors(synthetic_odd: Path) -> None:
    """Non-integer factor: strips give the area mean within one grey level of cv2's whole-level INTER_AREA."""
    with open_slide(synthetic_odd) as handle:  # type: ignore[attr-defined]
        whole = handle.thumbnail(1.25, 1024, 512)
        heights = _spy_rows(handle)
        strips = handle.thumbnail(1.25, 1024, 0)
    assert len(heights) > 1 and sum(heights) == 375
    assert whole.shape == strips.shape == (47, 62, 3)
    diff = np.abs(whole.astype(np.int16) - strips)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


def test_thumbnail_max_size_is_a_pil_thumbnail(synthetic_exact: Path) -> None:
    """A smaller max_size shrinks the same image with PIL's thumbnail (aspect kept)."""
    with open_slide(synthetic_exact) as handle:  # type: ignore[attr-defined]
        small = handle.thumbnail(1.25, 32, 512)
    assert small.shape == (24, 32, 3)
    np.testing.assert_array_equal(small, upstream_thumbnail(synthetic_exact, 40, max_size=32))


def test_thumbnail_needs_magnification() -> None:
    """Magnification unknown is no open error, but the thumbnail refuses it."""
    handle = open_slide(real_slide("generic-tiff/boxes.tiff"))
    with pytest.raises(SlideError, match="magnification is unknown"):
        handle.thumbnail(1.25, 1024, 512)
    handle.close()


def test_overlay_thumbnail_matches_openslide_get_thumbnail(synthetic_exact: Path) -> None:
    """The overlay thumbnail is OpenSlide's get_thumbnail (white background, aspect kept)."""
    with openslide.OpenSlide(str(synthetic_exact)) as slide:
        expected = np.asarray(slide.get_thumbnail((300, 300)).convert("RGB"))
    with open_slide(synthetic_exact) as handle:  # type: ignore[attr-defined]
        ours = handle.overlay_thumbnail(300)
    assert ours.shape == expected.shape == (225, 300, 3)
    assert np.abs(ours.astype(np.int16) - expected).max() <= 1


def test_concurrent_reads_equal_serial_reads(synthetic_exact: Path) -> None:
    """Four threads reading different regions of one handle get what serial reads get."""
    regions = [(x * 100, y * 100, 0, 128, 128) for x in range(4) for y in range(4)]
    with open_slide(synthetic_exact) as handle:  # type: ignore[attr-defined]
        serial = [handle.read_region(*r) for r in regions]
        results: dict[int, np.ndarray] = {}

        def work(offset: int) -> None:
            for i in range(offset, len(regions), 4):
                results[i] = handle.read_region(*regions[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, expected in enumerate(serial):
        np.testing.assert_array_equal(results[i], expected)


def test_plain_image_needs_csv_mpp_and_reads_like_a_crop(tmp_path: Path) -> None:
    """A PNG needs an mpp; with 0.5 it is a one-level 20× slide whose regions are crops, black outside."""
    path = write_image(tmp_path / "img.PNG", width=300, height=200, seed=2)
    with pytest.raises(SlideError, match="mpp is required"):
        open_slide(path)
    handle = open_slide(path, mpp_override=0.5)
    drawn = draw_tissue(300, 200, seed=2)[0]
    assert (handle.backend, handle.info.magnification, handle.info.level_dimensions) == (
        "pillow",
        20,
        ((300, 200),),
    )
    region = handle.read_region(250, 150, 0, 100, 100)
    np.testing.assert_array_equal(region[:50, :50], drawn[150:, 250:])
    assert (region[50:] == 0).all() and (region[:, 50:] == 0).all()
    np.testing.assert_array_equal(handle.thumbnail(1.25, 1024, 512), _upstream_image_thumbnail(drawn, 16))
    handle.close()


def _upstream_image_thumbnail(image: np.ndarray, target_ds: float) -> np.ndarray:
    h, w = image.shape[:2]
    resized = cv2.resize(image, (round(w / target_ds), round(h / target_ds)), interpolation=cv2.INTER_AREA)
    pil = Image.fromarray(resized)
    pil.thumbnail((1024, 1024))
    return np.asarray(pil)


def test_non_rgb_images_are_refused(tmp_path: Path) -> None:
    """Multiplex planes (CYX), 16-bit RGB, RGBA samples and 16-bit PNGs are refused with a clear one-line error."""
    planes = tmp_path / "multiplex.tif"
    tifffile.imwrite(planes, np.zeros((3, 64, 64), np.uint8), photometric="minisblack", tile=(32, 32))
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((64, 64, 3), np.uint16), photometric="rgb", tile=(32, 32))
    rgba = tmp_path / "rgba.tiff"
    tifffile.imwrite(
        rgba, np.zeros((64, 64, 4), np.uint8), photometric="rgb", tile=(32, 32), extrasamples=[2]
    )
    png16 = tmp_path / "deep.png"
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(png16)
    for path in (planes, deep, rgba, png16):
        with pytest.raises(SlideError, match="not an 8-bit RGB image") as caught:
            open_slide(path, mpp_override=0.5)
        assert "\n" not in caught.value.one_line()


def test_unsupported_and_missing_inputs(tmp_path: Path) -> None:
    """Unknown extension, missing file and a folder without DICOM files are SlideErrors."""
    odd = tmp_path / "slide.xyz"
    odd.write_bytes(b"x")
    with pytest.raises(SlideError, match="No backend found"):
        open_slide(odd)
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "gone.svs")
    with pytest.raises(SlideError, match="no DICOM"):
        open_slide(tmp_path)
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a tiff at all")
    with pytest.raises(SlideError, match="tiffslide cannot open.*openslide fallback"):
        open_slide(garbage)


def test_supported_extensions() -> None:
    """Lowercase with a dot, including the undocumented upstream ones."""
    assert {".svs", ".ndpi", ".mrxs", ".dcm", ".dicom", ".biff", ".png", ".gif"} <= SUPPORTED_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in SUPPORTED_EXTENSIONS)
