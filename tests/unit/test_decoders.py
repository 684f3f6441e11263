"""Tile decoder backends in their CPU modes against the `cpu` reference: real slides, synthetic YCbCr / RGB / JPEG 2000
tiles, the Aperio colour rule, routing with reasons, missing extras, and the tile-once decode counter."""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from atlaspatch_stream.backends import decoders
from atlaspatch_stream.backends.decoders import DecoderSettings, make_decoder, resolve_decoder
from atlaspatch_stream.backends.decoders.base import APP14_RGB, codec_of, full_jpeg, with_app14_rgb
from atlaspatch_stream.backends.decoders.cpu import CpuDecoder
from atlaspatch_stream.backends.decoders.dali import DaliDecoder
from atlaspatch_stream.backends.decoders.nvimgcodec import NvImageCodecDecoder
from atlaspatch_stream.backends.readers import TileOnceReader, make_patch_reader
from atlaspatch_stream.backends.tiles import TilePageMeta, describe_levels
from atlaspatch_stream.errors import MissingExtraError, SlideError
from atlaspatch_stream.protocols import TileDecoder
from atlaspatch_stream.testing.synthetic import draw_tissue
from tests.conftest import real_slide
from tests.helpers import all_raws, level_meta
from tests.unit.test_readers import LibHandle, collect, distinct_tiles, expected, grid_coords, random_coords

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
pytest.importorskip("nvidia.dali")
pytest.importorskip("nvidia.nvimgcodec")

GPU_BACKENDS = ["dali", "nvimgcodec"]
HEAD = "Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] (64x64)|AppMag = 20|MPP = 0.5"
# tifffile write arguments per synthetic codec: YCbCr JPEG at three subsamplings, JPEG 2000 under three tags.
SYNTHETIC = {
    "ycbcr_444": {"compression": "jpeg", "photometric": "ycbcr", "subsampling": (1, 1)},
    "ycbcr_422": {"compression": "jpeg", "photometric": "ycbcr", "subsampling": (2, 1)},
    "ycbcr_420": {"compression": "jpeg", "photometric": "ycbcr", "subsampling": (2, 2)},
    "j2k_33003": {"compression": 33003, "photometric": "rgb"},
    "j2k_33005": {"compression": 33005, "photometric": "rgb"},
    "j2k_34712": {"compression": 34712, "photometric": "rgb"},
    "deflate": {"compression": "zlib", "photometric": "rgb"},
}


@pytest.fixture(scope="module")
def backends() -> dict[str, TileDecoder]:
    """One warm decoder per GPU backend, in CPU mode (no CUDA here), small batches so batches split."""
    built = {name: make_decoder(DecoderSettings(name, batch_size=16, engines=2)) for name in GPU_BACKENDS}
    for dec in built.values():
        dec.warm_up()
    yield built
    for dec in built.values():
        dec.close()


def write_tiled(path: Path, kind: str, width: int = 300, height: int = 200) -> Path:
    """A one-level tiled SVS-like TIFF of drawn tissue (64-px tiles, partial edge tiles) in codec `kind`."""
    img, _ = draw_tissue(width, height, seed=len(kind))
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), description=HEAD.format(w=width, h=height), metadata=None, **SYNTHETIC[kind])
    return path


def assert_same_tiles(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("relative", ["aperio/CMU-1-Small-Region.svs", "aperio/small-16x16.svs"])
def test_backend_cpu_mode_equals_cpu_on_real_slides(backends: dict[str, TileDecoder], backend: str,
                                                    relative: str) -> None:
    """Every tile of every level of the real Aperio slides (abbreviated RGB-photometric JPEG with shared tables),
    decoded in batches by the backend's CPU mode: pixel for pixel the `cpu` decoder's tiles."""
    found = describe_levels(real_slide(relative))
    assert found is not None
    for meta in found[1]:
        assert meta is not None and codec_of(meta) == "jpeg_rgb"
        raws = all_raws(meta)
        dec = backends[backend]
        assert dec.unsupported(meta) is None
        assert_same_tiles(dec.decode_batch(raws, meta).pixels, CpuDecoder().decode_batch(raws, meta).pixels)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", [k for k in SYNTHETIC if k != "deflate"])
def test_backend_cpu_mode_equals_cpu_on_synthetic_codecs(tmp_path: Path, backends: dict[str, TileDecoder],
                                                         backend: str, kind: str) -> None:
    """Synthetic tiles in YCbCr JPEG 4:4:4 / 4:2:2 / 4:2:0 and JPEG 2000 (33003, 33005, 34712): the backend's CPU
    mode accepts the level and decodes every tile (edge tiles included) exactly as the `cpu` decoder."""
    meta = level_meta(write_tiled(tmp_path / f"{kind}.svs", kind))
    dec = backends[backend]
    assert dec.unsupported(meta) is None
    raws = all_raws(meta)
    assert_same_tiles(dec.decode_batch(raws, meta).pixels, CpuDecoder().decode_batch(raws, meta).pixels)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reader_with_backend_equals_tiffslide_and_routes(tmp_path: Path, backends: dict[str, TileDecoder],
                                                         backend: str) -> None:
    """The tile-once reader driven by the backend: patches equal tiffslide's read_region + upstream resize on CMU-1
    and on a YCbCr 4:2:0 slide; the routes name the backend for every level, and the backend decoded every tile."""
    dec = backends[backend]
    for path in (real_slide("aperio/CMU-1-Small-Region.svs"), write_tiled(tmp_path / "y.svs", "ycbcr_420", 700, 500)):
        handle = LibHandle(path, "tiffslide")
        before = dec.statistics()["tiles"]
        reader = make_patch_reader(handle, 2, dec)
        assert isinstance(reader, TileOnceReader)
        coords = random_coords(handle.info, 60, seed=4)
        got = collect(reader.iter_patches(handle, coords, 224, 16), len(coords), 224, 16)
        np.testing.assert_array_equal(got, expected(handle, coords, 224))
        assert {r.decoder for r in reader.routes} == {backend} and all(not r.reason for r in reader.routes)
        assert dec.statistics()["tiles"] - before == sum(reader.decode_counts.values())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_each_tile_decoded_exactly_once_through_a_backend(backends: dict[str, TileDecoder], backend: str) -> None:
    """A dense overlapping lattice of 512-px reads resized to 256 over CMU-1, batches split at 16 tiles: the
    reader's (level, tile) counter holds every distinct tile touched exactly once, and the backend's own tile count
    grew by exactly that number."""
    dec = backends[backend]
    handle = LibHandle(real_slide("aperio/CMU-1-Small-Region.svs"), "tiffslide")
    coords = grid_coords(handle.info, 0, 512, 200)
    before = dec.statistics()["tiles"]
    reader = TileOnceReader(threads=2, decoder=dec)
    got = collect(reader.iter_patches(handle, coords, 256, 24), len(coords), 256, 24)
    assert set(reader.decode_counts.values()) == {1}
    assert len(reader.decode_counts) == distinct_tiles(handle, coords)[0]
    assert dec.statistics()["tiles"] - before == len(reader.decode_counts)
    sample = np.random.default_rng(2).choice(len(coords), 12, replace=False)
    np.testing.assert_array_equal(got[sample], expected(handle, coords[sample], 256))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deflate_level_falls_back_to_cpu_with_a_reason(tmp_path: Path, backends: dict[str, TileDecoder],
                                                       backend: str) -> None:
    """Deflate tiles are not GPU-decodable: the backend says why, the reader decodes the level with `cpu` (exact
    pixels) and records the route with the reason."""
    path = write_tiled(tmp_path / "d.svs", "deflate")
    dec = backends[backend]
    assert "deflate" in (dec.unsupported(level_meta(path)) or "")
    handle = LibHandle(path, "tiffslide")
    reader = TileOnceReader(threads=2, decoder=dec)
    coords = random_coords(handle.info, 30, seed=1, sizes=(64, 128))
    np.testing.assert_array_equal(collect(reader.iter_patches(handle, coords, 64, 8), 30, 64, 8),
                                  expected(handle, coords, 64))
    [route] = reader.routes
    assert route.decoder == "cpu" and "deflate tiles" in route.reason


def test_ndpi_is_read_with_read_region_and_says_why(backends: dict[str, TileDecoder]) -> None:
    """NDPI's restart-marker stripes never reach a decoder: the slide gets RegionReader, whose routes give the
    reason for every level read."""
    handle = LibHandle(real_slide("hamamatsu/test3-DAPI-2-387.ndpi"), "tiffslide")
    reader = make_patch_reader(handle, 2, backends["dali"])
    coords = random_coords(handle.info, 6, seed=2, sizes=(64,))
    collect(reader.iter_patches(handle, coords, 64, 3), 6, 64, 3)
    assert reader.routes and all(r.decoder == "read_region" and "NDPI" in r.reason for r in reader.routes)


class NoColourFixDali(DaliDecoder):
    """DALI without the APP14 insertion: a decoder that gets Aperio's colours wrong (fault injection)."""

    def _prepare(self, raw: bytes, meta: TilePageMeta) -> bytes:
        return full_jpeg(raw, meta) if codec_of(meta).startswith("jpeg_") else raw


class SrgbOnlyNvImageCodec(NvImageCodecDecoder):
    """nvImageCodec asked for sRGB even on Aperio RGB tiles (no SYCC): wrong colours (fault injection)."""

    def _run(self, engine, streams, meta):  # type: ignore[no-untyped-def]
        return [np.asarray(img.cpu()) for img in engine.handle.decode(streams, params=self._params["srgb"])]


@pytest.mark.parametrize("broken", [NoColourFixDali, SrgbOnlyNvImageCodec], ids=["dali-no-app14", "nvimgcodec-srgb"])
def test_aperio_colour_rule_each_backend(broken: type) -> None:
    """The Aperio rule in each backend: with its fix (APP14 for DALI, SYCC for nvImageCodec) a raw CMU-1 tile equals
    the reference; without it the same tile is off by tens of grey levels, the start-up probe catches it, and the
    reader routes the slide's RGB JPEG to `cpu` with the measured difference as the reason (pixels stay exact)."""
    path = real_slide("aperio/CMU-1-Small-Region.svs")
    meta = level_meta(path)
    raws = all_raws(meta)[:8]
    want = CpuDecoder().decode_batch(raws, meta).pixels
    good = DaliDecoder() if broken is NoColourFixDali else NvImageCodecDecoder()
    bad = broken()
    assert_same_tiles(good.decode_batch(raws, meta).pixels, want)
    wrong = bad.decode_batch(raws, meta).pixels
    assert max(int(np.abs(w.astype(int) - r).max()) for w, r in zip(wrong, want, strict=True)) > 30
    assert not bad.probes()["jpeg_rgb"].ok and bad.probes()["jpeg_ycbcr"].ok
    reason = bad.unsupported(meta) or ""
    assert "jpeg_rgb" in reason and "start-up probe" in reason
    handle = LibHandle(path, "tiffslide")
    reader = TileOnceReader(threads=2, decoder=bad)
    coords = random_coords(handle.info, 20, seed=3)
    np.testing.assert_array_equal(collect(reader.iter_patches(handle, coords, 224, 8), 20, 224, 8),
                                  expected(handle, coords, 224))
    assert [r.decoder for r in reader.routes] == ["cpu"] and bad.statistics()["tiles"] == 8
    good.close()
    bad.close()


def test_app14_is_inserted_only_for_rgb_jpeg() -> None:
    """DALI's stream preparation: tables merged for every JPEG, APP14 transform=0 right after SOI only for
    RGB-photometric tiles; JPEG 2000 bytes pass untouched."""
    meta = level_meta(real_slide("aperio/CMU-1-Small-Region.svs"))
    raw = all_raws(meta)[0]
    merged = full_jpeg(raw, meta)
    assert merged.startswith(b"\xff\xd8") and merged.count(b"\xff\xd9") == 1 and len(merged) > len(raw)
    dali = DaliDecoder()
    assert dali._prepare(raw, meta) == with_app14_rgb(merged) and dali._prepare(raw, meta)[2:18] == APP14_RGB
    ycbcr = TilePageMeta(**{**meta.__dict__, "jpeg_colorspace": None})
    assert APP14_RGB not in dali._prepare(raw, ycbcr)
    j2k = TilePageMeta(**{**meta.__dict__, "compression": 33005, "jpegtables": None})
    assert dali._prepare(b"\xff\x4f\xff\x51", j2k) == b"\xff\x4f\xff\x51"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_corrupt_tile_named_through_a_backend(backends: dict[str, TileDecoder], backend: str) -> None:
    """unreadable.svs's corrupt JPEG tile through a batch backend: the failed batch is re-decoded tile by tile with
    the reference, which names the tile in a one-line SlideError."""
    handle = LibHandle(real_slide("errors/unreadable.svs"), "tiffslide")
    reader = TileOnceReader(threads=2, decoder=backends[backend])
    with pytest.raises(SlideError) as info:
        list(reader.iter_patches(handle, np.array([[0, 0, 16, 16, 0]], np.int32), 16, 4))
    assert info.value.slide == "unreadable.svs" and "corrupt tile 0" in info.value.one_line()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_one_decoder_shared_by_threads(backends: dict[str, TileDecoder], backend: str) -> None:
    """Four threads decode the same level through one backend at once (its pool lends one engine per call): every
    thread gets the reference tiles."""
    meta = level_meta(real_slide("aperio/CMU-1-Small-Region.svs"))
    raws = all_raws(meta)[:40]
    want = CpuDecoder().decode_batch(raws, meta).pixels
    results: list[list[np.ndarray]] = []
    lock = threading.Lock()

    def work() -> None:
        got = backends[backend].decode_batch(raws, meta).pixels
        with lock:
            results.append(got)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4
    for got in results:
        assert_same_tiles(got, want)


@pytest.mark.parametrize("name, module, extra", [("dali", "nvidia.dali", "[dali]"),
                                                 ("nvimgcodec", "nvidia.nvimgcodec", "[gpu]")])
def test_explicit_backend_without_its_library_names_the_extra(monkeypatch: pytest.MonkeyPatch, name: str,
                                                              module: str, extra: str) -> None:
    """`--decoder dali` / `--decoder nvimgcodec` with the library not importable: MissingExtraError at
    construction (before any slide), naming the extra to install."""
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        make_decoder(DecoderSettings(name))


def test_auto_picks_by_cuda_and_installed_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` is cpu without CUDA (here), dali with CUDA and DALI, nvimgcodec with CUDA and only nvImageCodec, cpu
    with CUDA and neither; explicit names pass through; unknown names are config errors."""
    assert resolve_decoder("auto", "cpu") == "cpu" and resolve_decoder("auto", "cuda") == "cpu"
    assert isinstance(make_decoder(DecoderSettings("auto", device="cuda")), CpuDecoder)
    monkeypatch.setattr(decoders, "_cuda", lambda device: device.startswith("cuda"))
    assert resolve_decoder("auto", "cuda:1") == "dali" and resolve_decoder("auto", "cpu") == "cpu"
    real = decoders._installed
    monkeypatch.setattr(decoders, "_installed", lambda m: m != "nvidia.dali" and real(m))
    assert resolve_decoder("auto", "cuda") == "nvimgcodec"
    monkeypatch.setattr(decoders, "_installed", lambda m: False)
    assert resolve_decoder("auto", "cuda") == "cpu" and resolve_decoder("dali", "cuda") == "dali"
    from atlaspatch_stream.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown decoder"):
        resolve_decoder("turbo", "cpu")


def test_gpu_backend_without_cuda_runs_its_cpu_mode() -> None:
    """An explicit GPU backend on a machine without CUDA runs on the library's CPU backend: pixels on the host."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = make_decoder(DecoderSettings("dali", device="cuda:0"))
    assert isinstance(dec, DaliDecoder) and dec.device == "cpu"


def test_shipped_probe_tiles_match_the_reference_decoder() -> None:
    """The probe tiles shipped with the package (one per family): their stored reference pixels are what the `cpu`
    decoder gives for their bytes today, and the RGB tile really is marker-less (a plain decoder gets it wrong)."""
    import imagecodecs

    from atlaspatch_stream.backends.decoders.probe import probe_pixels, probe_tiles

    tiles = probe_tiles()
    assert set(tiles) == {"jpeg_rgb", "jpeg_ycbcr", "jpeg2000"}
    for raw, meta, want in tiles.values():
        np.testing.assert_array_equal(CpuDecoder().decode_batch([raw], meta).pixels[0], want)
        assert np.abs(want.astype(int) - probe_pixels()).mean() < 8  # near what was encoded (lossy codecs)
    raw = tiles["jpeg_rgb"][0]
    assert b"Adobe" not in raw and b"JFIF" not in raw
    assert np.abs(imagecodecs.jpeg8_decode(raw).astype(int) - tiles["jpeg_rgb"][2]).mean() > 20
